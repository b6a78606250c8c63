"""PNG plots of a job, drawn in the API process with matplotlib (no torch).

Our own plots build their own Figure (no pyplot), so concurrent requests share no state.
The study plots (history, slice, importances) are Optuna's own matplotlib
visualisations of an in-memory study rebuilt from the job's stored trials; they draw
through pyplot, whose global state one lock serialises.
"""

from __future__ import annotations

import io
import math
import threading
import warnings
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display, ever

import matplotlib.pyplot as plt
import numpy as np
import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from service.jobs.threshold import Threshold
from ssad_common.search_space import FAMILIES, CategoricalParam, FloatParam

# The worker's study names the family parameter and each family's parameters this way
# (worker/core/study.py); the in-memory study mirrors it.
AUGMENTATION_KEY = "augmentation"
_PYPLOT = threading.Lock()
optuna.logging.set_verbosity(optuna.logging.WARNING)  # not a line per plot drawn

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


def _percent(x: float, _: object) -> str:
    return f"{100 * x:.3g}%"


def trials_png(trials: Sequence[tuple[int, str, dict[str, Any], float]],
               best: int | None) -> bytes:
    """Validation loss of every finished trial against its strength, one colour per
    family: patch size (log axis, in % of the image area) for the local families, the
    strength parameter's place in its range for the others (families without one at the
    left, marked n/a). A panel is drawn only when it has trials; the legend sits below."""
    local = [t for t in trials if strength(t[1], t[2])[0] == "patch_size"]
    other = [t for t in trials if strength(t[1], t[2])[0] != "patch_size"]
    panels = [kind for kind, rows in (("local", local), ("other", other)) if rows] or ["other"]
    fig = Figure(figsize=(5.5 * len(panels) + 1, 4.6), layout="constrained")
    axes = dict(zip(panels, np.atleast_1d(fig.subplots(1, len(panels), sharey=True)),
                    strict=True))
    families = sorted({t[1] for t in trials})
    colours = {f: f"C{i % 10}" for i, f in enumerate(families)}
    for number, family, params, loss in trials:
        name, where = strength(family, params)
        star = number == best
        style = {"color": colours[family], "s": 220 if star else 45,
                 "marker": "*" if star else "o", "edgecolors": "black" if star else "none",
                 "zorder": 3 if star else 2}
        if name == "patch_size":
            axes["local"].scatter([params["patch_size"]], [loss], **style)
        else:
            axes["other"].scatter([-0.1 if where is None else where], [loss], **style)
    if "local" in axes:
        ax = axes["local"]
        ax.set_xscale("log")
        sizes = [float(t[2]["patch_size"]) for t in local]
        ax.set_xlim(min(sizes) / 1.6, max(sizes) * 1.6)
        # Ticks at 1, 2 and 5 of every decade, as percentages: several labels even when
        # the trials span less than one decade.
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_percent))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("patch size (% of the image area, log scale)")
        ax.set_title("local augmentations: loss against patch size")
    if "other" in axes:
        ax = axes["other"]
        ax.set_xlabel("strength: place in the family's range (n/a: no strength)")
        ax.set_xlim(-0.2, 1.05)
        ax.set_xticks([-0.1, 0, 0.25, 0.5, 0.75, 1], ["n/a", "0", "0.25", "0.5", "0.75", "1"])
        ax.set_title("other augmentations")
    first = axes[panels[0]]
    first.set_ylabel("validation loss (lower is better)")
    for ax in axes.values():
        ax.grid(alpha=0.3)
    handles = [first.scatter([], [], color=colours[f], label=f) for f in families]
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=min(6, len(handles)),
                   title="family (★ = best trial)", frameon=False)
    if not trials:
        fig.suptitle("no finished trial yet")
    return _png(fig)


# ------------------------------------------------------------------- Optuna's plots


def _distributions(family: str) -> dict[str, optuna.distributions.BaseDistribution]:
    spec = FAMILIES.get(family)
    out: dict[str, optuna.distributions.BaseDistribution] = {}
    for p in spec.params if spec is not None else ():
        if isinstance(p, FloatParam) and p.searched:
            out[f"{family}.{p.name}"] = optuna.distributions.FloatDistribution(
                p.low, p.high, log=p.log)
        elif isinstance(p, CategoricalParam) and p.searched:
            out[f"{family}.{p.name}"] = optuna.distributions.CategoricalDistribution(
                list(p.choices))
    return out


