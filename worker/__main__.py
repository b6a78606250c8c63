"""``python -m worker [--device auto|cpu|cuda:N]``: one worker against SSAD_DATABASE_URL."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from ssad_common import logs
from ssad_common.db import make_engine
from worker.loop import build_context, run_worker
from worker.manager import JobManager
from worker.settings import WorkerSettings


def main(argv: list[str] | None = None) -> int:
    settings = WorkerSettings()
    ap = argparse.ArgumentParser(prog="python -m worker",
                                 description=(__doc__ or "").replace("``", ""))
    ap.add_argument("--device", default=settings.worker_device,
                    help="auto (CUDA if present), cpu, cuda or cuda:N")
    ap.add_argument("--max-jobs", type=int, default=None, help="exit after this many jobs")
    args = ap.parse_args(argv)
    logs.configure(settings.log_format)
    logging.getLogger("optuna").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _: object) -> None:
        logging.getLogger("ssad.worker").info("signal %d: stopping after this step", signum)
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
