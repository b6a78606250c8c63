"""Augmentation families as batched tensor modules (method.md §3).

Every family takes float images in [0, 1] of shape (N, C, H, W) on any device, draws all of
its per-sample randomness from the ``torch.Generator`` it is given (same generator state,
same output), and returns a tensor of the same shape, dtype and range. Where kornia has the
operation (rotation, resized crop, blur, colour adjustments) it is used; the rectangle and
stripe masks of CutOut / CutPaste / scar and the differentiable CutOut are written here
because no library has them in this form.

Families are looked up by name only through :data:`REGISTRY`; their hyperparameters and
ranges are declared as plain data in :mod:`ssad_common.search_space`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from kornia.color import rgb_to_grayscale
from kornia.enhance import adjust_brightness, adjust_contrast, adjust_hue, adjust_saturation
from kornia.filters import gaussian_blur2d
from kornia.geometry.transform import crop_and_resize, rotate
from torch import Tensor, nn

from ssad_common.search_space import FAMILIES, FloatParam, ParamValue

# ---------------------------------------------------------------------------- helpers


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _signs(n: int, g: torch.Generator, device: torch.device) -> Tensor:
    return torch.randint(0, 2, (n,), generator=g, device=device).float() * 2 - 1


def _patch_hw(area: float, aspect: float, h: int, w: int) -> tuple[int, int]:
    """Patch height and width in pixels for an area fraction and an aspect (height/width)."""
    ph = round(math.sqrt(area * aspect) * h)
    pw = round(math.sqrt(area / aspect) * w)
    return max(1, min(h, ph)), max(1, min(w, pw))


def object_centres(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """One pixel per image, drawn with probability proportional to how far it is from the
    image's background (the median of its one-pixel border, summed over channels): the
    centres of patches placed ``object`` (on a digit, its strokes; on a part photographed
    on a plain background, the part). A uniform image draws uniformly. Returns (row, col)."""
    w = x.shape[-1]
    border = torch.cat([x[:, :, 0], x[:, :, -1], x[:, :, 1:-1, 0], x[:, :, 1:-1, -1]], dim=2)
    background = border.median(dim=2).values[:, :, None, None]
    weight = (x - background).abs().sum(dim=1).flatten(1).float() + 1e-6
    flat = torch.multinomial(weight, 1, generator=g).squeeze(1)
    return flat // w, flat % w


def _centred_corner(centre: Tensor, size: int, side: int) -> Tensor:
    """The top (or left) of a ``size``-long span centred on ``centre``, kept inside ``side``."""
    return (centre - size // 2).clamp(0, side - size)


def _rect_mask(
    n: int, h: int, w: int, ph: int, pw: int, g: torch.Generator, device: torch.device,
    on: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A (n, 1, h, w) bool mask of one ph × pw rectangle per sample, fully inside the image:
    anywhere, or (``on``: the images) centred on :func:`object_centres` where it fits.

    Returns the mask and each rectangle's top and left.
    """
    if on is None:
        top = torch.randint(0, h - ph + 1, (n,), generator=g, device=device)
        left = torch.randint(0, w - pw + 1, (n,), generator=g, device=device)
    else:
        cy, cx = object_centres(on, g)
        top, left = _centred_corner(cy, ph, h), _centred_corner(cx, pw, w)
    rows = torch.arange(h, device=device)
    cols = torch.arange(w, device=device)
    in_rows = (rows[None, :] >= top[:, None]) & (rows[None, :] < (top + ph)[:, None])
    in_cols = (cols[None, :] >= left[:, None]) & (cols[None, :] < (left + pw)[:, None])
    mask = in_rows[:, :, None] & in_cols[:, None, :]
    return mask[:, None], top, left


def _shifted(x: Tensor, dy: Tensor, dx: Tensor) -> Tensor:
    """out[b, :, i, j] = x[b, :, (i + dy[b]) mod H, (j + dx[b]) mod W], per-sample shifts."""
    n, c, h, w = x.shape
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None]) % h
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None]) % w
    idx = (rows[:, :, None] * w + cols[:, None, :]).reshape(n, 1, h * w).expand(n, c, h * w)
    return x.reshape(n, c, h * w).gather(2, idx).reshape(n, c, h, w)


