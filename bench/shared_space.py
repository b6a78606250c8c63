"""Configurations compared in one shared space: does the closest one generate the defects?

Issue 11 names "comparing configurations in one shared embedding space" as a fix to try
if the objective's minimum misses the true patch size. DSV compares each configuration in
its own detector's embedding space, so losses of different trials live in different
spaces. Here every configuration is compared in the same fixed space (no training per
configuration):
the train set mixed with its augmented copies at the expected anomaly fraction r,
``(1 - r) X + r Y``, against the test set Z, by the kernel MMD (Gaussian kernel, bandwidth
the median distance of X ∪ Z). If the augmentation were the defect generator the mixture
would have the test set's distribution, so the closest configuration should be the
generating one. Spaces: the raw pixels at the working size, the detector's encoder
untrained (its random initialisation, seed 0), and one detector trained once with the fixed
CutPaste default (``trained``, the cost of one trial instead of one per configuration).
Each configuration is drawn with three augmentation seeds and the MMD averaged.

Only the benchmark reads the truth (the generating family, fill and size); no labels are
needed to compute the MMD, and the AUROC is not read here at all.

    .venv/bin/python -m bench.shared_space --out bench/results/shared-space.json
    .venv/bin/python -m bench.shared_space --spaces trained --placements anywhere \
        --out bench/results/shared-space-trained.json
    .venv/bin/python -m bench.shared_space --report-only --out bench/results/shared-space.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from bench.landscape import MATCHED_FILL
from bench.tasks import Task, confirmation_injected_tasks, injected_tasks, within
from ssad_common.search_space import CUTPASTE_DEFAULT
from worker.core.augmentations import build_augmentation
from worker.core.data import prepare
from worker.core.device import make_generator, seed_everything
from worker.core.training import DetectorTraining, TrainSettings, build_detector

FILLS = ("zero", "grey", "noise", "mean")
CONTAMINATION = 0.1  # the service's default r; the tasks' true share is 40/400


def configurations(grid: np.ndarray, placement: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The injected tasks' search space (CutOut at each fill, CutPaste, the scar) on the
    patch-size grid (the scar stops at 0.1)."""
    for ps in grid:
        common = {"patch_size": float(ps), "placement": placement}
        for fill in FILLS:
            yield "cutout", {**common, "fill": fill}
        yield "cutpaste", common
        if ps <= 0.1:
            yield "cutpaste-scar", common


def mmd2(x: Tensor, y: Tensor, z: Tensor, bandwidth: float, r: float) -> float:
    """Squared MMD (biased) between the mixture (1 - r) x + r y and z."""
    def k(a: Tensor, b: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(a, b).pow(2) / (2 * bandwidth ** 2)).mean()

    mix = (1 - r) ** 2 * k(x, x) + r * r * k(y, y) + 2 * r * (1 - r) * k(x, y)
    return float(mix + k(z, z) - 2 * ((1 - r) * k(x, z) + r * k(y, z)))


def embedder(space: str, data: Any, steps: int) -> Callable[[Tensor], Tensor]:
    if space == "pixels":
        return lambda v: v.flatten(1)
    seed_everything(0)
    settings = TrainSettings(steps=steps)
    model = build_detector(data.channels, data.image_size, settings, torch.device("cpu"))
    if space == "trained":  # one detector, the fixed CutPaste default (method.md §6)
        aug = build_augmentation(*CUTPASTE_DEFAULT)
        training = DetectorTraining(model, aug, data.train, settings,
                                    make_generator(torch.device("cpu"), 0), amp=False)
        for _ in range(steps):
            training.step()
    model.eval()

    def embed(v: Tensor) -> Tensor:
        with torch.no_grad():
            return torch.cat([model.embed(v[i:i + 256]) for i in range(0, len(v), 256)])
    return embed


