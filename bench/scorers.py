"""Which scorer makes the better detector from the same embeddings? Offline probe.

The study's choice does not depend on the scorer (every objective reads the embeddings
X, Y, Z, not the scores), so a scorer can be judged by retraining recorded trials and
scoring the same test embeddings several ways. For every selectable trial of the given
``bench.engine`` result files the trial is retrained with its recorded family,
parameters, steps and seed (each row says whether the recorded Mahalanobis AUROC came
back: with one torch thread and the code the run was made with it does exactly; another
thread count or an older run gives another training run of the same configuration, still a
fair comparison of scorers on one set of embeddings), and the test set is scored by:

* ``mahalanobis``: method.md §2's scorer (a Ledoit–Wolf Gaussian on X), the product's until
  2026-12-03;
* ``knn-k``: the mean Euclidean distance of each test embedding to its k nearest clean
  train embeddings X (embeddings are L2-normalised, so this is the cosine distance's
  order), k in ``--ks``;
* ``logit``: the classifier's "augmented" logit (method.md §2's alternative);
* ``levels-concat``: one Ledoit–Wolf Gaussian on the concatenation of the encoder's
  globally pooled feature maps after the stem and after every block (at 32 px: 16 + 16 +
  32 + 64 = 128 dimensions, unnormalised; ``Detector.level_features``), the embedding's
  feature being the last of them: what the product ships as the ``multilevel`` scorer;
* ``levels-sum``: a Gaussian per level, the score Σ_l d_l² / dim_l (each term about 1 for
  a normal image), the multi-level density of Rippel et al. (ICPR 2020).

Labels are read only here, to compute AUROC. Per run the report gives, per scorer, the
AUROC of the product's choice (the rank sum of DSV and MMD, which no scorer changes), the
oracle and the mean over the retrained trials (``--top N``: only the first N in the
product's order), and whether the choice is above both pixel baselines recorded with the
run::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.scorers bench/results/engine-dsv-dev-a.json \
        --out bench/results/scorers-dev-a.json
    .venv/bin/python -m bench.scorers --report bench/results/scorers-dev-*.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.engine import TASK_SETS, knn_scores
from bench.selection_rules import product_ranking, selectable, study_scorer
from bench.tasks import Task
from worker.core.data import prepare
from worker.core.inference import augmented_logits, embed_levels, embed_xyz
from worker.core.scoring import mahalanobis_scores, multilevel_features
from worker.core.training import TrainSettings
from worker.core.trial import start_trial

MATCH_TOL = 1e-3  # a retrained trial "reproduces" if its Mahalanobis AUROC is this close


def retrain(task: Task, trial: dict[str, Any], seed: int, ks: Sequence[int], steps: int,
            contamination: float = 0.1) -> dict[str, float]:
    """The recorded trial trained again; AUROC of the test scores under every scorer."""
    data = prepare(task.train, task.test, torch.device("cpu"))
    settings = TrainSettings(steps=int(trial.get("train_steps") or steps))
    start = start_trial(data, trial["augmentation"], trial["params"], settings,
                        contamination, seed)
    model, x_idx = start.model, start.x_idx
    for _ in range(settings.steps):
        start.training.step()
    x, _y, z = embed_xyz(model, data.train[x_idx], data.train[start.y_idx], data.test,
                         start.augment, start.g)
    xn, zn = x.cpu().numpy().astype(np.float64), z.cpu().numpy().astype(np.float64)
    scores = {"mahalanobis": mahalanobis_scores(xn, zn),
              "logit": augmented_logits(model, data.test).cpu().numpy().astype(np.float64)}
    for k in ks:
        scores[f"knn-{k}"] = knn_scores(xn, zn, k)
    lx = [m.double().numpy() for m in embed_levels(model, data.train[x_idx])]
    lz = [m.double().numpy() for m in embed_levels(model, data.test)]
    scores["levels-concat"] = mahalanobis_scores(multilevel_features(lx),
                                                 multilevel_features(lz))
    scores["levels-sum"] = sum((mahalanobis_scores(a, b) ** 2 / a.shape[1]
                                for a, b in zip(lx, lz, strict=True)), np.zeros(len(lz[0])))
    return {name: float(roc_auc_score(task.labels, s)) for name, s in scores.items()}


def probe(path: Path, ks: Sequence[int], tasks: set[str] | None,
          top: int = 0) -> list[dict[str, Any]]:
    recorded = json.loads(path.read_text())
    meta = recorded["meta"]
    pool = {t.name: t for t in TASK_SETS[meta.get("set") or "dev"]()}
    out = []
    for run in recorded["results"]:
        if tasks is not None and run["task"] not in tasks:
            continue
        task = pool[run["task"]]
        order = [t for _, t in product_ranking(selectable(run))]
        chosen = order[0]["number"]
        rows = []
        for t in order[:top] if top else order:
            t0 = time.perf_counter()
            aurocs = retrain(task, t, seed=int(meta.get("seed") or 0) + int(t["number"]), ks=ks,
                             steps=int(meta["steps"]))
            # the run's Mahalanobis AUROC: its own, or recorded beside another scorer's
            recorded = (t["auroc"] if study_scorer(meta) == "mahalanobis"
                        else t.get("auroc_by_scorer", {}).get("mahalanobis"))
            rows.append({"number": t["number"], "augmentation": t["augmentation"],
                         "params": t["params"], "auroc": aurocs,
                         "recorded_auroc": recorded,
                         "reproduced": recorded is not None
                         and abs(aurocs["mahalanobis"] - recorded) <= MATCH_TOL,
                         "seconds": time.perf_counter() - t0})
            print(f"  {run['task']} #{t['number']} {t['augmentation']}: "
                  + ", ".join(f"{k} {v:.3f}" for k, v in aurocs.items()), flush=True)
        out.append({"task": run["task"], "kind": run["kind"], "source": path.name,
                    "chosen": chosen, "pixel": run["pixel"], "trials": rows})
    return out


def summary(runs: Sequence[dict[str, Any]]) -> str:
    scorers = list(runs[0]["trials"][0]["auroc"])
    lines = ["| task | " + " | ".join(f"{s}: choice / oracle" for s in scorers)
             + " | best pixel baseline |",
             "|---|" + "---|" * (len(scorers) + 1)]
    agg: dict[str, dict[str, list[float]]] = {s: {"choice": [], "oracle": [], "mean": [],
                                                  "above": []} for s in scorers}
    for r in runs:
        pixel = max(r["pixel"].values())
        chosen = next(t for t in r["trials"] if t["number"] == r["chosen"])
        cells = []
        for s in scorers:
            values = [t["auroc"][s] for t in r["trials"]]
            c = chosen["auroc"][s]
            agg[s]["choice"].append(c)
            agg[s]["oracle"].append(max(values))
            agg[s]["mean"].append(float(np.mean(values)))
            agg[s]["above"].append(float(c > pixel))
            cells.append(f"{c:.3f} / {max(values):.3f}")
        lines.append(f"| {r['task']} | " + " | ".join(cells) + f" | {pixel:.3f} |")
    rows = [t for r in runs for t in r["trials"]]
    lines += ["", f"{sum(t.get('reproduced', True) for t in rows)} of {len(rows)} retrained "
              "trials reproduced their recorded AUROC"]
    lines += ["", "| scorer | runs | mean AUROC of the choice | median | mean oracle | "
              "mean over trials | choice above both pixel baselines | choice higher than "
              "Mahalanobis's / lower |", "|---|---|---|---|---|---|---|---|"]
    base = agg["mahalanobis"]["choice"]
    for s in scorers:
        a = agg[s]
        wins = sum(x > b + 1e-9 for x, b in zip(a["choice"], base, strict=True))
        losses = sum(x < b - 1e-9 for x, b in zip(a["choice"], base, strict=True))
        lines.append(f"| {s} | {len(runs)} | {np.mean(a['choice']):.3f} | "
                     f"{statistics.median(a['choice']):.3f} | {np.mean(a['oracle']):.3f} | "
                     f"{np.mean(a['mean']):.3f} | {int(sum(a['above']))}/{len(runs)} | "
                     f"{wins} / {losses} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("files", nargs="+", type=Path,
                    help="bench.engine result files (or, with --report, this script's)")
    ap.add_argument("--report", action="store_true", help="summarise probe files only")
    ap.add_argument("--ks", default="1,5", help="k of the kNN scorers, comma-separated")
    ap.add_argument("--tasks", default=None, help="only these tasks, comma-separated")
    ap.add_argument("--top", type=int, default=0,
                    help="only each run's first N trials in the product's order (0: all)")
    ap.add_argument("--out", type=Path, help="write the probe's JSON here")
    args = ap.parse_args(argv)
    if args.report:
        runs = [r for f in args.files for r in json.loads(f.read_text())["runs"]]
        print(summary(runs))
        return 0
    ks = [int(k) for k in args.ks.split(",")]
    tasks = set(args.tasks.split(",")) if args.tasks else None
    runs = [r for f in args.files for r in probe(f, ks, tasks, args.top)]
    print(summary(runs))
    if args.out is not None:
        meta = {"command": "python -m bench.scorers " + " ".join(sys.argv[1:]),
                "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, "
                           f"torch {torch.__version__}"}
        args.out.write_text(json.dumps({"meta": meta, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
