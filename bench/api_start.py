"""How long an API process takes from its start to its first answer (docs/benchmarks.md §8):
`uvicorn service.app:create_app` on a fresh SQLite database, timed until ``/healthz``
answers 200. Each checkout given (default: this one) runs with its own virtualenv; the
starts alternate between them so that a busy machine slows all of them alike.

    python -m bench.api_start [--rounds 9] [CHECKOUT ...]     # about 30 s per checkout
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from tests.helpers import wait_http_ok
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[1]


def start_to_ready(checkout: Path, db: Path, timeout: float = 120) -> float:
    """Seconds from spawning the API of ``checkout`` to its first 200 on /healthz."""
    port = free_port()
    env = {**os.environ, "SSAD_DATABASE_URL": f"sqlite:///{db}", "SSAD_AUTH": "off",
           "PYTHONPATH": str(checkout)}
    start = time.perf_counter()
    proc = subprocess.Popen(
        [str(checkout / ".venv" / "bin" / "python"), "-m", "uvicorn", "service.app:create_app",
         "--factory", "--port", str(port), "--log-level", "warning"],
        cwd=checkout, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_http_ok(f"http://127.0.0.1:{port}/healthz", timeout=timeout, every=0.02)
        return time.perf_counter() - start
    finally:
        proc.kill()
        proc.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("checkouts", nargs="*", type=Path, default=[ROOT])
    ap.add_argument("--rounds", type=int, default=9)
    args = ap.parse_args()
    times: dict[str, list[float]] = {str(c): [] for c in args.checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for i, checkout in enumerate(args.checkouts):
                db = Path(tmp) / f"{i}.db"  # migrated by the first start, reused after
                times[str(checkout)].append(start_to_ready(checkout.resolve(), db))
    out = {c: {"median_s": statistics.median(t), "runs_s": [round(x, 3) for x in t]}
           for c, t in times.items()}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
