"""Objective landscapes: where does each objective's minimum lie against the true patch size?

For every injected-defect task (bench/tasks.py), the generating family is trained at each
patch size of a log grid, once with the fill that matches the defect and once with the
family's default fill, and every registered objective's loss and the AUROC are recorded
for every point. If an objective's minimum sits far from the true size, no search can
place the size; the fix then belongs in the objective or the working resolution.
Only here are labels read (AUROC).

    .venv/bin/python -m bench.landscape --out bench/results/landscape.json \
        --plot docs/img/landscape.png [--tasks a,b] [--steps 150] [--points 8]
    .venv/bin/python -m bench.landscape --report-only --out ... --plot ...

One training run per point is noisy. To see whether averaging seeds would place the
minimum, sweep the matched-fill curves again with other seeds and report them together:

    .venv/bin/python -m bench.landscape --seed 1 --matched-only --out landscape-seed1.json
    .venv/bin/python -m bench.landscape --seeds bench/results/landscape.json \
        landscape-seed1.json ...   # per curve: each seed's argmin and the mean's

Patches placed on the object (``placement: object``) instead of anywhere, against the
default, drawn as seed means:

    .venv/bin/python -m bench.landscape --placement object --seed N --matched-only \
        --out bench/results/landscape-object-seedN.json
    .venv/bin/python -m bench.landscape --seeds <anywhere runs> --against <object runs> \
        --plot docs/img/landscape-placement.png

Writes the JSON after each curve (a crash keeps what finished; --resume goes on from it).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from sklearn.metrics import roc_auc_score

from bench.tasks import Task, confirmation_injected_tasks, injected_tasks, within
from ssad_common.search_space import FloatParam, get_family
from worker.core.data import prepare
from worker.core.objectives import OBJECTIVES
from worker.core.training import TrainSettings
from worker.core.trial import run_trial

#: The defect's fill → the fill of the tuner's family that reproduces it (white: ``one``
#: since 2026-12-02; the runs before had none, and swept the random grey level instead).
MATCHED_FILL = {"black": "zero", "grey": "grey", "white": "one", "noise": "noise"}


def curves_for(task: Task, placement: str = "anywhere") -> list[tuple[str, str, dict[str, Any]]]:
    """(family, label, fixed params) of each curve to sweep for this task: the fill that
    matches the defect first, then another (CutOut: black, or grey against a black defect;
    the scar: its default, the pasted stripe), every one at ``placement`` (fixed, since the
    product's default changed; named in the label unless ``anywhere``, the runs' labels
    before the change)."""
    fam = task.truth["augmentation"]
    where = {"placement": placement}  # always fixed: the product's default has changed
    suffix = "" if placement == "anywhere" else f", placement={placement}"
    if "fill" not in task.truth:
        return [(fam, fam + suffix, where)]
    matched = MATCHED_FILL[task.truth["fill"]]
    if fam == "cutout":
        other = "zero" if matched != "zero" else "grey"
    else:
        other = str(get_family(fam).param("fill").default)
    return [(fam, f"{fam} fill={matched}{suffix} (matched)", {"fill": matched, **where}),
            (fam, f"{fam} fill={other}{suffix}", {"fill": other, **where})]


def is_matched(curve: dict[str, Any]) -> bool:
    """Whether a swept curve's fill matches the defect (a family without a fill: always)."""
    return "matched" in curve["curve"] or "fill" not in curve["curve"]


