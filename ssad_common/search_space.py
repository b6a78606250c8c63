"""Augmentation families and their search spaces, as plain data.

This module must never import torch: the API validates job requests with it (the API process
stays torch-free), and the worker builds its Optuna search space from it. The tensor
implementations live in :mod:`worker.core.augmentations` and are looked up by the same names.

Conventions shared by every family:

* ``patch_size`` is the patch *area* as a fraction of the image area (resolution-free), and is
  searched on a log scale. ``aspect`` is the patch's height / width.
* A family's hyperparameters are either searched by the study (``searched=True``) or held at
  their default unless the caller sets them explicitly.
* Every family must change every image it is given (a pseudo-anomaly identical to a normal
  image is label noise), so magnitudes are drawn away from the identity. The one exception
  is a constant fill on its own colour (black on a black background, a small white patch
  centred on a white stroke): the fill is searched for that reason.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from ssad_common.jobspec import ObjectiveName, ScorerName

ParamValue = float | str


@dataclass(frozen=True)
class FloatParam:
    """A continuous hyperparameter with inclusive bounds."""

    name: str
    low: float
    high: float
    default: float
    log: bool = False
    searched: bool = True
    doc: str = ""

    def check(self, value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        v = float(value)
        if not math.isfinite(v) or not (self.low <= v <= self.high):
            raise ValueError(f"{self.name}={value!r} is outside [{self.low}, {self.high}]")
        return v


@dataclass(frozen=True)
class CategoricalParam:
    """A categorical hyperparameter."""

    name: str
    choices: tuple[str, ...]
    default: str
    searched: bool = True
    doc: str = ""

    def check(self, value: Any) -> str:
        if value not in self.choices:
            raise ValueError(f"{self.name}={value!r} is not one of {list(self.choices)}")
        return str(value)


Param = FloatParam | CategoricalParam

#: Bounds any ``patch_size`` range in a request must fall within.
PATCH_SIZE_BOUNDS = (0.001, 1.0)


def _patch(low: float = 0.005, high: float = 0.5, default: float = 0.05) -> FloatParam:
    return FloatParam(
        "patch_size", low, high, default, log=True, doc="patch area as a fraction of image area"
    )


def _placement() -> CategoricalParam:
    return CategoricalParam(
        "placement", ("anywhere", "object"), "object", searched=False,
        doc="where the patch goes: object (the default): centred on a pixel "
        "drawn in proportion to how far it is from the image's background (the median of its "
        "border), so that patches land on the object (on a digit: on its strokes; on an "
        "image with no background to speak of, nearly uniformly); anywhere: uniformly over "
        "the image")


def _aspect(
    low: float = 0.3, high: float = 3.3, default: float = 1.0, searched: bool = False
) -> FloatParam:
    return FloatParam(
        "aspect", low, high, default, log=True, searched=searched, doc="patch height / width"
    )


@dataclass(frozen=True)
class FamilySpec:
    """One augmentation family: its name, kind and hyperparameters."""

    name: str
    kind: Literal["local", "global"]
    description: str
    params: tuple[Param, ...] = ()
    differentiable: bool = False

    def param(self, name: str) -> Param:
        for p in self.params:
            if p.name == name:
                return p
        raise KeyError(name)

    @property
    def defaults(self) -> dict[str, ParamValue]:
        return {p.name: p.default for p in self.params}

    @property
    def has_patch_size(self) -> bool:
        return any(p.name == "patch_size" for p in self.params)

    def validate(self, params: Mapping[str, Any] | None) -> dict[str, ParamValue]:
        """Return the full parameter dict (defaults filled in), or raise ``ValueError``."""
        params = dict(params or {})
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {unknown} for augmentation {self.name!r}; "
                f"known: {sorted(known)}"
            )
        out: dict[str, ParamValue] = {}
        for p in self.params:
            out[p.name] = p.check(params[p.name]) if p.name in params else p.default
        return out


FAMILIES: dict[str, FamilySpec] = {
    f.name: f
    for f in (
        FamilySpec(
            "cutout",
            "local",
            "Fill a random rectangle with a constant or with noise.",
            (
                _patch(),
                _aspect(),
                CategoricalParam(
                    "fill",
                    ("zero", "mean", "grey", "noise", "one"),
                    "grey",
                    doc="zero: black; mean: the image's mean; grey: a random grey level per "
                    "image; noise: uniform noise per pixel; one: white",
                ),
                _placement(),
            ),
        ),
        FamilySpec(
            "cutpaste",
            "local",
            "Copy a rectangle from one place of the image and paste it at another, with a "
            "small brightness/contrast jitter of the pasted patch.",
            (
                _patch(default=0.06),
                _aspect(),
                FloatParam("jitter", 0.0, 0.5, 0.1, searched=False, doc="colour jitter"),
                _placement(),
            ),
        ),
        FamilySpec(
            "cutpaste-scar",
            "local",
            "Cut-paste of a thin, long, randomly rotated stripe (a scar), or a stripe painted "
            "black or white (a scratch).",
            (
                _patch(0.002, 0.1, 0.01),
                FloatParam(
                    "aspect", 3.0, 20.0, 8.0, log=True, searched=False,
                    doc="scar length / width",
                ),
                CategoricalParam(
                    "fill", ("paste", "zero", "one"), "paste",
                    doc="paste: the stripe's content copied from elsewhere in the image and "
                    "jittered (CutPaste's scar); zero: a black stripe; one: a white stripe "
                    "(a scratch that catches or swallows the light)",
                ),
                _placement(),
            ),
        ),
        FamilySpec(
            "rotate",
            "global",
            "Rotation by a random angle of magnitude in [angle/2, angle] and random sign.",
            (FloatParam("angle", 10.0, 180.0, 90.0, doc="largest rotation, degrees"),),
        ),
        FamilySpec(
            "flip",
            "global",
            "Mirror the image (always, never the identity).",
            (
                CategoricalParam(
                    "direction", ("vertical", "horizontal"), "vertical", doc="flip axis"
                ),
            ),
        ),
        FamilySpec(
            "crop",
            "global",
            "Random resized crop keeping a fraction in [min_scale, sqrt(min_scale)] of the "
            "area, resized back to the full image.",
            (FloatParam("min_scale", 0.08, 0.8, 0.3, log=True, doc="smallest kept area"),),
        ),
        FamilySpec(
            "blur",
            "local",
            "Gaussian blur of the whole image (patch_size=1) or inside a patch.",
            (
                FloatParam(
                    "sigma", 0.01, 0.15, 0.04, log=True,
                    doc="blur sigma as a fraction of the image side",
                ),
                FloatParam(
                    "patch_size", 0.005, 1.0, 1.0, log=True, searched=False,
                    doc="blurred area fraction; 1 = whole image",
                ),
            ),
        ),
        FamilySpec(
            "noise",
            "local",
            "Additive Gaussian noise on the whole image (patch_size=1) or inside a patch.",
            (
                FloatParam("std", 0.02, 0.5, 0.1, log=True, doc="noise standard deviation"),
                FloatParam(
                    "patch_size", 0.005, 1.0, 1.0, log=True, searched=False,
                    doc="noisy area fraction; 1 = whole image",
                ),
            ),
        ),
        FamilySpec(
            "mask",
            "global",
            "Zero a random fraction of the pixels.",
            (FloatParam("drop_rate", 0.01, 0.5, 0.1, log=True, doc="fraction of pixels"),),
        ),
        FamilySpec("invert", "global", "Photographic negative, 1 - x."),
        FamilySpec(
            "color",
            "global",
            "Brightness and contrast (and saturation and hue for RGB) changes, each of "
            "magnitude in [strength/2, strength] with a random sign.",
            (FloatParam("strength", 0.05, 0.8, 0.3, log=True, doc="jitter strength"),),
        ),
        FamilySpec(
            "simclr",
            "global",
            "SimCLR's mix: resized crop, horizontal flip, colour jitter, greyscale, blur.",
            (FloatParam("strength", 0.1, 1.0, 0.5, doc="colour jitter strength"),),
        ),
        FamilySpec(
            "cutdiff",
            "local",
            "Differentiable CutOut: subtract a smooth Gaussian bump M = exp(-|d|^2 / 0.2), "
            "d the pixel offset from the patch centre over the patch height/width.",
            (_patch(), _aspect()),
            differentiable=True,
        ),
    )
}

#: Families searched when a request names none: every family except the differentiable
#: CutOut, which exists for the end-to-end tuner (it can still be named explicitly).
DEFAULT_AUGMENTATIONS: tuple[str, ...] = tuple(n for n in FAMILIES if n != "cutdiff")

#: The fixed "no tuning" baseline: CutPaste at (the middle of) its paper's defaults.
CUTPASTE_DEFAULT: tuple[str, dict[str, ParamValue]] = (
    "cutpaste",
    {"patch_size": 0.06, "aspect": 1.0, "jitter": 0.1, "placement": "anywhere"},
)


def get_family(name: str) -> FamilySpec:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(
            f"unknown augmentation {name!r}; known: {sorted(FAMILIES)}"
        ) from None


@dataclass(frozen=True)
class SearchSpace:
    """What a study searches: which families, and an optional override of patch_size's range.

    ``patch_size`` (if given) narrows the ``patch_size`` range of every family that has a
    searched patch size to its intersection with the family's own range (an empty
    intersection is an error). Families whose patch size is not searched (blur, noise: whole image
    by default) keep it fixed.
    """

    augmentations: tuple[str, ...] = DEFAULT_AUGMENTATIONS
    patch_size: tuple[float, float] | None = None
    fixed: Mapping[str, Mapping[str, ParamValue]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.augmentations:
            raise ValueError("search_space.augmentations must name at least one family")
        if len(set(self.augmentations)) != len(self.augmentations):
            raise ValueError("search_space.augmentations has duplicates")
        for name in self.augmentations:
            get_family(name)
        if self.patch_size is not None:
            lo, hi = self.patch_size
            blo, bhi = PATCH_SIZE_BOUNDS
            if not (blo <= lo <= hi <= bhi):
                raise ValueError(
                    f"search_space.patch_size must be [min, max] with "
                    f"{blo} <= min <= max <= {bhi}, got {list(self.patch_size)}"
                )
            for name in self.augmentations:
                spec = get_family(name)
                p = next((q for q in spec.params if q.name == "patch_size"), None)
                if isinstance(p, FloatParam) and p.searched:
                    plo, phi = self._patch_range(p)
                    if plo > phi:
                        raise ValueError(
                            f"search_space.patch_size {[lo, hi]} does not overlap the range "
                            f"of {name!r}, [{p.low}, {p.high}]"
                        )
        for name, params in self.fixed.items():
            if name not in self.augmentations:
                raise ValueError(f"fixed parameters given for {name!r}, which is not searched")
            get_family(name).validate(params)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> SearchSpace:
        """Build from the JSON shape ``{augmentations: [...], patch_size: [min, max]}``."""
        if data is None:
            return cls()
        unknown = sorted(set(data) - {"augmentations", "patch_size", "fixed"})
        if unknown:
            raise ValueError(f"unknown search_space field(s) {unknown}")
        augs = data.get("augmentations")
        ps = data.get("patch_size")
        if ps is not None:
            if not isinstance(ps, Sequence) or len(ps) != 2:
                raise ValueError("search_space.patch_size must be a list [min, max]")
            ps = (float(ps[0]), float(ps[1]))
        return cls(
            augmentations=tuple(augs) if augs is not None else DEFAULT_AUGMENTATIONS,
            patch_size=ps,
            fixed={k: dict(v) for k, v in (data.get("fixed") or {}).items()},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"augmentations": list(self.augmentations)}
        if self.patch_size is not None:
            out["patch_size"] = list(self.patch_size)
        if self.fixed:
            out["fixed"] = {k: dict(v) for k, v in self.fixed.items()}
        return out

    def _patch_range(self, p: FloatParam) -> tuple[float, float]:
        """The requested patch_size range intersected with the family's own range."""
        assert self.patch_size is not None
        return max(p.low, self.patch_size[0]), min(p.high, self.patch_size[1])

    def searched_params(self, family: str) -> list[Param]:
        """The hyperparameters of ``family`` that the study samples, with ranges applied."""
        spec = get_family(family)
        fixed = self.fixed.get(family, {})
        out: list[Param] = []
        for p in spec.params:
            if not p.searched or p.name in fixed:
                continue
            if p.name == "patch_size" and self.patch_size is not None and isinstance(
                p, FloatParam
            ):
                lo, hi = self._patch_range(p)
                p = FloatParam(p.name, lo, hi, min(max(p.default, lo), hi), log=True, doc=p.doc)
            out.append(p)
        return out

    def searches_number(self, family: str) -> bool:
        """Does the study sample a number (patch size, angle...) for ``family``?"""
        return any(isinstance(p, FloatParam) for p in self.searched_params(family))

    def variants(self, family: str) -> list[dict[str, str]]:
        """Every combination of ``family``'s searched choices (fill, direction) but its
        defaults, in the choices' order: what a screen tries besides the defaults."""
        cats = [p for p in self.searched_params(family) if isinstance(p, CategoricalParam)]
        combos = [dict(zip((p.name for p in cats), values, strict=True))
                  for values in itertools.product(*(p.choices for p in cats))]
        default = {p.name: p.default for p in cats}
        return [c for c in combos if c != default]

    def screen_choices(self) -> dict[str, int]:
        """How many combinations of its searched choices besides its defaults each family
        has (:meth:`variants`): what a screen covers first."""
        return {f: len(self.variants(f)) for f in self.augmentations}

    def screen_capacity(self) -> dict[str, float]:
        """How many configurations besides its defaults each family can screen: the other
        combinations of its searched choices, or no limit (``math.inf``) when it searches a
        number (patch size, angle...: drawn at random)."""
        return {f: math.inf if self.searches_number(f) else len(self.variants(f))
                for f in self.augmentations}

    def complete(self, family: str, sampled: Mapping[str, ParamValue]) -> dict[str, ParamValue]:
        """Defaults, then fixed values, then sampled values: the params a trial runs with."""
        spec = get_family(family)
        params = spec.defaults
        params.update(self.fixed.get(family, {}))
        params.update(sampled)
        return params


