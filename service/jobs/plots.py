"""PNG pictures of a job, drawn in the API process with matplotlib (no torch, no pyplot:
each call builds its own Figure, so concurrent requests do not share state)."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from service.jobs.threshold import Threshold
from worker.search_space import FAMILIES, FloatParam

DPI = 100


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    return buf.getvalue()


def strength(family: str, params: dict[str, Any]) -> tuple[str | None, float | None]:
    """The family's strength parameter (patch size for local families, else its first
    searched number) and where ``params`` puts it in the family's range, in [0, 1]
    (log-scaled when the parameter is searched on a log scale)."""
    spec = FAMILIES.get(family)
    if spec is None:
        return None, None
    floats = [p for p in spec.params if isinstance(p, FloatParam) and p.searched]
    if not floats:
        return None, None
    p = next((f for f in floats if f.name == "patch_size"), floats[0])
    value = params.get(p.name)
    if not isinstance(value, int | float):
        return p.name, None
    if p.log:
        lo, hi, v = math.log(p.low), math.log(p.high), math.log(max(float(value), p.low))
    else:
        lo, hi, v = p.low, p.high, float(value)
    return p.name, 0.0 if hi == lo else (v - lo) / (hi - lo)


def trials_png(trials: Sequence[tuple[int, str, dict[str, Any], float]],
               chosen: int | None) -> bytes:
    """Validation loss of every finished trial against its strength, one colour per
    family: patch size (log axis) for the local families, the strength parameter's place
    in its range for the others (families without one at the left, marked n/a)."""
    fig = Figure(figsize=(11, 4.2))
    local_ax, other_ax = fig.subplots(1, 2, sharey=True)
    families = sorted({t[1] for t in trials})
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for number, family, params, loss in trials:
        name, where = strength(family, params)
        star = number == chosen
        style = {"color": colours[family], "s": 160 if star else 40,
                 "marker": "*" if star else "o", "edgecolors": "black" if star else "none",
                 "zorder": 3 if star else 2}
        if name == "patch_size":
            local_ax.scatter([params["patch_size"]], [loss], **style)
        else:
            other_ax.scatter([-0.1 if where is None else where], [loss], **style)
    local_ax.set_xscale("log")
    local_ax.xaxis.set_minor_formatter(NullFormatter())  # major decades only: no overlaps
    local_ax.set_xlabel("patch size (fraction of the image area)")
    local_ax.set_ylabel("validation loss (lower is better)")
    local_ax.set_title("local augmentations")
    other_ax.set_xlabel("strength: place in the family's range (n/a: none)")
    other_ax.set_xlim(-0.2, 1.05)
    other_ax.set_xticks([-0.1, 0, 0.5, 1], ["n/a", "0", "0.5", "1"])
    other_ax.set_title("other augmentations")
    for ax in (local_ax, other_ax):
        ax.grid(alpha=0.3)
    handles = [other_ax.scatter([], [], color=colours[f], label=f) for f in families]
    if handles:
        fig.legend(handles=handles, loc="center left", bbox_to_anchor=(1.0, 0.5),
                   title="family (★ chosen)")
    if not trials:
        fig.suptitle("no finished trial yet")
    return _png(fig)


def scores_png(scores: np.ndarray, rules: dict[str, Threshold], suggested: str) -> bytes:
    """Histogram of the test scores with each rule's threshold."""
    fig = Figure(figsize=(8, 4.2))
    ax = fig.subplots()
    ax.hist(scores, bins=min(60, max(10, len(scores) // 5)), color="0.6")
    for i, (name, t) in enumerate(rules.items()):
        ax.axvline(t.threshold, color=f"C{i + 3}", linestyle="-" if name == suggested else "--",
                   label=f"{name}{' (suggested)' if name == suggested else ''}: "
                         f"{t.threshold:.4g}, {t.n_flagged} flagged")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("test images")
    ax.set_title(f"scores of {len(scores)} test images")
    ax.legend()
    return _png(fig)


def top_png(images: np.ndarray, items: Sequence[tuple[int, str, float]],
            columns: int = 8) -> bytes:
    """The given test images (uint8 (N, C, H, W)) with their names and scores, most
    anomalous first."""
    n = max(1, len(items))
    rows = math.ceil(n / columns)
    cols = min(columns, n)
    fig = Figure(figsize=(1.7 * cols, 1.95 * rows))
    axes = np.atleast_1d(fig.subplots(rows, cols)).ravel()
    for ax in axes:
        ax.axis("off")
    for ax, (index, name, score) in zip(axes, items, strict=False):
        img = images[index]
        if img.shape[0] == 1:
            ax.imshow(img[0], cmap="gray", vmin=0, vmax=255)
        else:
            ax.imshow(np.moveaxis(img, 0, -1))
        label = name if len(name) <= 18 else "…" + name[-17:]
        ax.set_title(f"{label}\n{score:.4g}", fontsize=8)
    return _png(fig)