def sweep(task: Task, grid: np.ndarray, steps: int, seed: int, image_size: int | None,
          done: set[tuple[str, str]], save: Callable[[dict[str, Any]], None],
          which: int, placement: str = "anywhere") -> None:
    """Sweep curve number ``which`` of ``task`` (0: the matched fill) unless it is in
    ``done``, and ``save`` it as soon as it ends."""
    curves = curves_for(task, placement)[which:which + 1]
    if not curves or (task.name, curves[0][1]) in done:
        return
    data = prepare(task.train, task.test, torch.device("cpu"), image_size)
    settings = TrainSettings(steps=steps)
    for family, label, fixed in curves:
        points = []
        p = get_family(family).param("patch_size")
        for ps in grid:
            if isinstance(p, FloatParam) and not p.low <= ps <= p.high:
                continue  # outside the family's range (cutpaste-scar stops at 0.1)
            r = run_trial(data, family, {**fixed, "patch_size": float(ps)}, settings,
                          seed=seed)
            points.append({"patch_size": float(ps), "losses": r.losses,
                           "auroc": float(roc_auc_score(task.labels, r.scores)),
                           "total_s": r.timings["total_s"]})
        save({"task": task.name, "truth": task.truth, "family": family,
              "curve": label, "image_size": data.image_size, "points": points})


def argmin_ratio(curve: dict[str, Any], key: str) -> float:
    """patch size at the curve's minimum of ``key`` (an objective) / true size."""
    pts = curve["points"]
    best = min(pts, key=lambda p: p["losses"][key])
    return best["patch_size"] / curve["truth"]["patch_size"]


