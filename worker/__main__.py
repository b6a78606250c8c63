"""``python -m worker [--device auto|cpu|cuda:N] [--concurrency N]``: workers against
SSAD_DATABASE_URL. With ``--concurrency N`` this process supervises N worker processes on
this machine, each pinned to its own GPU (``cuda:i``, round robin over the GPUs present) or,
on CPU, to its share of the cores (``--threads``); SIGTERM/SIGINT reach every one of them,
each finishes or gives back its trial, and the supervisor exits when they all have."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading

from ssad_common import logs
from ssad_common.db import make_engine
from worker.settings import WorkerSettings

log = logging.getLogger("ssad.worker")


def child_devices(device: str, n: int) -> list[str]:
    """The device each of ``n`` worker processes gets: ``cuda``/``auto`` with GPUs present
    spread the workers over them (round robin), an explicit ``cuda:N`` or ``cpu`` is kept."""
    gpus = 0
    if device in ("auto", "cuda"):
        import torch

        gpus = torch.cuda.device_count()
    if gpus:
        return [f"cuda:{i % gpus}" for i in range(n)]
    return ["cpu" if device == "auto" else device] * n


def supervise(args: argparse.Namespace) -> int:
    """Run ``args.concurrency`` workers as child processes until they all exit."""
    n = args.concurrency
    threads = args.threads or max(1, (os.cpu_count() or 1) // n)
    procs = []
    for i, device in enumerate(child_devices(args.device, n)):
        cmd = [sys.executable, "-m", "worker", "--device", device, "--threads", str(threads)]
        if args.max_jobs is not None:
            cmd += ["--max-jobs", str(args.max_jobs)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        procs.append(subprocess.Popen(cmd, env=env))
        log.info("worker process %d of %d: pid %d on %s, %d thread(s)", i + 1, n,
                 procs[-1].pid, device, threads)

    def forward(signum: int, _: object) -> None:
        log.info("signal %d: passing it to %d worker process(es)", signum, len(procs))
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    codes = [p.wait() for p in procs]
    return max(codes, key=abs)


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings()
    ap = argparse.ArgumentParser(prog="python -m worker",
                                 description=(__doc__ or "").replace("``", ""))
    ap.add_argument("--device", default=settings.worker_device,
                    help="auto (CUDA if present), cpu, cuda or cuda:N")
    ap.add_argument("--max-jobs", type=int, default=None,
                    help="exit after this many jobs (trial slots)")
    ap.add_argument("--concurrency", type=int, default=1,
                    help="worker processes to run on this machine (default 1)")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads for torch (default: torch's own; with --concurrency N, "
                         "the cores divided by N)")
    args = ap.parse_args(argv)
    logs.configure(settings.log_format)
    if args.concurrency < 1:
        ap.error("--concurrency must be at least 1")
    if args.concurrency > 1:
        return supervise(args)
    # Only a process that runs jobs loads the engine (torch, scikit-learn, Optuna): a
    # supervisor of N workers stays small (it imports torch only to count GPUs).
    from worker.loop import build_context, run_worker
    from worker.manager import JobManager

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    logging.getLogger("optuna").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        log.info("signal %d: stopping after this step", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    engine = make_engine(settings.database_url)
    manager = JobManager(engine, settings.lease_seconds, settings.max_attempts)
    try:
        run_worker(build_context(settings, manager, args.device, stop), max_jobs=args.max_jobs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        engine.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
