"""The torch-free search-space data the API and the worker share."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ssad_common.search_space import (
    CUTPASTE_DEFAULT,
    DEFAULT_AUGMENTATIONS,
    FAMILIES,
    SearchSpace,
    describe,
    get_family,
)


def test_plain_data_modules_do_not_import_torch() -> None:
    code = ("import sys, ssad_common.search_space, ssad_common.images; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_all_method_families_are_declared() -> None:
    method = {"cutout", "cutpaste", "cutpaste-scar", "rotate", "flip", "crop", "blur", "noise",
              "mask", "invert", "color", "simclr", "cutdiff"}
    assert set(FAMILIES) == method
    assert "cutdiff" not in DEFAULT_AUGMENTATIONS
    for f in FAMILIES.values():
        assert f.description
        assert f.validate({}) == f.defaults  # defaults are valid
    json.dumps(describe())  # JSON-ready for the API


def test_local_families_have_patch_size_and_aspect() -> None:
    for name in ("cutout", "cutpaste", "cutpaste-scar", "cutdiff"):
        spec = get_family(name)
        assert spec.kind == "local"
        assert {"patch_size", "aspect"} <= {p.name for p in spec.params}


def test_fixed_default_baseline_is_valid() -> None:
    name, params = CUTPASTE_DEFAULT
    assert get_family(name).validate(params) == params


def test_search_space_from_dict_and_narrowing() -> None:
    space = SearchSpace.from_dict({"augmentations": ["cutout", "cutpaste-scar", "rotate"],
                                   "patch_size": [0.01, 0.2]})
    cut = {p.name: p for p in space.searched_params("cutout")}
    assert (cut["patch_size"].low, cut["patch_size"].high) == (0.01, 0.2)  # type: ignore[union-attr]
    scar = {p.name: p for p in space.searched_params("cutpaste-scar")}
    assert (scar["patch_size"].low, scar["patch_size"].high) == (0.01, 0.1)  # type: ignore[union-attr]
    assert [p.name for p in space.searched_params("rotate")] == ["angle"]
    assert SearchSpace.from_dict(space.to_dict()) == space
    assert SearchSpace.from_dict(None).augmentations == DEFAULT_AUGMENTATIONS


def test_fixed_params_are_not_searched_and_are_applied() -> None:
    space = SearchSpace.from_dict({"augmentations": ["cutout"],
                                   "fixed": {"cutout": {"fill": "zero"}}})
    assert "fill" not in {p.name for p in space.searched_params("cutout")}
    assert space.complete("cutout", {"patch_size": 0.1})["fill"] == "zero"
    # placement is never searched: on the object unless fixed, as a user would for defects
    # that can lie anywhere
    assert space.complete("cutout", {})["placement"] == "object"
    placed = SearchSpace.from_dict({"augmentations": ["cutout", "cutpaste-scar"], "fixed": {
        "cutpaste-scar": {"placement": "anywhere"}}})
    assert all(p.name != "placement" for f in placed.augmentations
               for p in placed.searched_params(f))
    assert placed.complete("cutpaste-scar", {"patch_size": 0.01})["placement"] == "anywhere"
    assert placed.complete("cutout", {"patch_size": 0.01})["placement"] == "object"
    # The fixed CutPaste baseline stays the paper's: anywhere.
    assert CUTPASTE_DEFAULT[1]["placement"] == "anywhere"


def test_the_study_searches_every_fill_of_cutout_and_the_scar() -> None:
    """CutOut's fills run from black to white, and the scar pastes or paints a black or
    white scratch: every one is searched, and a screen of a small space covers them."""
    space = SearchSpace.from_dict({"augmentations": ["cutout", "cutpaste-scar"]})
    fills = {f: next(p for p in space.searched_params(f) if p.name == "fill")
             for f in space.augmentations}
    assert [p.default for p in fills.values()] == ["grey", "paste"]
    assert [v["fill"] for v in space.variants("cutout")] == ["zero", "mean", "noise", "one"]
    assert [v["fill"] for v in space.variants("cutpaste-scar")] == ["zero", "one"]
    assert space.complete("cutpaste-scar", {})["fill"] == "paste"


@pytest.mark.parametrize("bad, message", [
    ({"augmentations": []}, "at least one"),
    ({"augmentations": ["cutout", "cutout"]}, "duplicates"),
    ({"augmentations": ["__import__"]}, "unknown augmentation"),
    ({"patch_size": [0.3, 0.1]}, "min <= max"),
    ({"patch_size": [0.0, 0.1]}, "min <= max"),
    ({"patch_size": [0.1]}, r"\[min, max\]"),
    ({"augmentations": ["cutpaste-scar"], "patch_size": [0.2, 0.5]}, "does not overlap"),
    ({"colour": 1}, "unknown search_space field"),
    ({"augmentations": ["rotate"], "fixed": {"cutout": {}}}, "not searched"),
    ({"augmentations": ["rotate"], "fixed": {"rotate": {"angle": 900}}}, "outside"),
    ({"augmentations": ["cutout"], "fixed": {"cutout": {"placement": "centre"}}},
     "not one of"),
    ({"augmentations": ["rotate"], "fixed": {"rotate": {"placement": "object"}}},
     "unknown parameter"),
    ({"augmentations": ["cutpaste-scar"], "fixed": {"cutpaste-scar": {"fill": "grey"}}},
     "not one of"),
])
def test_bad_search_spaces_are_refused(bad: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SearchSpace.from_dict(bad)
