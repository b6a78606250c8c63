"""Contract suite: every registered augmentation family, grey and RGB, CPU (and CUDA)."""

from __future__ import annotations

import pytest
import torch

from ssad_common.search_space import FAMILIES, CategoricalParam, FloatParam
from tests.conftest import DEVICES
from worker.core.augmentations import REGISTRY, CutDiff, build_augmentation, changed_fraction

FAMILY_NAMES = sorted(REGISTRY)


def batch(channels: int, device: str, n: int = 16, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    # Smooth-ish random images with structure, so blur and crops change them.
    x = torch.rand((n, channels, size // 4, size // 4), generator=g)
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="nearest")
    return x.to(device)


def gen(device: str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def test_every_family_is_registered_and_declared() -> None:
    assert set(REGISTRY) == set(FAMILIES)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_shape_dtype_range_and_change(name: str, channels: int, device: str) -> None:
    x = batch(channels, device)
    aug = build_augmentation(name).to(device)
    with torch.no_grad():
        y = aug(x, gen(device, 0))
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    assert y.device == x.device
    assert float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    assert torch.isfinite(y).all()
    # Every image is changed (a pseudo-anomaly identical to a normal image is label noise).
    per_image = (y - x).abs().flatten(1).amax(dim=1)
    assert bool((per_image > 1e-3).all()), f"{name} left an image unchanged"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_same_seed_same_output_other_seed_other_output(name: str, device: str) -> None:
    x = batch(3, device)
    # Whole-image blur has no random draw; inside a patch it has (the patch's place).
    params = {"patch_size": 0.2} if name == "blur" else {}
    aug = build_augmentation(name, params).to(device)
    with torch.no_grad():
        a, b = aug(x, gen(device, 1)), aug(x, gen(device, 1))
        c = aug(x, gen(device, 2))
    assert torch.equal(a, b)
    if name not in ("invert", "flip"):  # deterministic by design
        assert not torch.equal(a, c)


def _sizes(name: str) -> tuple[float, float]:
    p = FAMILIES[name].param("patch_size")
    assert isinstance(p, FloatParam)
    return max(p.low, 0.02), min(p.high, 0.3) if p.high < 1 else 0.5


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", [n for n in FAMILY_NAMES if FAMILIES[n].has_patch_size])
def test_bigger_patch_changes_more_pixels(name: str, device: str) -> None:
    x = batch(1, device, n=64)
    small, large = _sizes(name)
    with torch.no_grad():
        a = build_augmentation(name, {"patch_size": small}).to(device)(x, gen(device, 3))
        b = build_augmentation(name, {"patch_size": large}).to(device)(x, gen(device, 3))
    assert changed_fraction(x, b) > changed_fraction(x, a) * 1.5


MAGNITUDES = {  # the continuous magnitude of each global-ish family: (param, small, large)
    "rotate": ("angle", 15.0, 120.0),
    "crop": ("min_scale", 0.7, 0.1),
    "blur": ("sigma", 0.015, 0.1),
    "noise": ("std", 0.03, 0.4),
    "mask": ("drop_rate", 0.02, 0.4),
    "color": ("strength", 0.06, 0.7),
    "simclr": ("strength", 0.1, 1.0),
}


@pytest.mark.parametrize("name", sorted(MAGNITUDES))
def test_magnitude_reaches_the_output(name: str) -> None:
    key, weak, strong = MAGNITUDES[name]
    x = batch(3, "cpu", n=64)
    with torch.no_grad():
        a = build_augmentation(name, {key: weak})(x, gen("cpu", 4))
        b = build_augmentation(name, {key: strong})(x, gen("cpu", 4))
    assert (b - x).abs().mean() > (a - x).abs().mean()


def test_categorical_params_reach_the_output() -> None:
    x = batch(1, "cpu")
    for name, spec in FAMILIES.items():
        for p in spec.params:
            if isinstance(p, CategoricalParam):
                outs = [build_augmentation(name, {p.name: c})(x, gen("cpu", 5))
                        for c in p.choices]
                assert len({o.sum().item() for o in outs}) == len(p.choices), (name, p.name)


@pytest.mark.parametrize(("name", "fill", "value"), [
    ("cutout", "zero", 0.0), ("cutout", "one", 1.0),
    ("cutpaste-scar", "zero", 0.0), ("cutpaste-scar", "one", 1.0)])
def test_constant_fills_paint_black_or_white(name: str, fill: str, value: float) -> None:
    x = torch.full((4, 1, 32, 32), 0.7)
    y = build_augmentation(name, {"fill": fill, "patch_size": 0.05})(x, gen("cpu", 0))
    for i in range(4):  # every image changed, and only to the fill's value
        changed = y[i] != x[i]
        assert changed.any() and bool((y[i][changed] == value).all()), (name, fill, i)


def test_cutout_grey_fill_is_one_level_per_image_and_the_scar_pastes_by_default() -> None:
    x = torch.full((4, 1, 32, 32), 0.7)
    y = build_augmentation("cutout", {"fill": "grey", "patch_size": 0.1})(x, gen("cpu", 0))
    for i in range(4):
        vals = y[i][y[i] != 0.7].unique()
        assert len(vals) == 1
    # The scar's default copies (and jitters) the image's own content: on a uniform image
    # that is a jittered 0.7, never black or white.
    x = torch.rand(4, 1, 32, 32) * 0.5 + 0.25
    y = build_augmentation("cutpaste-scar", {"patch_size": 0.05})(x, gen("cpu", 0))
    changed = y != x
    assert changed.any() and float(y[changed].min()) > 0.0 and float(y[changed].max()) < 1.0


@pytest.mark.parametrize("name", ["cutout", "cutpaste", "cutpaste-scar"])
def test_object_placement_puts_the_patch_on_the_object(name: str) -> None:
    # A bright 6×6 object in one corner of a black image, elsewhere per image: placed on
    # the object, every patch's centre row/column is on it; placed anywhere, most are not.
    n = 64
    x = torch.zeros((n, 1, 32, 32))
    g = torch.Generator().manual_seed(3)
    corners = torch.randint(0, 26, (n, 2), generator=g)
    for i, (r, c) in enumerate(corners.tolist()):
        x[i, 0, r:r + 6, c:c + 6] = torch.linspace(0.5, 1.0, 36).reshape(6, 6)
    fill = {"fill": "noise"} if name == "cutout" else {}
    hits = {}
    for placement in ("anywhere", "object"):
        aug = build_augmentation(name, {**fill, "patch_size": 0.01, "placement": placement})
        changed = (aug(x, gen("cpu", 1)) != x)[:, 0]
        on = 0
        for i, (r, c) in enumerate(corners.tolist()):
            rows, cols = changed[i].nonzero(as_tuple=True)
            if len(rows) == 0:
                continue
            cy, cx = rows.float().mean().item(), cols.float().mean().item()
            on += int(r - 1 <= cy <= r + 6 and c - 1 <= cx <= c + 6)
        hits[placement] = on
    assert hits["object"] >= 0.9 * n, hits
    assert hits["anywhere"] <= 0.5 * n, hits


def test_object_placement_on_a_uniform_image_is_uniform_and_seeded() -> None:
    from worker.core.augmentations import object_centres

    x = torch.full((4000, 1, 8, 8), 0.3)
    rows, cols = object_centres(x, gen("cpu", 0))
    counts = torch.bincount(rows * 8 + cols, minlength=64).float()
    assert counts.min() > 0.5 * counts.mean()  # every pixel drawn, none favoured
    again, _ = object_centres(x, gen("cpu", 0))
    assert torch.equal(rows, again)


def test_unknown_family_and_bad_params_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown augmentation"):
        build_augmentation("os.system")
    with pytest.raises(ValueError, match="unknown parameter"):
        build_augmentation("cutout", {"colour": 1})
    with pytest.raises(ValueError, match="outside"):
        build_augmentation("cutout", {"patch_size": 2.0})
    with pytest.raises(ValueError, match="must be a number"):
        build_augmentation("rotate", {"angle": "90"})
    with pytest.raises(ValueError, match="expected"):
        build_augmentation("invert")(torch.rand(2, 2, 8, 8), gen("cpu", 0))
    with pytest.raises(ValueError, match="float"):
        build_augmentation("invert")(torch.zeros(2, 1, 8, 8, dtype=torch.uint8), gen("cpu", 0))


def test_cutdiff_is_differentiable_and_stays_in_range() -> None:
    aug = CutDiff(patch_size=0.05, aspect=1.0)
    x = batch(1, "cpu")
    out = aug(x, gen("cpu", 0))
    (-out.mean()).backward()
    assert aug.raw_patchsize.grad is not None and aug.raw_patchsize.grad.abs() > 0
    assert aug.raw_aspect.grad is not None
    # Huge steps cannot push the hyperparameters out of their declared ranges (no NaN).
    with torch.no_grad():
        aug.raw_patchsize.fill_(1e4)
        aug.raw_aspect.fill_(-1e4)
    p = aug.current_params()
    spec = FAMILIES["cutdiff"]
    assert p["patch_size"] == pytest.approx(spec.param("patch_size").high)  # type: ignore[union-attr]
    assert p["aspect"] == pytest.approx(spec.param("aspect").low)  # type: ignore[union-attr]
    assert torch.isfinite(aug(x, gen("cpu", 0))).all()
    assert CutDiff(patch_size=0.1).current_params()["patch_size"] == pytest.approx(0.1, rel=1e-4)