def rank_task(task: Task, space: str, placements: list[str], grid: np.ndarray,
              seeds: int, steps: int) -> list[dict[str, Any]]:
    """Every configuration of each placement ranked by its MMD to ``task``'s test set in
    ``space``, which is built (for ``trained``: trained) once for all placements."""
    data = prepare(task.train, task.test, torch.device("cpu"))
    embed = embedder(space, data, steps)
    x, z = embed(data.train), embed(data.test)
    both = torch.cat([x, z])
    bandwidth = float(torch.cdist(both, both).median())
    out = []
    for placement in placements:
        rows: list[dict[str, Any]] = []
        for family, params in configurations(grid, placement):
            aug = build_augmentation(family, params)
            vals = [mmd2(x, embed(aug(data.train, torch.Generator().manual_seed(s))), z,
                         bandwidth, CONTAMINATION) for s in range(seeds)]
            rows.append({"family": family, "params": params, "mmd2": float(np.mean(vals)),
                         "sd": float(np.std(vals))})
        rows.sort(key=lambda r: r["mmd2"])
        out.append({"task": task.name, "truth": task.truth, "space": space,
                    "placement": placement, "rows": rows})
    return out


def verdict(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the closest configuration has the generating family, fill and size."""
    best, truth = result["rows"][0], result["truth"]
    family = best["family"] == truth["augmentation"]
    fill = family and (truth["augmentation"] != "cutout"
                       or best["params"]["fill"] == MATCHED_FILL[truth["fill"]])
    ratio = best["params"]["patch_size"] / truth["patch_size"]
    return {"family": family, "fill": fill, "ratio": ratio,
            "size": within(best["params"]["patch_size"], truth["patch_size"], 1.5)}


def report(results: list[dict[str, Any]]) -> str:
    lines = ["| space, placement | task | closest configuration | size / true | family | "
             "fill | size within 1.5× |", "|---|---|---|---|---|---|---|"]
    summary: dict[str, list[int]] = {}
    for r in results:
        v, best = verdict(r), r["rows"][0]
        what = best["family"] + (f" {best['params']['fill']}" if "fill" in best["params"]
                                 else "")
        key = f"{r['space']}, {r['placement']}"
        lines.append(f"| {key} | {r['task']} | {what} {best['params']['patch_size']:.3f} | "
                     f"{v['ratio']:.2f}× | {'yes' if v['family'] else 'no'} | "
                     f"{'yes' if v['fill'] else 'no'} | {'yes' if v['size'] else 'no'} |")
        s = summary.setdefault(key, [0, 0, 0, 0])
        s[0] += 1
        s[1] += v["family"]
        s[2] += v["family"] and v["size"]
        s[3] += v["fill"] and v["size"]
    lines += ["", "| space, placement | tasks | family | family and size | family, fill "
              "and size |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {n} | {f} | {fs} | {ffs} |" for k, (n, f, fs, ffs) in summary.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="bench/results/shared-space.json")
    ap.add_argument("--tasks", default="", help="comma-separated task names (default: the "
                    "injected tasks of development: bench.tasks.injected_tasks and the first "
                    "confirmation set's, which became development in the second round)")
    ap.add_argument("--spaces", default="pixels,untrained")
    ap.add_argument("--placements", default="anywhere,object")
    ap.add_argument("--points", type=int, default=8)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150, help="training steps of the trained "
                    "space's detector")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    if args.report_only:
        print(report(json.loads(out.read_text())["results"]))
        return 0
    torch.set_num_threads(1)
    wanted = set(filter(None, args.tasks.split(",")))
    tasks = [t for t in (*injected_tasks(), *confirmation_injected_tasks())
             if not wanted or t.name in wanted]
    grid = np.geomspace(0.005, 0.3, args.points)
    meta = {"command": "python -m bench.shared_space " + " ".join(argv or sys.argv[1:]),
            "machine": f"{platform.processor() or platform.machine()}, torch "
                       f"{torch.__version__}, 1 thread",
            "grid": grid.tolist(), "seeds": args.seeds, "contamination": CONTAMINATION}
    placements = args.placements.split(",")
    results = [r for space in args.spaces.split(",") for t in tasks
               for r in rank_task(t, space, placements, grid, args.seeds, args.steps)]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(report(results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
