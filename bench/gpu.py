"""The detectors on a device (issue 12 §2): for the small detector and ResNet-18 at 32 and
224 px, training steps/s, one trial's wall time (training, embedding and scoring), peak
device memory, the share of a training step's wall time the GPU is busy (the sum of its
kernels' time, from torch's profiler, over the wall time of the same steps: 1 − that share
is spent outside the GPU), and the speed-up over a CPU run of the same configuration
(``--cpu-baseline``: this script's output on the CPU machine, bench/results/gpu-cpu.json).

Synthetic data (random uint8 images at the working size) so that it needs no dataset; the
trials are the engine's own (``worker.core.trial.run_trial``). Run through bench/gpu.sh on
a GPU machine; ``--device cpu`` gives the CPU baseline:

    python -m bench.gpu --device cpu --out bench/results/gpu-cpu.json       # ~10 min, 2 cores
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worker.core.augmentations import build_augmentation
from worker.core.data import prepare
from worker.core.device import resolve_device, synchronize
from worker.core.training import DetectorTraining, TrainSettings, build_detector
from worker.core.trial import run_trial

#: (detector, working size, batch size, training steps of the timed trial)
CONFIGS = [("small", 32, 64, 400), ("small", 224, 64, 400),
           ("resnet18", 32, 64, 100), ("resnet18", 224, 64, 100)]
# A CPU times fewer steps on fewer images (the per-step rates compare; trial times do not).
CPU_STEPS = {"small": 40, "resnet18": 4}
IMAGES = {"cuda": (2000, 500), "cpu": (200, 50)}  # train, test


def synthetic(n: int, size: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 1, size, size), dtype=np.uint8)


def busy_share(training: DetectorTraining, device: torch.device, steps: int) -> float | None:
    """Kernel time over wall time for ``steps`` training steps (CUDA only)."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(steps):
            training.step()
        synchronize(device)
        wall = time.perf_counter() - t
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages()
                     if e.device_type == torch.autograd.DeviceType.CUDA)
    return float(kernels_us / 1e6 / wall)


def measure(detector: str, size: int, batch: int, steps: int, device: torch.device
            ) -> dict[str, Any]:
    if device.type == "cpu":
        steps = CPU_STEPS[detector]
    n_train, n_test = IMAGES[device.type]
    data = prepare(synthetic(n_train, size, 0), synthetic(n_test, size, 1), device, size)
    settings = TrainSettings(steps=steps, batch_size=batch, arch=detector)
    g = torch.Generator(device=device).manual_seed(0)
    augment = build_augmentation("cutout", {"patch_size": 0.05}).to(device)
    training = DetectorTraining(build_detector(1, size, settings, device), augment,
                                data.train, settings, g, amp=settings.amp)
    for _ in range(3):  # warm-up: cuDNN's algorithm search, the allocator
        training.step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed = max(3, steps // 4)
    t = time.perf_counter()
    for _ in range(timed):
        training.step()
    synchronize(device)
    steps_per_s = timed / (time.perf_counter() - t)
    share = busy_share(training, device, min(20, timed))
    t = time.perf_counter()
    trial = run_trial(data, "cutout", {"patch_size": 0.05}, settings, seed=0)
    synchronize(device)
    trial_s = time.perf_counter() - t
    memory = (torch.cuda.max_memory_allocated(device) / 2**30
              if device.type == "cuda" else None)
    return {"detector": detector, "size": size, "batch_size": batch, "trial_steps": steps,
            "train_images": n_train, "test_images": n_test,
            "train_steps_per_s": steps_per_s, "trial_wall_s": trial_s,
            "trial_timings": trial.timings, "peak_memory_gib": memory,
            "gpu_busy_share": share}


def shared(args: argparse.Namespace) -> int:
    """``--processes N``: N processes train the ``--only`` configurations on the one device
    at once (several small trials sharing a GPU); their summed steps/s against one alone."""
    work = Path(args.out).with_suffix("")
    cmd = [sys.executable, "-m", "bench.gpu", "--device", args.device, "--only", *args.only]
    alone = subprocess.run([*cmd, "--out", f"{work}-alone.json"], check=True)
    assert alone.returncode == 0
    procs = [subprocess.Popen([*cmd, "--out", f"{work}-{i}.json"])
             for i in range(args.processes)]
    assert all(p.wait() == 0 for p in procs)
    one = json.loads(Path(f"{work}-alone.json").read_text())["runs"]
    each = [json.loads(Path(f"{work}-{i}.json").read_text())["runs"]
            for i in range(args.processes)]
    out = {"processes": args.processes, "runs": [
        {"detector": r["detector"], "size": r["size"],
         "alone_steps_per_s": r["train_steps_per_s"],
         "together_steps_per_s": sum(e[k]["train_steps_per_s"] for e in each),
         "gain": sum(e[k]["train_steps_per_s"] for e in each) / r["train_steps_per_s"]}
        for k, r in enumerate(one)]}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(out), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default="bench/results/gpu.json")
    ap.add_argument("--cpu-baseline", default="bench/results/gpu-cpu.json")
    ap.add_argument("--only", nargs="+", default=None, metavar="DETECTOR:SIZE",
                    help="measure only these configurations (e.g. small:32)")
    ap.add_argument("--processes", type=int, default=1,
                    help="N > 1: N processes at once on the device (see shared())")
    args = ap.parse_args(argv)
    if args.processes > 1:
        return shared(args)
    device = resolve_device(args.device)
    baseline: dict[tuple[str, int], float] = {}
    if device.type == "cuda" and Path(args.cpu_baseline).exists():
        for r in json.loads(Path(args.cpu_baseline).read_text())["runs"]:
            baseline[(r["detector"], r["size"])] = r["train_steps_per_s"]
    runs = []
    for detector, size, batch, steps in CONFIGS:
        if args.only and f"{detector}:{size}" not in args.only:
            continue
        r = measure(detector, size, batch, steps, device)
        cpu = baseline.get((detector, size))
        r["speedup_over_cpu"] = None if cpu is None else r["train_steps_per_s"] / cpu
        print(json.dumps({k: v for k, v in r.items() if k != "trial_timings"}), flush=True)
        runs.append(r)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    out = {"device": str(device), "name": name, "torch": torch.__version__,
           "threads": torch.get_num_threads(), "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
