"""After the job (issue 13): how soon a webhook notice arrives, what the report page costs,
and what the client wheel installs.

* **Notice latency**: ``--jobs`` jobs, each created with a ``notify_url`` on a local
  receiver and then cancelled (a terminal state, committed by the API); the time from the
  cancel's 200 to the receiver's receipt, with the default settings (the dispatcher looks
  for due notices every second). Also the same with a receiver that answers 500 once
  (the retry's 2 s backoff included).
* **Report page**: a succeeded job (twelve stored trials of four families, 200 test
  images); the first page (the plots drawn), then ``--repeats`` more (the ended job's
  plots kept per process), against ``GET /v1/jobs/{id}`` on the same process: medians and
  their ratio.
* **The client wheel**: built from the checkout, installed alone in a new venv; its
  site-packages against the full development venv's (MB on disk), and whether torch,
  FastAPI or SQLAlchemy came with it.

API on uvicorn (one process), SQLite, loopback; no labels anywhere.

    python -m bench.notify --out bench/results/notify.json      # about 3 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from service.migrate import upgrade_head
from ssad_common.db import make_engine
from tests.helpers import Receiver, build_wheel, npz, wait_for, wait_http_ok
from tests.pg import free_port
from worker.manager import JobManager

ROOT = Path(__file__).resolve().parents[1]


def arrived(receiver: Receiver) -> dict[str, float]:
    """When each notice was accepted (the receiver answered 200), by delivery id."""
    return {h["SSAD-Delivery"]: t for (h, _), code, t in zip(
        receiver.received, receiver.answered, receiver.at, strict=True) if code == 200}


def _has_arrived(receiver: Receiver, delivery_id: str) -> bool:
    return delivery_id in arrived(receiver)


def notice_latency(http: httpx.Client, ids: tuple[str, str], n: int,
                   fail_first: bool) -> dict[str, Any]:
    receiver = Receiver(codes=[500, 200] * n if fail_first else []).start()
    sent: dict[str, float] = {}
    rng = np.random.default_rng(2)
    for _ in range(n):
        # At a random moment of the dispatcher's 1 s cycle (back to back, every job would
        # end just after a look and wait the whole second).
        time.sleep(float(rng.uniform(0, 1)))
        job = http.post("/v1/jobs", json={"train_dataset_id": ids[0],
                                          "test_dataset_id": ids[1],
                                          "notify_url": receiver.url}).json()
        assert http.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        t = time.monotonic()
        delivery = http.get(f"/v1/jobs/{job['id']}/deliveries").json()["deliveries"][0]
        sent[delivery["id"]] = t
        wait_for(partial(_has_arrived, receiver, delivery["id"]), timeout=60, every=0.01)
    receiver.stop()
    done = arrived(receiver)
    lat = [done[d] - t for d, t in sent.items() if d in done]
    tries = Counter(h["SSAD-Delivery"] for h, _ in receiver.received)
    return {"jobs": n, "delivered": len(lat), "receiver_failed_first": fail_first,
            "tries_per_notice": statistics.median(tries.values()),
            "median_s": statistics.median(lat), "p90_s": float(np.percentile(lat, 90)),
            "max_s": max(lat)}


def finished_job(db_url: str, http: httpx.Client, ids: tuple[str, str]) -> str:
    """A succeeded job with 12 stored trials, written by the worker's own manager calls
    (no training: the page's cost is the point)."""
    families: list[tuple[str, dict[str, Any]]] = [
        ("rotate", {"angle": a}) for a in (45.0, 90.0, 135.0)] + \
        [("cutout", {"patch_size": p, "fill": "zero"}) for p in (0.05, 0.1, 0.2, 0.3)] + \
        [("flip", {"direction": "vertical"}), ("invert", {}), ("blur", {"sigma": 1.0}),
         ("noise", {"std": 0.1}), ("crop", {"scale": 0.7})]
    job = http.post("/v1/jobs", json={"train_dataset_id": ids[0], "test_dataset_id": ids[1],
                                      "n_trials": 12, "strategy": "tpe"}).json()
    engine = make_engine(db_url)
    rng = np.random.default_rng(0)
    try:
        manager = JobManager(engine)
        claimed = manager.claim_next_job("bench")
        assert claimed is not None and claimed.id == job["id"]
        for number, (family, params) in enumerate(families):
            loss = float(rng.normal())
            manager.record_trial(job["id"], claimed.attempt, number, augmentation=family,
                                 params=params, validation_loss=loss, losses={"dsv": loss},
                                 timings={"total_s": 1.0}, scores=list(rng.gamma(2.0, 1.0, 200)))
        manager.finish(job["id"], claimed.attempt)
    finally:
        engine.dispose()
    return str(job["id"])


def page_cost(http: httpx.Client, job_id: str, repeats: int) -> dict[str, Any]:
    def timed(path: str) -> float:
        t = time.perf_counter()
        r = http.get(path)
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    first = timed(f"/v1/jobs/{job_id}/report")
    page = [timed(f"/v1/jobs/{job_id}/report") for _ in range(repeats)]
    job = [timed(f"/v1/jobs/{job_id}") for _ in range(repeats)]
    size = len(http.get(f"/v1/jobs/{job_id}/report").content)
    return {"first_page_s": first, "page_median_s": statistics.median(page),
            "job_json_median_s": statistics.median(job),
            "page_over_job_json": statistics.median(page) / statistics.median(job),
            "page_bytes": size, "repeats": repeats}


def du(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def wheel_footprint(tmp: Path) -> dict[str, Any]:
    wheel = build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    t = time.perf_counter()
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c",
                    str(ROOT / "constraints.txt"), str(wheel)], check=True,
                   capture_output=True)
    install_s = time.perf_counter() - t
    site = next(venv.glob("lib/python*/site-packages"))
    full = next((ROOT / ".venv").glob("lib/python*/site-packages"))
    present = {m: (site / m).exists() for m in ("torch", "fastapi", "sqlalchemy", "optuna")}
    return {"wheel_kb": wheel.stat().st_size / 1e3, "client_site_packages_mb": du(site),
            "full_dev_site_packages_mb": du(full), "install_s": install_s,
            "server_packages_present": present,
            "packages": sorted(p.name for p in site.iterdir() if p.suffix == ".dist-info")}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=ROOT / "bench/results/notify.json")
    ap.add_argument("--jobs", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        db_url = f"sqlite:///{tmp / 'bench.db'}"
        upgrade_head(db_url)
        port = free_port()
        env = {**os.environ, "SSAD_DATABASE_URL": db_url, "SSAD_AUTH": "off",
               "SSAD_WEBHOOK_ALLOW_PRIVATE": "true", "PYTHONPATH": str(ROOT)}
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "service.app:create_app",
                                "--factory", "--port", str(port), "--log-level", "warning"],
                               cwd=ROOT, env=env)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http_ok(f"{url}/healthz")
            http = httpx.Client(base_url=url, timeout=120)
            rng = np.random.default_rng(1)
            ids = tuple(http.post("/v1/datasets", files={"file": (f"{n}.npz", npz(
                rng.integers(0, 256, (k, 1, 28, 28), dtype=np.uint8)))}).json()["id"]
                for n, k in (("train", 200), ("test", 200)))
            assert len(ids) == 2
            result: dict[str, Any] = {
                "machine": f"{platform.node()} ({os.cpu_count()} cores)",
                "notice": notice_latency(http, ids, args.jobs, fail_first=False),
                "notice_after_a_500": notice_latency(http, ids, max(5, args.jobs // 3),
                                                     fail_first=True),
                "report": page_cost(http, finished_job(db_url, http, ids), args.repeats)}
        finally:
            api.terminate()
            api.wait(timeout=60)
        result["wheel"] = wheel_footprint(tmp)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
