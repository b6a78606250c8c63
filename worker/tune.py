"""The engine on two files, no database: ``python -m worker.tune --train A --test B``.

Prints one JSON line ``{"best": {...}, "trials": [...]}`` on stdout (progress goes to
stderr) and, with ``--scores-out``, writes ``index,name,score`` for the best trial in
test-set order. Unreadable inputs or bad options: one ``error: ...`` line, exit status 2.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssad_common.detectors import DETECTORS, working_size
from ssad_common.images import ImageDataError, ImageSet, load_path
from ssad_common.jobspec import (
    DEFAULT_CONTAMINATION,
    DEFAULT_N_TRIALS,
    DEFAULT_OBJECTIVE,
    DEFAULT_SCORER,
    DEFAULT_SEED,
)
from ssad_common.search_space import (
    FAMILIES,
    OBJECTIVE_NAMES,
    SCORER_NAMES,
    SearchSpace,
)
from ssad_common.strategy import DEFAULT_STRATEGY, STRATEGIES
from worker.core.selection import TOP_K, Candidate, decisiveness

EXIT_USAGE = 2




def build_parser() -> argparse.ArgumentParser:
    from worker.core.training import TrainSettings

    d = TrainSettings()
    ap = argparse.ArgumentParser(
        prog="python -m worker.tune",
        description="Choose a self-supervised anomaly detector's augmentation without labels "
                    "and score the test images.",
    )
    ap.add_argument("--train", required=True, help=".npz/.npy array, or folder/.zip of images")
    ap.add_argument("--test", required=True, help="same formats as --train")
    ap.add_argument("--n-trials", type=int, default=DEFAULT_N_TRIALS,
                    help=f"trials in the study ({DEFAULT_N_TRIALS})")
    ap.add_argument("--objective", default=DEFAULT_OBJECTIVE, choices=sorted(OBJECTIVE_NAMES),
                    help=f"validation loss to minimise ({DEFAULT_OBJECTIVE})")
    ap.add_argument("--augmentations", default="",
                    help="comma-separated families to search (default: all but cutdiff); "
                         f"known: {','.join(FAMILIES)}")
    ap.add_argument("--patch-size", nargs=2, type=float, default=None,
                    metavar=("MIN", "MAX"),
                    help="narrow the patch-size range of the local families")
    ap.add_argument("--contamination", type=float, default=DEFAULT_CONTAMINATION,
                    help="expected anomaly fraction of the test set, sizes |Y| "
                         f"({DEFAULT_CONTAMINATION})")
    ap.add_argument("--seed", type=int, default=DEFAULT_SEED)
    ap.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto)")
    ap.add_argument("--train-steps", "--steps", dest="steps", type=int, default=d.steps,
                    help=f"training steps per trial ({d.steps})")
    ap.add_argument("--batch-size", type=int, default=d.batch_size,
                    help=f"train images per step, plus as many augmented ({d.batch_size})")
    ap.add_argument("--lr", type=float, default=d.lr, help=f"Adam learning rate ({d.lr})")
    ap.add_argument("--width", type=int, default=d.width, help=f"encoder width ({d.width})")
    ap.add_argument("--image-size", type=int, default=None,
                    help="working size (small: auto, 32 up to 40 px, 64 up to 96 px, else "
                         "128; resnet18: 128-256, auto 224 for images of 224 px or more, "
                         "else 128)")
    ap.add_argument("--scorer", default=DEFAULT_SCORER, choices=SCORER_NAMES)
    ap.add_argument("--amp", action=argparse.BooleanOptionalAction, default=d.amp,
                    help="bfloat16 autocast for training on CUDA (default: on)")
    ap.add_argument("--detector", choices=DETECTORS, default=d.arch,
                    help=f"the encoder: small (CPU-sized) or resnet18 (GPU-sized, 128-256 px "
                         f"working size) ({d.arch})")
    ap.add_argument("--backbone", default=None, help="local encoder weights file")
    ap.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                    help=f"how the budget is spent ({DEFAULT_STRATEGY}; see "
                         "ssad_common/strategy.py)")
    ap.add_argument("--no-warm-start", action="store_true",
                    help="tpe strategy: do not start with one trial per family at its "
                         "defaults")
    ap.add_argument("--pruning", type=int, default=0, metavar="EVERY",
                    help="report the loss every EVERY steps and prune with a median pruner")
    ap.add_argument("--storage", default=None,
                    help="Optuna storage URL (e.g. sqlite:///study.db) to keep/resume trials")
    ap.add_argument("--study-name", default=None)
    ap.add_argument("--end-to-end", action="store_true",
                    help="learn cutdiff's patch size by gradient instead of a search")
    ap.add_argument("--rounds", type=int, default=40, help="end-to-end rounds (40)")
    ap.add_argument("--scores-out", default=None, help="write index,name,score CSV here")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def write_scores(path: str | Path, names: Sequence[str], scores: np.ndarray) -> None:
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["index", "name", "score"])
        for i, (name, s) in enumerate(zip(names, scores, strict=True)):
            w.writerow([i, name, repr(float(s))])


def _load(path: str, role: str) -> ImageSet:
    try:
        return load_path(path)
    except ImageDataError as exc:
        raise ImageDataError(f"{role} {path}: {exc}") from None


def run(args: argparse.Namespace) -> dict[str, Any]:
    # Files are read and checked before the engine builds anything.
    train, test = _load(args.train, "--train"), _load(args.test, "--test")
    import optuna

    from worker.core.data import prepare
    from worker.core.device import resolve_device
    from worker.core.end_to_end import EndToEndSettings, tune_end_to_end
    from worker.core.study import StudySettings, run_study
    from worker.core.training import TrainSettings

    device = resolve_device(args.device)
    train_settings = TrainSettings(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, width=args.width,
        image_size=args.image_size, scorer=args.scorer, amp=args.amp, backbone=args.backbone,
        arch=args.detector,
        eval_every=args.pruning,
    )
    size = working_size(args.detector, args.image_size, *train.images.shape[2:])
    data = prepare(train.images, test.images, device, size)

    def progress(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    out: dict[str, Any]
    progress(f"train {train.shape}, test {test.shape}, working size {data.image_size}, "
             f"device {device}")
    for role, images in (("train", train), ("test", test)):
        if images.resized_from:
            sizes = ", ".join(f"{k} of {h}x{w}" for h, w, k in images.resized_from)
            progress(f"{role}: resized {sizes} to the set's {images.shape[2]}x"
                     f"{images.shape[3]} (its most common size)")
    if args.end_to_end:
        e2e = tune_end_to_end(data, EndToEndSettings(
            rounds=args.rounds, objective=args.objective, contamination=args.contamination,
            seed=args.seed, train=train_settings,
        ))
        scores = e2e.scores
        out = {"best": {"augmentation": e2e.augmentation, "params": e2e.params,
                        "validation_loss": e2e.validation_loss},
               "trials": [], "end_to_end": e2e.to_json()}
    else:
        augs = [a.strip() for a in args.augmentations.split(",") if a.strip()]
        space = SearchSpace.from_dict({
            **({"augmentations": augs} if augs else {}),
            **({"patch_size": list(args.patch_size)} if args.patch_size else {}),
        })
        settings = StudySettings(
            n_trials=args.n_trials, objective=args.objective,
            contamination=args.contamination, seed=args.seed, search_space=space,
            train=train_settings, warm_start=not args.no_warm_start,
            pruning=args.pruning > 0, strategy=args.strategy,
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def on_trial(number: int, r: Any) -> None:
            progress(f"trial {number}: {r.augmentation} {json.dumps(r.params)} "
                     f"loss={r.validation_loss:.4f} ({r.timings['total_s']:.1f}s)")

        result = run_study(data, settings, storage=args.storage, study_name=args.study_name,
                           on_trial=on_trial)
        best = result.best
        if result.best_scores is None:
            raise ValueError(
                "the best trial finished in an earlier run, so its scores are not here: "
                "rerun without --storage, or with a new --study-name"
            )
        scores = result.best_scores
        out = {"best": {"augmentation": best.augmentation, "params": best.params,
                        "validation_loss": best.validation_loss, "number": best.number},
               "plan": result.plan.to_json(), "leaders": result.leaders,
               "trials": [t.to_json() for t in result.trials],
               "study_name": result.study_name}
        candidates = [Candidate(t.number, str(t.augmentation), score,
                                None if t.result is None else t.result.scores)
                      for score, t in result.eligible]
        if all(c.scores is not None for c in candidates[:TOP_K]):
            out["selection"] = decisiveness(candidates, args.contamination)
    if args.scores_out:
        write_scores(args.scores_out, test.names, scores)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning, module="optuna")
    try:
        out = run(args)
    except (ImageDataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
