"""The teacher's template sets equal the official sources (read as text, never executed)."""

import ast

import pytest

from prograd_fast.clip import COOP_TEMPLATES, PROGRAD_TEMPLATES, TEMPLATE_SETS, get_templates

from vendor_sources import PROMPT_ALIGN, unpack


def _custom_templates(path) -> dict:
    tree = ast.parse(path.read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "CUSTOM_TEMPLATES":
            return ast.literal_eval(node.value)
    raise AssertionError(f"no CUSTOM_TEMPLATES in {path}")


@pytest.fixture(scope="module")
def prompt_align(tmp_path_factory):
    return unpack(PROMPT_ALIGN, tmp_path_factory.mktemp("prompt_align"))


def test_prograd_set_is_the_official_prograd_trainers(prompt_align):
    official = _custom_templates(prompt_align / "ProGrad.public" / "trainers" / "prograd.py")
    ours = {k: v for k, v in PROGRAD_TEMPLATES.items() if k not in ("default", "digits")}
    assert ours == official


def test_sets_differ_where_official_prograd_differs_from_coop():
    differ = {k for k in COOP_TEMPLATES if COOP_TEMPLATES[k] != PROGRAD_TEMPLATES[k]}
    assert differ == {"OxfordPets", "OxfordFlowers", "FGVCAircraft", "DescribableTextures", "Food101"}
    assert get_templates("OxfordPets", "prograd") == ["a type of pet, a photo of a {}."]
    assert get_templates("oxfordpets") == ["a photo of a {}, a type of pet."]
    assert get_templates(["Food101", "{} x"], template_set="prograd") == [
        "a type of food, a photo of {}.", "{} x"]
    assert set(TEMPLATE_SETS) == {"coop", "prograd"}
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("OxfordPets", "cocoop")


def test_prompted_clip_teacher_uses_the_named_set():
    from prograd_fast.clip import PromptedCLIP

    from clip_helpers import CLASSNAMES, tiny_clip

    model = PromptedCLIP(tiny_clip(), CLASSNAMES, templates="DescribableTextures",
                         template_set="prograd", n_ctx=2)
    assert model.teacher.templates == ["a texture of {}."]
