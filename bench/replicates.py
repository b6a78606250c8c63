"""Would the study choose better if its finalists were trained twice? Replayed on recorded
engine runs, training only the replicates.

DSV's loss of one configuration moves with the detector's training seed (the landscape's
seed spread is a sixth to a half of its curve's depth, docs/benchmarks.md §7), so the
lowest of nine full-length losses is partly the luckiest draw. The candidate design
("replicates"), fixed before any run of this script:

* the refine stage keeps its budget but gives its last ``R`` (2) full-length trials to
  the ``R`` configurations with the lowest loss so far, each trained once more (Optuna
  numbers them next, so their training seed is the study seed plus that number);
* the choice is among those finalists, by the mean of their two losses; the trial
  reported (scores, detector) is the finalist's run with the lower loss.

For each recorded run (``bench.engine`` JSON) this drops the run's last ``R`` refine
trials (the ones the replicates replace; TPE drew everything before them exactly as it
would have), retrains the finalists with those trials' seeds, and writes the run as the
design would have ended: an engine-shaped file that ``bench.compare`` reads beside the
original (each run's regret to its own study's oracle, mean over its own trials; the two
dropped trials are not among them). ``--check`` first retrains one recorded trial and stops
unless it reproduces its loss::

    OMP_NUM_THREADS=1 .venv/bin/python -m bench.replicates \\
        bench/results/engine-fills-object-seed0-dev.json \\
        --out bench/results/replicates-fills-object-seed0-dev.json

Labels are read only to score the replicates (AUROC), as ``bench.engine`` does.
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
from sklearn.metrics import roc_auc_score

from bench.engine import TASK_SETS, selection_entry
from bench.selection_rules import LEGACY_SCORER, study_scorer
from ssad_common.jobspec import DEFAULT_OBJECTIVE
from worker.core.data import prepare
from worker.core.training import TrainSettings
from worker.core.trial import run_trial

#: The loss the tenth round chose its finalists by: the default objective's alone (the
#: product's rule then; since 2026-12-03 the product ranks by it and MMD together).
RULE = DEFAULT_OBJECTIVE

FINALISTS = 2


def replay(run: dict[str, Any], tasks: dict[str, Any], seed: int, r: int,
           check: bool = False, scorer: str = LEGACY_SCORER) -> dict[str, Any]:
    """The run as the replicates design would have ended it. With ``check``, first retrain
    the run's first refine trial and stop unless it gives its recorded loss (the replay is
    exact only on a machine and torch that reproduce the recorded run)."""
    trials = run["trials"]
    refine = sorted((t for t in trials if t["stage"] == "refine"), key=lambda t: t["number"])
    if len(refine) <= r:
        raise SystemExit(f"{run['task']}: {len(refine)} refine trials, need more than {r}")
    kept, dropped = refine[:-r], refine[-r:]
    finalists = sorted(kept, key=lambda t: (t["losses"][RULE], t["number"]))[:r]
    task = tasks[run["task"]]
    data = prepare(task.train, task.test, torch.device("cpu"))
    if check:
        first = refine[0]
        again = run_trial(data, first["augmentation"], first["params"],
                          TrainSettings(steps=first["train_steps"], scorer=scorer),
                          seed=seed + first["number"]).losses[RULE]
        if again != first["losses"][RULE]:
            raise SystemExit(f"{run['task']}: trial {first['number']} retrained gives "
                             f"{again}, recorded {first['losses'][RULE]}: not a replay")
    replicates = []
    for fin, slot in zip(finalists, dropped, strict=True):
        res = run_trial(data, fin["augmentation"], fin["params"],
                        TrainSettings(steps=fin["train_steps"], scorer=scorer),
                        seed=seed + slot["number"])
        replicates.append({
            "number": slot["number"], "augmentation": fin["augmentation"],
            "params": fin["params"], "stage": "replicate", "train_steps": fin["train_steps"],
            "replicate_of": fin["number"], "losses": res.losses,
            "auroc": float(roc_auc_score(task.labels, res.scores)), "timings": res.timings})
    pairs = [(fin, rep) for fin in finalists for rep in replicates
             if rep["replicate_of"] == fin["number"]]
    means = [(statistics.fmean([a["losses"][RULE], b["losses"][RULE]]), a["number"], a, b)
             for a, b in pairs]
    _, _, a, b = min(means, key=lambda m: (m[0], m[1]))
    chosen = min((a, b), key=lambda t: (t["losses"][RULE], t["number"]))
    others = [t for t in kept if t is not chosen] + [t for t in replicates if t is not chosen]
    ranked_ = [(chosen["losses"][RULE], chosen)] + [(t["losses"][RULE], t) for t in others]
    selectable = [t for _, t in ranked_]
    aurocs = [t["auroc"] for t in selectable]
    out = {k: run[k] for k in ("task", "kind", "truth", "pixel", "n_train", "n_test",
                               "anomaly_fraction", "search_space", "strategy", "plan")}
    screen = [t for t in trials if t["stage"] == "screen"]
    out.update({
        "replicated": [{"number": fin["number"], "loss": fin["losses"][RULE],
                        "auroc": fin["auroc"], "replicate_loss": rep["losses"][RULE],
                        "replicate_auroc": rep["auroc"]} for fin, rep in pairs],
        "oracle": max(aurocs), "mean": statistics.fmean(aurocs),
        "original_selection": run["objectives"][RULE]["selected"],
        "objectives": {RULE: selection_entry(ranked_)},
        "trials": [*screen, *kept, *replicates],
    })
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", type=Path, help="a bench.engine result file")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--finalists", type=int, default=FINALISTS)
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: all)")
    ap.add_argument("--check", action="store_true",
                    help="first retrain each run's first refine trial and stop unless it "
                    "reproduces the recorded loss (one more training per run)")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    recorded = json.loads(args.runs.read_text())
    meta = recorded["meta"]
    tasks = {t.name: t for t in TASK_SETS[meta["set"]]()}
    wanted = set(filter(None, args.tasks.split(",")))
    results: list[dict[str, Any]] = []
    out_meta = {"command": "python -m bench.replicates " + " ".join(argv or sys.argv[1:]),
                "from": str(args.runs), "finalists": args.finalists, "recorded": meta,
                "machine": f"{platform.processor() or platform.machine()}, "
                           f"{torch.get_num_threads()} torch threads, torch {torch.__version__}"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for run in recorded["results"]:
        if wanted and run["task"] not in wanted:
            continue
        t0 = time.perf_counter()
        # the replicates are scored as the run's own trials were, so their AUROCs compare
        # with the recorded ones
        results.append(replay(run, tasks, int(meta["seed"]), args.finalists, args.check,
                              study_scorer(meta)))
        args.out.write_text(json.dumps({"meta": out_meta, "results": results}, indent=1))
        new, old = results[-1]["objectives"][RULE], run["objectives"][RULE]
        print(f"# {run['task']}: {old['selected']['auroc']:.3f} (regret {old['regret']:.3f})"
              f" -> {new['selected']['auroc']:.3f} (regret {new['regret']:.3f}); "
              f"{time.perf_counter() - t0:.0f}s", flush=True)
    regrets = np.array([r["objectives"][RULE]["regret"] for r in results])
    print(f"median regret {np.median(regrets):.3f} over {len(regrets)} runs")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
