"""Is a short training run a faithful screen? Every family at its defaults, trained for a
fraction of the steps, against the same trials at full length.

The full-length losses are read from an engine run (``bench/results/engine.json``: its first
trials are the warm start, one per family at its defaults, seeded ``seed + number``); the
short runs here use the same families, parameters and seeds. Reported per task: Spearman of
the short vs full losses over families, and whether the top-k families of the short run
contain the full run's best family (k = 1, 2, 3). Development tasks only.

    .venv/bin/python -m bench.fidelity --engine bench/results/engine.json \
        --out bench/results/fidelity.json --steps 37
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import optuna
import torch
from scipy.stats import spearmanr

from bench.tasks import development_tasks
from worker.core.data import prepare
from worker.core.training import TrainSettings
from worker.core.trial import run_trial


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="bench/results/engine.json")
    ap.add_argument("--out", default="bench/results/fidelity.json")
    ap.add_argument("--steps", type=int, default=37)
    ap.add_argument("--objective", default="dsv")
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in --out and run only the missing tasks")
    args = ap.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    engine = {r["task"]: r for r in json.loads(Path(args.engine).read_text())["results"]}
    full_steps = json.loads(Path(args.engine).read_text())["meta"]["steps"]
    seed0 = json.loads(Path(args.engine).read_text())["meta"]["seed"]
    rows: list[dict[str, Any]] = []
    if args.resume and Path(args.out).exists():
        rows = json.loads(Path(args.out).read_text())["rows"]
    done_tasks = {r["task"] for r in rows}
    for task in development_tasks():
        ref = engine.get(task.name)
        if ref is None or task.name in done_tasks:
            continue
        families = ref["search_space"]["augmentations"]
        warm = {t["number"]: t for t in ref["trials"]}
        data = prepare(task.train, task.test, torch.device("cpu"))
        short, full = {}, {}
        for number, family in enumerate(families):
            t = warm[number]
            assert t["augmentation"] == family, (task.name, number, t["augmentation"])
            r = run_trial(data, family, t["params"], TrainSettings(steps=args.steps),
                          seed=seed0 + number)
            short[family] = r.losses[args.objective]
            full[family] = t["losses"][args.objective]
        order_short = sorted(families, key=lambda f: short[f])
        best_full = min(families, key=lambda f: full[f])
        rho = float(spearmanr([short[f] for f in families], [full[f] for f in families])
                    .statistic)
        row: dict[str, Any] = {
               "task": task.name, "families": len(families), "spearman": rho,
               "best_full": best_full, "short_order": order_short,
               "rank_of_best_full": order_short.index(best_full) + 1,
               "short": short, "full": full}
        rows.append(row)
        print(f"# {task.name}: spearman {rho:+.2f}, full-length best {best_full} is "
              f"#{row['rank_of_best_full']} of {len(families)} in the short screen", flush=True)
        Path(args.out).write_text(json.dumps({
            "meta": {"command": "python -m bench.fidelity " + " ".join(argv or sys.argv[1:]),
                     "short_steps": args.steps, "full_steps": full_steps}, "rows": rows},
            indent=1))
    print("\n| task | families | Spearman short vs full | rank of full-length best in screen |")
    print("|---|---|---|---|")
    for done in rows:
        print(f"| {done['task']} | {done['families']} | {done['spearman']:+.2f} | "
              f"{done['rank_of_best_full']} ({done['best_full']}) |")
    for k in (1, 2, 3):
        hit = sum(done["rank_of_best_full"] <= k for done in rows)
        print(f"top-{k} of the screen holds the full-length best family: {hit}/{len(rows)}")
    print(f"median Spearman: {statistics.median(r['spearman'] for r in rows):+.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