def describe() -> list[dict[str, Any]]:
    """Every family and its parameters as JSON-ready dicts (for the API and the docs)."""
    out = []
    for f in FAMILIES.values():
        params = []
        for p in f.params:
            d: dict[str, Any] = {"name": p.name, "default": p.default, "searched": p.searched,
                                 "doc": p.doc}
            if isinstance(p, FloatParam):
                d.update(type="float", low=p.low, high=p.high, log=p.log)
            else:
                d.update(type="categorical", choices=list(p.choices))
            params.append(d)
        out.append({"name": f.name, "kind": f.kind, "description": f.description,
                    "differentiable": f.differentiable, "params": params})
    return out


# ------------------------------------------------------------------ objectives and scorers
# Names only (the implementations need torch and live in worker.core); the API validates
# requests against these, and a test checks they match the worker's registries.

OBJECTIVE_NAMES: tuple[str, ...] = get_args(ObjectiveName)
SCORER_NAMES: tuple[str, ...] = get_args(ScorerName)
#: |X|: at most this many train images form the loss's X and the scorer's fit
#: (``TrainSettings.max_embed_train``'s default).
MAX_EMBED_TRAIN = 2000


def augmented_count(n_train: int, contamination: float) -> int:
    """|Y| = |X| · r / (1 − r) (at least 1), with r the expected anomaly fraction of the test
    set. r is the user's parameter: it is never computed from labels. Torch-free, so the
    API can bound a job's |Y| before queueing it."""
    if not 0.0 < contamination < 1.0:
        raise ValueError(f"contamination must be in (0, 1), got {contamination}")
    return max(1, round(n_train * contamination / (1.0 - contamination)))


def auto_image_size(height: int, width: int) -> int:
    """The working size, from the train images' size: every image, train and test, is
    resized to working size x working size before training (32 for inputs up to 40 px,
    64 up to 96 px, else 128). Plain data so the API can say it when a job is created."""
    side = max(height, width)
    if side <= 40:
        return 32
    if side <= 96:
        return 64
    return 128
