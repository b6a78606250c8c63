"""Validation losses (method.md §4): lower is better; all are differentiable torch functions.

X = embeddings of clean train images, Y = of augmented train images, Z = of test images,
all L2-normalised rows from the same trained detector. Objectives are looked up by name only
through :data:`OBJECTIVES`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ssad_common.jobspec import DEFAULT_OBJECTIVE
from ssad_common.search_space import OBJECTIVE_NAMES, augmented_count

EPS = 1e-8


def mean_distance(a: Tensor, b: Tensor) -> Tensor:
    """D(A, B): mean over all pairs of ||a - b||₂ / 2 (in [0, 1] for unit vectors)."""
    return torch.cdist(a, b).mean() / 2


def discordance(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """DSV's first term: D(X ∪ Y, Z) / D(X, Y).

    The ratio keeps the loss from being lowered by collapsing every embedding together.
    """
    return mean_distance(torch.cat([x, y]), z) / (mean_distance(x, y) + EPS)


def separability(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """DSV's second term: spread of test points along the train→augmented directions.

    With x̄ = mean(X) and u_k the unit vector from x̄ to y_k, every (z - x̄) is projected
    onto every u_k; S = std(projections) / D(X, Y).
    """
    centre = x.mean(dim=0, keepdim=True)
    directions = torch.nn.functional.normalize(y - centre, dim=1)
    projections = (z - centre) @ directions.T
    return projections.std() / (mean_distance(x, y) + EPS)


def dsv(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """DSV (ECML PKDD 2023): L_dis − min(S, 0.5) / L_dis."""
    l_dis = discordance(x, y, z)
    return l_dis - torch.clamp(separability(x, y, z), max=0.5) / (l_dis + EPS)


def st_ssad_mean_distance(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Our reading of ST-SSAD's loss (KDD 2025) from its description; not the published
    equation, which we do not have.

    Embeddings are centred on the mean of X ∪ Z and rescaled so that X ∪ Z has mean squared
    norm 1 (Y is left out of the normalisation so an augmentation cannot lower the loss by
    landing far away). Each test embedding is then compared with the train mean and with
    the augmented mean, and the loss is the mean over Z of the squared distance to the
    nearer of the two. Only Y's mean enters, so the loss does not depend on |Y|.
    """
    pooled = torch.cat([x, z])
    centre = pooled.mean(dim=0, keepdim=True)
    scale = ((pooled - centre) ** 2).sum(dim=1).mean().clamp_min(EPS).sqrt()
    xs, ys, zs = ((t - centre) / scale for t in (x, y, z))
    to_train = ((zs - xs.mean(dim=0)) ** 2).sum(dim=1)
    to_augmented = ((zs - ys.mean(dim=0)) ** 2).sum(dim=1)
    return torch.minimum(to_train, to_augmented).mean()


def energy_distance(a: Tensor, b: Tensor) -> Tensor:
    """Energy distance 2·D(A, B) − D(A, A) − D(B, B): zero when A and B are the same
    sample, unlike D itself, which also counts each set's own spread."""
    return 2 * mean_distance(a, b) - mean_distance(a, a) - mean_distance(b, b)


def far_tail(x: Tensor, y: Tensor, z: Tensor, contamination: float | None = None) -> Tensor:
    """The test embeddings farthest from the train mean, r·|Z| of them (at least 2), with r
    the expected anomaly fraction: ``contamination`` when the caller passes it, else read
    back from the sizes Y was drawn with (|Y| = |X|·r/(1 − r), so r = |Y| / (|X| + |Y|),
    exact up to rounding). The user's parameter either way, never a label."""
    r = len(y) / (len(x) + len(y)) if contamination is None else contamination
    k = min(len(z), max(2, round(r * len(z))))
    centre = x.mean(dim=0, keepdim=True)
    return z[torch.topk(((z - centre) ** 2).sum(dim=1), k).indices]


def tail_energy(x: Tensor, y: Tensor, z: Tensor, contamination: float | None = None
                ) -> Tensor:
    """How well the augmented set matches the test set's tail: energy distance from Y to
    the r·|Z| test embeddings farthest from the train mean (:func:`far_tail`), over that
    from X to them.

    The whole test set is mostly normal, so DSV's terms are dominated by normals; this
    looks only where the anomalies should be. Below 1: Y resembles the tail better than the
    normals do. The ratio is scale-free, so the loss compares across detectors. On
    constructed embeddings a Y that overshoots the tail (too strong an augmentation) and
    one that stops short of it (too weak) both score worse than one on it; on trained
    detectors the overshoot is punished but the curve is flat below the defect's size, so
    its minimum tends to the small patches (docs/benchmarks.md §7, eleventh round).
    """
    tail = far_tail(x, y, z, contamination)
    return energy_distance(y, tail) / (energy_distance(x, tail) + EPS)


def distance_only(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Baseline: D(X ∪ Y, Z) alone (no ratio)."""
    return mean_distance(torch.cat([x, y]), z)


def linear_mmd(x: Tensor, y: Tensor, z: Tensor) -> Tensor:
    """Baseline: linear-kernel MMD² between X ∪ Y and Z, ||mean(X ∪ Y) − mean(Z)||²."""
    return ((torch.cat([x, y]).mean(dim=0) - z.mean(dim=0)) ** 2).sum()


@dataclass(frozen=True)
class Objective:
    name: str
    fn: Callable[..., Tensor]
    description: str
    #: Whether ``fn`` takes the contamination r (``contamination=``); it then reads r back
    #: from |Y| / (|X| + |Y|) when the caller does not pass it.
    uses_contamination: bool = False

    def __call__(self, x: Tensor, y: Tensor, z: Tensor,
                 contamination: float | None = None) -> Tensor:
        """The loss; ``contamination``: the r that sized Y, for a caller whose Y is not
        |X|·r/(1 − r) (the end-to-end strategy's floor of 32); ignored by the objectives
        that do not use r."""
        if min(len(x), len(y), len(z)) == 0:
            raise ValueError(f"{self.name}: X, Y and Z must each hold at least one embedding")
        if self.uses_contamination:
            return self.fn(x, y, z, contamination=contamination)
        return self.fn(x, y, z)


OBJECTIVES: dict[str, Objective] = {
    o.name: o
    for o in (
        Objective("dsv", dsv, "DSV: discordance minus capped separability (the default)"),
        Objective("dsv-discordance", discordance, "DSV's discordance ratio alone"),
        Objective("st-ssad", st_ssad_mean_distance,
                  "our reading of ST-SSAD's mean-distance loss (not the published equation)"),
        Objective("mean-distance", distance_only, "D(X ∪ Y, Z) alone"),
        Objective("mmd", linear_mmd, "linear-kernel MMD between X ∪ Y and Z"),
        Objective("tail-energy", tail_energy,
                  "energy distance from Y to the test set's far tail, relative to X's",
                  uses_contamination=True),
    )
}



if tuple(OBJECTIVES) != OBJECTIVE_NAMES:  # the API validates against the torch-free list
    raise RuntimeError("ssad_common.search_space.OBJECTIVE_NAMES is out of date")

__all__ = ["DEFAULT_OBJECTIVE", "OBJECTIVES", "Objective", "augmented_count", "get_objective"]


def get_objective(name: str) -> Objective:
    try:
        return OBJECTIVES[name]
    except KeyError:
        raise ValueError(f"unknown objective {name!r}; known: {sorted(OBJECTIVES)}") from None