def report(curves: list[dict[str, Any]]) -> str:
    names = list(OBJECTIVES)
    lines = ["| task | curve | true size | best-AUROC size (AUROC) | "
             + " | ".join(f"{n}: argmin / true (AUROC there)" for n in names) + " |",
             "|" + "---|" * (4 + len(names))]
    for c in curves:
        pts = c["points"]
        true = c["truth"]["patch_size"]
        top = max(pts, key=lambda p: p["auroc"])
        cells = [c["task"], c["curve"], f"{true:.3f}",
                 f"{top['patch_size']:.3f} ({top['auroc']:.3f})"]
        for n in names:
            best = min(pts, key=lambda p: p["losses"][n])
            cells.append(f"{best['patch_size'] / true:.2f}× ({best['auroc']:.3f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seed_report(runs: list[list[dict[str, Any]]], objectives: list[str]) -> str:
    """The curves that every run swept, one row per curve and objective: where each seed's
    minimum lies against the true size, where the minimum of the loss averaged over the
    seeds lies, the AUROC there (the mean over the seeds), and the spread of the loss
    between seeds against the depth of the mean curve (its largest minus its smallest
    value)."""
    keyed = [{(c["task"], c["curve"]): c for c in run} for run in runs]
    common = [k for k in keyed[0] if all(k in other for other in keyed[1:])]
    lines = [f"{len(runs)} seeds; the curves all of them swept", "",
             "| task | curve | objective | argmin / true, each seed | argmin / true, mean "
             "of the seeds (mean AUROC there) | within 1.5× | best mean-AUROC size / true "
             "| seed spread / curve depth |", "|---|---|---|---|---|---|---|---|"]
    for key in common:
        curves = [k[key] for k in keyed]
        true = curves[0]["truth"]["patch_size"]
        sizes = [p["patch_size"] for p in curves[0]["points"]]
        if any([p["patch_size"] for p in c["points"]] != sizes for c in curves):
            raise ValueError(f"{key}: the runs swept different grids")
        auroc = np.mean([[p["auroc"] for p in c["points"]] for c in curves], axis=0)
        for name in objectives:
            loss = np.array([[p["losses"][name] for p in c["points"]] for c in curves])
            each = ", ".join(f"{sizes[int(np.argmin(row))] / true:.2f}" for row in loss)
            mean = loss.mean(axis=0)
            at = int(np.argmin(mean))
            ratio = sizes[at] / true
            spread = float(np.median(loss.std(axis=0, ddof=1)))
            depth = float(mean.max() - mean.min())
            lines.append(
                f"| {key[0]} | {key[1]} | {name} | {each} | {ratio:.2f}× ({auroc[at]:.3f}) | "
                f"{'yes' if within(sizes[at], true, 1.5) else 'no'} | "
                f"{sizes[int(np.argmax(auroc))] / true:.2f}× | {spread:.2g} / {depth:.2g} |")
    return "\n".join(lines)


def plot(curves: list[dict[str, Any]], path: Path, objectives: list[str]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(c["task"] for c in curves))
    fig, axes = plt.subplots(len(objectives) + 1, len(tasks),
                             figsize=(3.2 * len(tasks), 2.4 * (len(objectives) + 1)),
                             squeeze=False, sharex=True)
    for j, name in enumerate(tasks):
        for c in (c for c in curves if c["task"] == name):
            xs = [p["patch_size"] for p in c["points"]]
            style = "-o" if is_matched(c) else "--s"
            rows = [[p["losses"][o] for p in c["points"]] for o in objectives]
            rows.append([p["auroc"] for p in c["points"]])
            for i, ys in enumerate(rows):
                ax = axes[i][j]
                ax.plot(xs, ys, style, ms=3, label=c["curve"].replace(" (matched)", "*"))
                ax.axvline(c["truth"]["patch_size"], color="k", lw=0.8, ls=":")
                ax.set_xscale("log")
        axes[0][j].set_title(name, fontsize=9)
        axes[0][j].legend(fontsize=6)
        axes[-1][j].set_xlabel("patch size (area fraction)")
    for i, o in enumerate([*objectives, "AUROC (labels)"]):
        axes[i][0].set_ylabel(o, fontsize=8)
    fig.suptitle("Loss (lower = chosen) and AUROC against CutOut/scar patch size; "
                 "dotted: the true defect size; * = fill matched", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def _matched(run: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The curve of each task whose fill matches the defect (the scar's only curve)."""
    return {c["task"]: c for c in run if is_matched(c)}


def plot_seed_means(groups: dict[str, list[list[dict[str, Any]]]], path: Path,
                    objective: str) -> None:
    """Per task, the seed-mean ``objective`` loss and AUROC against patch size of each group
    of runs (e.g. two placements), with the seeds' range shaded: the matched curves only."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = {label: [_matched(run) for run in runs] for label, runs in groups.items()}
    tasks = [t for t in next(iter(per.values()))[0] if all(
        t in m for ms in per.values() for m in ms)]
    fig, axes = plt.subplots(2, len(tasks), figsize=(3.2 * len(tasks), 5.0), squeeze=False,
                             sharex=True)
    for j, task in enumerate(tasks):
        for label, ms in per.items():
            curves = [m[task] for m in ms]
            xs = [p["patch_size"] for p in curves[0]["points"]]
            for i, key in enumerate((objective, "auroc")):
                ys = np.array([[p["auroc"] if key == "auroc" else p["losses"][key]
                                for p in c["points"]] for c in curves])
                line, = axes[i][j].plot(xs, ys.mean(axis=0), "-o", ms=3,
                                        label=f"{label} ({len(curves)} seeds)")
                axes[i][j].fill_between(xs, ys.min(axis=0), ys.max(axis=0), alpha=0.15,
                                        color=line.get_color())
                if key != "auroc":
                    at = int(np.argmin(ys.mean(axis=0)))
                    axes[i][j].plot([xs[at]], [ys.mean(axis=0)[at]], "*", ms=11,
                                    color=line.get_color())
        for i in range(2):
            axes[i][j].axvline(curves[0]["truth"]["patch_size"], color="k", lw=0.8, ls=":")
            axes[i][j].set_xscale("log")
        axes[0][j].set_title(task, fontsize=9)
        axes[1][j].set_xlabel("patch size (area fraction)")
    axes[0][0].set_ylabel(f"{objective} loss (seed mean; * = its minimum)", fontsize=8)
    axes[1][0].set_ylabel("AUROC (labels; seed mean)", fontsize=8)
    axes[0][0].legend(fontsize=7)
    fig.suptitle("The generating family at the matched fill, swept over patch size; dotted: "
                 "the true defect size; shaded: the seeds' range", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None,
                    help="default: bench/results/landscape[-object][-seedN].json, by "
                    "--placement and --seed (the committed runs' names)")
    ap.add_argument("--plot", default=None,
                    help="default: docs/img/landscape.png for the default sweep (anywhere, "
                    "seed 0), docs/img/landscape-placement.png with --against, else none")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: the "
                    "development injected tasks)")
    ap.add_argument("--confirmation", action="store_true",
                    help="sweep the confirmation injected tasks instead (only after every "
                    "design decision is taken)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--low", type=float, default=0.005)
    ap.add_argument("--high", type=float, default=0.3)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--placement", default="anywhere", choices=["anywhere", "object"],
                    help="where the local families put their patch (search_space.py)")
    ap.add_argument("--objectives", default="dsv,st-ssad,mmd")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the curves already in --out and sweep only the missing ones")
    ap.add_argument("--matched-only", action="store_true",
                    help="sweep only the curve whose fill matches the defect")
    ap.add_argument("--seeds", nargs="+", type=Path, metavar="RESULTS",
                    help="report the runs of several seeds together (no training)")
    ap.add_argument("--against", nargs="+", type=Path, metavar="RESULTS",
                    help="with --seeds: the runs of another setting (e.g. --placement "
                    "object), reported too and drawn against --seeds in --plot")
    ap.add_argument("--labels", default="anywhere,object",
                    help="with --against: the two groups' names in the plot")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    placed = args.placement != "anywhere"
    out = Path(args.out or "bench/results/landscape{}{}.json".format(
        "-object" if placed else "", f"-seed{args.seed}" if args.seed or placed else ""))
    plot_to = args.plot or (None if placed or args.seed else "docs/img/landscape.png")
    objectives = [o for o in args.objectives.split(",") if o]
    curves: list[dict[str, Any]] = []
    if args.seeds:
        groups = {"": [json.loads(f.read_text())["curves"] for f in args.seeds]}
        if args.against:
            first, second = args.labels.split(",")
            groups = {first: groups[""],
                      second: [json.loads(f.read_text())["curves"] for f in args.against]}
            plot_seed_means(groups, Path(args.plot or "docs/img/landscape-placement.png"),
                            objectives[0])
        for label, runs in groups.items():
            print(f"## {label}" if label else "", seed_report(runs, objectives), sep="\n")
        return 0
    if args.report_only:
        curves = json.loads(out.read_text())["curves"]
    else:
        wanted = set(filter(None, args.tasks.split(",")))
        pool = confirmation_injected_tasks() if args.confirmation else injected_tasks()
        tasks = [t for t in pool if not wanted or t.name in wanted]
        grid = np.geomspace(args.low, args.high, args.points)
        meta = {"command": "python -m bench.landscape " + " ".join(argv or sys.argv[1:]),
                "machine": f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} torch threads, torch "
                           f"{torch.__version__}",
                "steps": args.steps, "grid": grid.tolist(), "seed": args.seed,
                "matched_only": args.matched_only, "placement": args.placement}
        if args.resume and out.exists():
            saved = json.loads(out.read_text())
            if saved["meta"].get("placement", "anywhere") != args.placement:
                ap.error(f"{out} holds placement {saved['meta'].get('placement', 'anywhere')}"
                         f", not {args.placement}: give another --out")
            curves = saved["curves"]
        out.parent.mkdir(parents=True, exist_ok=True)

        def save(curve: dict[str, Any]) -> None:
            curves.append(curve)
            out.write_text(json.dumps({"meta": meta, "curves": curves}, indent=1))
            print(f"# {curve['task']} / {curve['curve']}: done", flush=True)

        done = {(c["task"], c["curve"]) for c in curves}
        for which in (0,) if args.matched_only else (0, 1):  # matched fills first
            for task in tasks:
                sweep(task, grid, args.steps, args.seed, args.image_size, done, save, which,
                      args.placement)
    if plot_to:
        plot(curves, Path(plot_to), objectives)
    print(report(curves))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
