"""The teacher's template sets equal the official sources (read as text, never executed)."""

import pytest

from prograd_fast.clip import COOP_TEMPLATES, PROGRAD_TEMPLATES, TEMPLATE_SETS, get_templates

from vendor_sources import custom_templates, vendor_tree  # noqa: F401 - the fixture


def test_prograd_set_is_the_official_prograd_trainers(vendor_tree):
    official = custom_templates(vendor_tree / "prompt_align" / "ProGrad.public" / "trainers"
                                 / "prograd.py")
    ours = {k: v for k, v in PROGRAD_TEMPLATES.items() if k not in ("default", "digits")}
    assert ours == official


def test_sets_differ_where_official_prograd_differs_from_coop():
    differ = {k for k in COOP_TEMPLATES if COOP_TEMPLATES[k] != PROGRAD_TEMPLATES[k]}
    assert differ == {"OxfordPets", "OxfordFlowers", "FGVCAircraft", "DescribableTextures", "Food101"}
    assert get_templates("OxfordPets", "prograd") == ["a type of pet, a photo of a {}."]
    assert get_templates("oxfordpets") == ["a photo of a {}, a type of pet."]
    assert get_templates(["Food101", "{} x"], template_set="prograd") == [
        "a type of food, a photo of {}.", "{} x"]
    assert set(TEMPLATE_SETS) == {"coop", "prograd", "kgcoop"}
    with pytest.raises(ValueError, match="unknown template set"):
        get_templates("OxfordPets", "cocoop")


def test_prompted_clip_teacher_uses_the_named_set():
    from prograd_fast.clip import PromptedCLIP

    from clip_helpers import CLASSNAMES, tiny_clip

    model = PromptedCLIP(tiny_clip(), CLASSNAMES, templates="DescribableTextures",
                         template_set="prograd", n_ctx=2)
    assert model.teacher.templates == ["a texture of {}."]