def _jitter(x: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Random brightness shift and contrast factor in [-strength, strength] per sample."""
    if strength <= 0:
        return x
    n = x.shape[0]
    b = _uniform(n, -strength, strength, g, x.device)
    c = 1 + _uniform(n, -strength, strength, g, x.device)
    return adjust_contrast(adjust_brightness(x, b), c)


def _in_patch(x: Tensor, changed: Tensor, patch_size: float, g: torch.Generator) -> Tensor:
    """``changed`` inside one random square patch of area ``patch_size`` (all of it at 1)."""
    if patch_size >= 1.0:
        return changed
    n, _, h, w = x.shape
    ph, pw = _patch_hw(patch_size, 1.0, h, w)
    mask, _, _ = _rect_mask(n, h, w, ph, pw, g, x.device)
    return torch.where(mask, changed, x)


# ---------------------------------------------------------------------------- base


class Augmentation(nn.Module):
    """A batched augmentation family.

    Subclasses set :attr:`name` (the key of its :class:`~ssad_common.search_space.FamilySpec`),
    read their validated hyperparameters from ``self.params`` and implement
    :meth:`transform`. ``forward(x, generator)`` checks the input contract once for all.
    """

    name: ClassVar[str]

    def __init__(self, **params: Any) -> None:
        super().__init__()
        self.params: dict[str, ParamValue] = FAMILIES[self.name].validate(params)

    def p(self, key: str) -> float:
        return float(self.params[key])

    @property
    def on_object(self) -> bool:
        """Whether patches are centred on the object (``placement: object``)."""
        return self.params.get("placement") == "object"

    def _placed_rect(self, x: Tensor, ph: int, pw: int, g: torch.Generator
                     ) -> tuple[Tensor, Tensor, Tensor]:
        """:func:`_rect_mask` for ``x``, where this family's ``placement`` puts it."""
        n, _, h, w = x.shape
        return _rect_mask(n, h, w, ph, pw, g, x.device, x if self.on_object else None)

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"{self.name}: expected (N, 1|3, H, W) images, got {tuple(x.shape)}")
        if not x.is_floating_point():
            raise ValueError(f"{self.name}: expected float images in [0, 1], got {x.dtype}")
        if x.shape[0] == 0:
            return x
        return self.transform(x, generator)

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.params.items())


REGISTRY: dict[str, type[Augmentation]] = {}


def register(cls: type[Augmentation]) -> type[Augmentation]:
    if cls.name not in FAMILIES:
        raise KeyError(f"{cls.name} has no FamilySpec in ssad_common.search_space")
    REGISTRY[cls.name] = cls
    return cls


def build_augmentation(name: str, params: Mapping[str, Any] | None = None) -> Augmentation:
    """The one way to turn a user's ``{name, params}`` into a module (whitelisted)."""
    try:
        cls = REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown augmentation {name!r}; known: {sorted(REGISTRY)}") from None
    return cls(**dict(params or {}))


# ---------------------------------------------------------------------------- families

#: The fills of the local families that are one grey level for every image.
_CONSTANT_FILLS: dict[str, float] = {"zero": 0.0, "one": 1.0}


def _constant_fill(fill: str, x: Tensor) -> Tensor:
    """The grey level of a constant ``fill`` as a scalar tensor matching ``x``."""
    return torch.full((), _CONSTANT_FILLS[fill], dtype=x.dtype, device=x.device)


