"""Engine benchmark: how well does label-free selection work on real images?

For every task, the product's own study runs (seeded TPE, warm start = one trial per family
at its defaults, then TPE guided by the default objective). Every trial records the value of
every registered objective on the same embeddings, so each objective's *selection* is the
argmin of its loss over the same set of trials. Only here are labels read, to compute AUROC.

    .venv/bin/python -m bench.engine --out bench/results/engine.json [--tasks a,b] [--steps N]

Writes the JSON after each task (a crash keeps what finished) and prints a Markdown report.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import torch
from scipy.stats import spearmanr
from sklearn.ensemble import IsolationForest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from bench.tasks import Task, all_tasks
from ssad_common.search_space import CUTPASTE_DEFAULT, SearchSpace
from worker.core.data import prepare
from worker.core.objectives import OBJECTIVES
from worker.core.study import StudySettings, run_study
from worker.core.training import TrainSettings


def pixel_baselines(task: Task, seed: int = 0) -> dict[str, float]:
    """IsolationForest and kNN (mean distance to 5 nearest train images) on raw pixels."""
    def flat(x: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(x).float() / 255
        if t.shape[-1] > 32:
            t = torch.nn.functional.interpolate(t, size=(32, 32), mode="bilinear",
                                                antialias=True)
        return t.flatten(1).numpy()

    tr, te = flat(task.train), flat(task.test)
    iso = IsolationForest(n_estimators=200, random_state=seed).fit(tr)
    knn = NearestNeighbors(n_neighbors=5).fit(tr)
    dist, _ = knn.kneighbors(te)
    return {"iforest": float(roc_auc_score(task.labels, -iso.score_samples(te))),
            "knn": float(roc_auc_score(task.labels, dist.mean(1)))}


def _zscore(s: np.ndarray) -> np.ndarray:
    return (s - s.mean()) / (s.std() + 1e-12)


def run_task(task: Task, steps: int, n_trials: int, seed: int) -> dict[str, Any]:
    device = torch.device("cpu")
    data = prepare(task.train, task.test, device)
    space = SearchSpace.from_dict(task.search_space)
    n = n_trials if task.search_space is None else max(n_trials - 2, len(space.augmentations))
    settings = StudySettings(n_trials=n, seed=seed, search_space=space,
                             train=TrainSettings(steps=steps))
    t0 = time.perf_counter()
    result = run_study(data, settings)
    wall = time.perf_counter() - t0
    trials: list[dict[str, Any]] = []
    for t in result.trials:
        if t.result is None:
            continue
        r = t.result
        trials.append({
            "number": t.number, "augmentation": r.augmentation, "params": r.params,
            "losses": r.losses, "auroc": float(roc_auc_score(task.labels, r.scores)),
            "timings": r.timings,
        })
    aurocs = np.array([t["auroc"] for t in trials])
    ensemble = np.mean([_zscore(t.result.scores) for t in result.trials if t.result], axis=0)
    default_name, default_params = CUTPASTE_DEFAULT
    fixed = [t["auroc"] for t in trials if t["augmentation"] == default_name
             and all(abs(float(t["params"][k]) - float(v)) < 1e-9
                     for k, v in default_params.items())]
    per_objective = {}
    for name in OBJECTIVES:
        losses = np.array([t["losses"][name] for t in trials])
        best = trials[int(np.argmin(losses))]
        rho = spearmanr(-losses, aurocs).statistic if len(trials) > 2 else float("nan")
        per_objective[name] = {
            "selected": {"augmentation": best["augmentation"], "params": best["params"],
                         "auroc": best["auroc"]},
            "regret": float(aurocs.max() - best["auroc"]),
            "spearman": float(rho),
        }
    out = {
        "task": task.name, "kind": task.kind, "n_train": len(task.train),
        "n_test": len(task.test), "anomaly_fraction": float(task.labels.mean()),
        "image_shape": list(task.train.shape[1:]), "truth": task.truth,
        "search_space": space.to_dict(), "n_trials": len(trials), "study_wall_s": wall,
        "oracle": float(aurocs.max()), "mean": float(aurocs.mean()),
        "fixed_cutpaste": fixed[0] if fixed else None,
        "ensemble": float(roc_auc_score(task.labels, ensemble)),
        "pixel": pixel_baselines(task, seed),
        "median_trial_s": statistics.median(t["timings"]["total_s"] for t in trials),
        "objectives": per_objective, "trials": trials,
    }
    return out


def within(a: float, b: float, factor: float) -> bool:
    return max(a, b) / min(a, b) <= factor


def report(results: list[dict[str, Any]]) -> str:
    lines = []
    names = list(OBJECTIVES)
    lines.append("| task | oracle | mean | fixed cutpaste | ensemble | iforest | knn | "
                 + " | ".join(names) + " | s/trial |")
    lines.append("|" + "---|" * (8 + len(names)))
    for r in results:
        cells = [r["task"], f"{r['oracle']:.3f}", f"{r['mean']:.3f}",
                 "-" if r["fixed_cutpaste"] is None else f"{r['fixed_cutpaste']:.3f}",
                 f"{r['ensemble']:.3f}", f"{r['pixel']['iforest']:.3f}",
                 f"{r['pixel']['knn']:.3f}"]
        for n in names:
            o = r["objectives"][n]
            cells.append(f"{o['selected']['auroc']:.3f} ({o['spearman']:+.2f})")
        cells.append(f"{r['median_trial_s']:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines.append("Cells per objective: AUROC of its selection (Spearman of −loss vs AUROC "
                 "across the task's trials).")
    lines.append("")
    lines.append("| objective | median regret | beats mean | beats both pixel baselines "
                 "(median) | median Spearman |")
    lines.append("|---|---|---|---|---|")
    for n in names:
        regrets = [r["objectives"][n]["regret"] for r in results]
        sel = [r["objectives"][n]["selected"]["auroc"] for r in results]
        beats = sum(r["objectives"][n]["selected"]["auroc"] > r["mean"] for r in results)
        pix = statistics.median(sel) > max(statistics.median(r["pixel"]["iforest"]
                                                             for r in results),
                                           statistics.median(r["pixel"]["knn"]
                                                             for r in results))
        rho = statistics.median(r["objectives"][n]["spearman"] for r in results)
        lines.append(f"| {n} | {statistics.median(regrets):.3f} | {beats}/{len(results)} | "
                     f"{'yes' if pix else 'no'} (median sel {statistics.median(sel):.3f}) | "
                     f"{rho:+.2f} |")
    inj = [r for r in results if r["kind"] == "injected"]
    if inj:
        lines.append("")
        lines.append("| injected task | true family / patch | objective | selected family / "
                     "patch | family ok | patch within 1.5× |")
        lines.append("|---|---|---|---|---|---|")
        for r in inj:
            t = r["truth"]
            for n in names:
                s = r["objectives"][n]["selected"]
                ps = s["params"].get("patch_size")
                fam_ok = s["augmentation"] == t["augmentation"]
                ps_ok = fam_ok and ps is not None and within(float(ps), t["patch_size"], 1.5)
                lines.append(
                    f"| {r['task']} | {t['augmentation']} {t['patch_size']:.3f} | {n} | "
                    f"{s['augmentation']} {'-' if ps is None else f'{float(ps):.3f}'} | "
                    f"{'yes' if fam_ok else 'no'} | {'yes' if ps_ok else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/engine.json")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--n-trials", type=int, default=14)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    out = Path(args.out)
    if args.report_only:
        print(report(json.loads(out.read_text())["results"]))
        return 0
    wanted = set(filter(None, args.tasks.split(",")))
    tasks = [t for t in all_tasks() if not wanted or t.name in wanted]
    meta = {"command": "python -m bench.engine " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} torch threads, torch {torch.__version__}",
            "steps": args.steps, "n_trials": args.n_trials, "seed": args.seed}
    results: list[dict[str, Any]] = []
    out.parent.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        t0 = time.perf_counter()
        results.append(run_task(task, args.steps, args.n_trials, args.seed))
        out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
        print(f"# {task.name}: {time.perf_counter() - t0:.0f}s", flush=True)
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
