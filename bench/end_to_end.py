"""End-to-end tuner benchmark: on the injected-defect tasks, where does the differentiable
CutOut's patch size go, and how good are the final detector's scores?

    .venv/bin/python -m bench.end_to_end --out bench/results/end_to_end.json

Labels are read only here (AUROC). The true defect area is known by construction.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
from sklearn.metrics import roc_auc_score

from bench.tasks import injected_tasks
from worker.core.data import prepare
from worker.core.end_to_end import EndToEndSettings, tune_end_to_end


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/end_to_end.json")
    ap.add_argument("--objectives", default="st-ssad,dsv")
    ap.add_argument("--rounds", type=int, default=EndToEndSettings().rounds)
    ap.add_argument("--initial", type=float, default=0.05, help="initial patch size")
    args = ap.parse_args(argv)
    rows: list[dict[str, Any]] = []
    for task in injected_tasks():
        data = prepare(task.train, task.test, torch.device("cpu"))
        for objective in args.objectives.split(","):
            t0 = time.perf_counter()
            r = tune_end_to_end(data, EndToEndSettings(
                rounds=args.rounds, objective=objective,
                initial={"patch_size": args.initial}))
            row = {
                "task": task.name, "objective": objective,
                "true_patch_size": task.truth["patch_size"],
                "initial_patch_size": args.initial,
                "learned_patch_size": r.params["patch_size"],
                "learned_aspect": r.params["aspect"],
                "ratio_to_truth": r.params["patch_size"] / task.truth["patch_size"],
                "auroc": float(roc_auc_score(task.labels, r.scores)),
                "wall_s": time.perf_counter() - t0,
                "trajectory": [round(t["patch_size"], 5) for t in r.trajectory],
            }
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "trajectory"}), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "meta": {"command": "python -m bench.end_to_end " + " ".join(argv or sys.argv[1:]),
                 "rounds": args.rounds, "torch_threads": torch.get_num_threads()},
        "rows": rows}, indent=1))
    print("| task | objective | true patch | learned patch | learned/true | AUROC |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['task']} | {row['objective']} | {row['true_patch_size']:.3f} | "
              f"{row['learned_patch_size']:.3f} | {row['ratio_to_truth']:.2f} | "
              f"{row['auroc']:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