@register
class CutOut(Augmentation):
    """Fill one random ``patch_size`` × ``aspect`` rectangle per image.

    ``fill`` decides what goes in: ``zero`` (black), ``mean`` (the image's mean),
    ``grey`` (a random grey level per image), ``noise`` (uniform noise per pixel), ``one``
    (white). The fill matters as much as the size: a black patch on a black background
    changes nothing, which is what ``placement: object`` (the rectangle centred on the
    object) avoids; on the object, a small white patch on a white stroke can change nothing
    in the same way, which is why the fill is searched.
    """

    name = "cutout"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        ph, pw = _patch_hw(self.p("patch_size"), self.p("aspect"), h, w)
        mask, _, _ = self._placed_rect(x, ph, pw, g)
        fill = self.params["fill"]
        value: Tensor
        if fill in _CONSTANT_FILLS:
            value = _constant_fill(str(fill), x)
        elif fill == "mean":
            value = x.mean(dim=(1, 2, 3), keepdim=True)
        elif fill == "grey":
            value = torch.rand((n, 1, 1, 1), generator=g, device=x.device, dtype=x.dtype)
        else:
            value = torch.rand(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return torch.where(mask, value, x)


@register
class CutPaste(Augmentation):
    """Copy a rectangle from a random place and paste it at another (Li et al., 2021).

    Both rectangles lie fully inside the image (the pasted one centred on the object with
    ``placement: object``); the pasted patch gets a random brightness/contrast jitter of
    magnitude up to ``jitter``.
    """

    name = "cutpaste"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        ph, pw = _patch_hw(self.p("patch_size"), self.p("aspect"), h, w)
        mask, top, left = self._placed_rect(x, ph, pw, g)
        src_top = torch.randint(0, h - ph + 1, (n,), generator=g, device=x.device)
        src_left = torch.randint(0, w - pw + 1, (n,), generator=g, device=x.device)
        source = _jitter(_shifted(x, src_top - top, src_left - left), self.p("jitter"), g)
        return torch.where(mask, source, x)


@register
class CutPasteScar(Augmentation):
    """CutPaste with a thin, long, randomly rotated stripe ("scar").

    The stripe has area ``patch_size`` and length/width ``aspect``, and is centred in the
    middle 60 % of the image (on the object with ``placement: object``). With ``fill:
    paste`` (the default) its content is copied from the same image at a random offset and
    jittered in brightness/contrast; ``zero`` and ``one`` paint it black or white, as a
    scratch that swallows or catches the light.
    """

    name = "cutpaste-scar"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        dev = x.device
        side = math.sqrt(h * w)
        length = math.sqrt(self.p("patch_size") * self.p("aspect")) * side
        width = max(1.0, math.sqrt(self.p("patch_size") / self.p("aspect")) * side)
        if self.on_object:
            rows, cols = object_centres(x, g)
            cy, cx = rows.to(x.dtype) + 0.5, cols.to(x.dtype) + 0.5
        else:
            cy = _uniform(n, 0.2 * h, 0.8 * h, g, dev)
            cx = _uniform(n, 0.2 * w, 0.8 * w, g, dev)
        theta = _uniform(n, 0.0, math.pi, g, dev)
        ys = torch.arange(h, device=dev, dtype=x.dtype)[None, :, None] + 0.5 - cy[:, None, None]
        xs = torch.arange(w, device=dev, dtype=x.dtype)[None, None, :] + 0.5 - cx[:, None, None]
        cos, sin = theta.cos()[:, None, None], theta.sin()[:, None, None]
        along = xs * cos + ys * sin
        across = -xs * sin + ys * cos
        mask = (along.abs() <= length / 2) & (across.abs() <= width / 2)
        fill = self.params["fill"]
        if fill in _CONSTANT_FILLS:
            return torch.where(mask[:, None], _constant_fill(str(fill), x), x)
        dy = torch.randint(h // 4, h - h // 4 + 1, (n,), generator=g, device=dev)
        dx = torch.randint(w // 4, w - w // 4 + 1, (n,), generator=g, device=dev)
        source = _jitter(_shifted(x, dy, dx), 0.1, g)
        return torch.where(mask[:, None], source, x)


@register
class Rotate(Augmentation):
    """Rotate by an angle of magnitude uniform in [angle/2, angle] degrees, random sign.

    The lower bound keeps every draw away from the identity (0° would be label noise).
    """

    name = "rotate"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n = x.shape[0]
        a = self.p("angle")
        angles = _uniform(n, a / 2, a, g, x.device) * _signs(n, g, x.device)
        return rotate(x, angles.to(x.dtype)).clamp(0, 1)


@register
class Flip(Augmentation):
    """Mirror every image along ``direction`` (always: a flip with p=0.5 is label noise)."""

    name = "flip"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        return torch.flip(x, dims=[2] if self.params["direction"] == "vertical" else [3])


@register
class Crop(Augmentation):
    """Random resized crop (kornia): keep an area fraction in [min_scale, √min_scale] with a
    log-uniform aspect in [3/4, 4/3], then resize back to the full image."""

    name = "crop"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        lo = self.p("min_scale")
        scale = _uniform(n, lo, math.sqrt(lo), g, x.device)
        ratio = torch.exp(_uniform(n, math.log(3 / 4), math.log(4 / 3), g, x.device))
        ch = (torch.sqrt(scale * ratio) * h).clamp(2, h)
        cw = (torch.sqrt(scale / ratio) * w).clamp(2, w)
        top = torch.rand(n, generator=g, device=x.device) * (h - ch)
        left = torch.rand(n, generator=g, device=x.device) * (w - cw)
        x0, y0, x1, y1 = left, top, left + cw - 1, top + ch - 1
        boxes = torch.stack(
            [torch.stack([x0, y0], -1), torch.stack([x1, y0], -1),
             torch.stack([x1, y1], -1), torch.stack([x0, y1], -1)], dim=1
        ).to(x.dtype)
        return crop_and_resize(x, boxes, (h, w)).clamp(0, 1)


@register
class Blur(Augmentation):
    """Gaussian blur (kornia) with sigma = ``sigma`` × image side, over the whole image
    (``patch_size`` = 1) or inside one random square patch of that area."""

    name = "blur"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        sigma_px = max(0.3, self.p("sigma") * math.sqrt(h * w))
        k = 2 * math.ceil(3 * sigma_px) + 1
        k = min(k, 2 * ((min(h, w) - 1) // 2) + 1)
        sigma = torch.full((n, 2), sigma_px, device=x.device, dtype=x.dtype)
        blurred = gaussian_blur2d(x, (k, k), sigma, border_type="reflect")
        return _in_patch(x, blurred, self.p("patch_size"), g)


@register
class Noise(Augmentation):
    """Additive Gaussian noise of standard deviation ``std``, clamped to [0, 1], over the
    whole image (``patch_size`` = 1) or inside one random square patch of that area."""

    name = "noise"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype)
        return _in_patch(x, (x + self.p("std") * noise).clamp(0, 1), self.p("patch_size"), g)


@register
class Mask(Augmentation):
    """Zero a random fraction ``drop_rate`` of the pixels (all channels of a pixel)."""

    name = "mask"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        keep = torch.rand((n, 1, h, w), generator=g, device=x.device) >= self.p("drop_rate")
        return x * keep.to(x.dtype)


@register
class Invert(Augmentation):
    """Photographic negative: 1 - x."""

    name = "invert"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        return 1.0 - x


def _color_jitter(x: Tensor, strength: float, g: torch.Generator) -> Tensor:
    """Brightness, contrast (and for RGB saturation, hue) changes of magnitude in
    [strength/2, strength] with random signs, via kornia."""
    n, dev = x.shape[0], x.device

    def magnitude() -> Tensor:
        return _uniform(n, strength / 2, strength, g, dev) * _signs(n, g, dev)

    out = adjust_brightness(x, magnitude())
    out = adjust_contrast(out, (1 + magnitude()).clamp_min(0.05))
    if x.shape[1] == 3:
        out = adjust_saturation(out, (1 + magnitude()).clamp_min(0.0))
        out = adjust_hue(out, magnitude() * math.pi / 2)
    return out.clamp(0, 1)


@register
class Color(Augmentation):
    """Colour jitter of a fixed ``strength`` (see :func:`_color_jitter`)."""

    name = "color"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        return _color_jitter(x, self.p("strength"), g)


@register
class SimCLR(Augmentation):
    """SimCLR's composition (Chen et al., 2020): random resized crop (scale 0.08–1),
    horizontal flip (p=0.5), colour jitter of ``strength`` (p=0.8), greyscale (p=0.2, RGB),
    Gaussian blur (p=0.5). Each image gets its own draws."""

    name = "simclr"

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, c, h, w = x.shape
        dev = x.device

        def coin(p: float) -> Tensor:
            return (torch.rand(n, generator=g, device=dev) < p)[:, None, None, None]

        out = Crop(min_scale=0.08).transform(x, g)
        out = torch.where(coin(0.5), torch.flip(out, dims=[3]), out)
        out = torch.where(coin(0.8), _color_jitter(out, self.p("strength"), g), out)
        if c == 3:
            out = torch.where(coin(0.2), rgb_to_grayscale(out).expand(-1, 3, -1, -1), out)
        sigma = _uniform(n, 0.1, 2.0, g, dev) * math.sqrt(h * w) / 32
        k = min(2 * math.ceil(3 * float(sigma.max())) + 1, 2 * ((min(h, w) - 1) // 2) + 1)
        blurred = gaussian_blur2d(out, (k, k), sigma[:, None].expand(n, 2).to(x.dtype))
        return torch.where(coin(0.5), blurred, out).clamp(0, 1)


@register
class CutDiff(Augmentation):
    """Differentiable CutOut (method.md §3).

    Subtracts a smooth bump ``M = exp(-|d|² / (2·0.1))`` centred at a random point, where d is
    the pixel offset from the centre divided by the patch height/width, and clamps to [0, 1].
    Patch size and aspect are ``nn.Parameter`` s behind a sigmoid onto their log-ranges, so
    gradients reach them and no step can make them leave the range (a negative area is NaN).
    """

    name = "cutdiff"

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        spec = FAMILIES[self.name]
        self._bounds: dict[str, tuple[float, float]] = {}
        self._raw: dict[str, float] = {}
        for key in ("patch_size", "aspect"):
            p = spec.param(key)
            assert isinstance(p, FloatParam)
            lo, hi = math.log(p.low), math.log(p.high)
            self._bounds[key] = (lo, hi)
            frac = (math.log(self.p(key)) - lo) / (hi - lo)
            frac = min(max(frac, 1e-4), 1 - 1e-4)
            self._raw[key] = math.log(frac / (1 - frac))
        self.raw_patchsize = nn.Parameter(torch.tensor(self._raw["patch_size"]))
        self.raw_aspect = nn.Parameter(torch.tensor(self._raw["aspect"]))

    def _value(self, key: str) -> Tensor:
        lo, hi = self._bounds[key]
        raw = self.raw_patchsize if key == "patch_size" else self.raw_aspect
        return torch.exp(lo + (hi - lo) * torch.sigmoid(raw))

    @property
    def patch_size(self) -> Tensor:
        return self._value("patch_size")

    @property
    def aspect(self) -> Tensor:
        return self._value("aspect")

    def current_params(self) -> dict[str, ParamValue]:
        return {"patch_size": float(self.patch_size.detach()),
                "aspect": float(self.aspect.detach())}

    def transform(self, x: Tensor, g: torch.Generator) -> Tensor:
        n, _, h, w = x.shape
        dev = x.device
        size, aspect = self.patch_size, self.aspect
        ph = torch.sqrt(size * aspect) * h
        pw = torch.sqrt(size / aspect) * w
        cy = torch.rand(n, generator=g, device=dev) * h
        cx = torch.rand(n, generator=g, device=dev) * w
        ys = torch.arange(h, device=dev, dtype=x.dtype)[None, :, None] + 0.5 - cy[:, None, None]
        xs = torch.arange(w, device=dev, dtype=x.dtype)[None, None, :] + 0.5 - cx[:, None, None]
        d2 = (ys / ph) ** 2 + (xs / pw) ** 2
        bump = torch.exp(-d2 / (2 * 0.1))
        return (x - bump[:, None]).clamp(0, 1)


def changed_fraction(a: Tensor, b: Tensor, tol: float = 1.0 / 255) -> float:
    """Fraction of pixels (any channel) that differ by more than ``tol``."""
    return float(((a - b).abs().amax(dim=1) > tol).float().mean())


__all__ = [
    "REGISTRY",
    "Augmentation",
    "build_augmentation",
    "changed_fraction",
]
