"""The user-facing docs point only to what a user has, and the README says how to install."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = ["README.md", "BENCHMARKS.md", "benchmarks/README.md", "docs/hardening.md",
             "docs/coop.md", "docs/protocols.md", "docs/design.md"]


@pytest.mark.parametrize("name", USER_DOCS)
def test_docs_point_to_nothing_outside_the_repository(name):
    text = (ROOT / name).read_text()
    assert "DESIGN.md" not in text, f"{name} points to DESIGN.md, which is not in the repository"
    assert not re.search(r"\bissue[ -]?#?\d+|\bbranch (issue|wt)[-\w]*", text, re.I), \
        f"{name} mentions an issue number or a branch name"


def test_readme_says_how_to_install_without_a_gpu():
    text = (ROOT / "README.md").read_text()
    assert "--index-url https://download.pytorch.org/whl/cpu" in text
    assert '".[demo]"' in text
    # the two set-up commands are unchanged
    assert text.count('pip install -e ".[test]" && prograd-fast demo --output-dir prograd_demo') == 1
    assert text.count('pip install -e ".[test]" && python -m pytest -q tests') == 1


def test_the_demo_output_folder_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().split()
    assert "/prograd_demo/" in lines or "prograd_demo/" in lines