def study_of(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> optuna.Study:
    """An in-memory Optuna study holding the job's finished trials, with the parameter
    names and distributions of the worker's study (``augmentation``, then
    ``<family>.<parameter>``)."""
    study = optuna.create_study(direction="minimize")
    families = sorted({t[1] for t in trials})
    for _, family, params, loss in sorted(trials):
        dists: dict[str, optuna.distributions.BaseDistribution] = {
            AUGMENTATION_KEY: optuna.distributions.CategoricalDistribution(families)}
        values: dict[str, Any] = {AUGMENTATION_KEY: family}
        for key, dist in _distributions(family).items():
            value = params.get(key.split(".", 1)[1])
            if value is not None and dist._contains(dist.to_internal_repr(value)):
                dists[key], values[key] = dist, value
        study.add_trial(optuna.trial.create_trial(params=values, distributions=dists,
                                                  value=float(loss)))
    return study


def _percent_log_axis(ax: Any) -> None:
    """A log x axis labelled at 1, 2 and 5 of each decade, in % (Optuna's own labels of a
    log axis that spans less than a decade overlap into one smudge)."""
    if ax.get_xscale() == "log":
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(_percent))
        ax.xaxis.set_minor_formatter(NullFormatter())


def _optuna_png(draw: Any, study: optuna.Study, title: str, **kwargs: Any) -> bytes:
    # rc_context: Optuna's functions switch the process-wide style to ggplot; undo that on
    # the way out, or every later plot of ours would be drawn in it too.
    with _PYPLOT, warnings.catch_warnings(), matplotlib.rc_context():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib API experimental
        try:
            result = draw(study, **kwargs)
            axes = list(np.atleast_1d(result).ravel())
            for ax in axes:
                _percent_log_axis(ax)
            fig = axes[0].get_figure()
            fig.set_size_inches(max(6.4, 3.6 * len(axes) + 1.5), 4.8)
            fig.suptitle(title)
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
            return buf.getvalue()
        finally:
            plt.close("all")


def history_png(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> bytes:
    """Optuna's optimisation history: each trial's loss and the best so far (the caller
    passes the trials the result is chosen among: the full-length ones)."""
    return _optuna_png(optuna.visualization.matplotlib.plot_optimization_history,
                       study_of(trials), "validation loss of each full-length trial, and the "
                       "lowest so far",
                       target_name="validation loss")


def patch_size_params(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> list[str]:
    """``<family>.patch_size`` for each local family among ``trials``."""
    return sorted({f"{t[1]}.patch_size" for t in trials if "patch_size" in t[2]
                   and f"{t[1]}.patch_size" in _distributions(t[1])})


def slice_png(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> bytes:
    """Optuna's slice plot over the patch size, one panel per local family (over every
    parameter when no local family was tried)."""
    params = patch_size_params(trials) or None
    return _optuna_png(optuna.visualization.matplotlib.plot_slice, study_of(trials),
                       "validation loss against patch size, per family" if params
                       else "validation loss against each parameter",
                       params=params, target_name="validation loss")


def importance_params(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> list[str]:
    """The parameters every trial has (importance is defined on those only): with several
    families that is the family alone, so importances need a one-family job."""
    study = study_of(trials)
    common = optuna.search_space.intersection_search_space(study.get_trials(deepcopy=False))
    return sorted(k for k, d in common.items() if not d.single())


def importances_png(trials: Sequence[tuple[int, str, dict[str, Any], float]]) -> bytes:
    """Optuna's hyperparameter importances (PED-ANOVA: no scikit-learn in the API)."""
    return _optuna_png(optuna.visualization.matplotlib.plot_param_importances,
                       study_of(trials), "what the validation loss depends on",
                       evaluator=optuna.importance.PedAnovaImportanceEvaluator(),
                       params=importance_params(trials), target_name="validation loss")


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


#: The plots of a study's trials, by name (GET /v1/jobs/{id}/plots/{name}).
STUDY_PLOTS = {"history": history_png, "slice": slice_png, "importances": importances_png}
