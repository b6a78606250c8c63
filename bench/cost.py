"""Where a trial's time goes, at the product defaults, on 1,000 train + 1,000 test MNIST.

    .venv/bin/python -m bench.cost --out bench/results/cost.json [--repeats 3]

For each family measured, reports (medians over repeats, all from one run):
* overhead = (embedding + loss + scoring + set-up) / trial time (aim: <= 15%);
* augmentation = time inside the augmentation / training time, i.e. per training step
  (aim: <= 10%).
Run it on a quiet machine: the figures are ratios, but a second busy process skews them.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bench.tasks import DATA
from worker.core.data import prepare
from worker.core.device import resolve_device
from worker.core.training import TrainSettings
from worker.core.trial import run_trial

FAMILIES = ("cutout", "cutpaste", "cutpaste-scar", "rotate", "simclr")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/cost.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--steps", type=int, default=TrainSettings().steps)
    ap.add_argument("--families", default=",".join(FAMILIES))
    args = ap.parse_args(argv)
    d = np.load(DATA / "mnist.npz")
    train = d["x_train_subset"][:1000, None]
    test = d["x_test"][:1000, None]
    device = resolve_device(args.device)
    data = prepare(train, test, device)
    settings = TrainSettings(steps=args.steps)
    rows: list[dict[str, Any]] = []
    for family in args.families.split(","):
        runs = [run_trial(data, family, {}, settings, seed=i).timings
                for i in range(args.repeats)]
        overhead = [(t["total_s"] - t["train_s"]) / t["total_s"] for t in runs]
        augment = [t["augment_s"] / t["train_s"] for t in runs]
        row = {
            "family": family,
            "trial_s": statistics.median(t["total_s"] for t in runs),
            "step_ms": statistics.median(1000 * t["train_s"] / args.steps for t in runs),
            "overhead_fraction": statistics.median(overhead),
            "augment_fraction": statistics.median(augment),
            "embed_s": statistics.median(t["embed_s"] for t in runs),
            "score_s": statistics.median(t["score_s"] for t in runs),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    meta = {"device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine": platform.processor(),
            "steps": args.steps, "repeats": args.repeats, "n_train": 1000, "n_test": 1000}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print("| family | trial s | step ms | overhead | augmentation/step |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['family']} | {r['trial_s']:.1f} | {r['step_ms']:.0f} | "
              f"{100 * r['overhead_fraction']:.1f}% | {100 * r['augment_fraction']:.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
