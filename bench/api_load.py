"""The API side of the fleet (issue 12): requests/s and p99 latency of GET /v1/jobs/{id}
and of GET /v1/jobs/{id}/scores (10,000 scores) against a bare FastAPI endpoint that
returns the same bodies from memory (bench/bare_app.py), both served the same way
(uvicorn, one process per core, the API's HTTP protocol: service/serving.py) and loaded
with wrk (a C load generator, so the client does not eat the cores the way a Python client
does), at 10 and 50 connections. The API runs on Postgres with authentication off
(``--auth``: required, with one API key sent on every request); the bodies are the API's
own responses. Servers and load generator share this machine; each cell's ratio is taken
within one round, and the rounds alternate API and bare endpoint. Needs `wrk` (the Debian
package).

    python -m bench.api_load --out bench/results/api_load.json   # about 9 min
    python -m bench.api_load --auth --rounds 3 --out bench/results/api_load_auth.json  # keys
    python -m bench.api_load --split kernel --out bench/results/api_load_kernel.json

By default each server is one uvicorn process per port and wrk splits its connections
evenly between them (``--split ports``, as a load balancer would); ``--split kernel`` serves
with ``uvicorn --workers``, where the kernel hands each connection to one process, unevenly.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.service import npz_bytes
from service import tenants
from service.migrate import upgrade_head
from service.serving import HTTP_PROTOCOL
from ssad_common.db import make_engine, session_scope
from tests.helpers import wait_http_ok
from tests.pg import free_port, running_postgres
from worker.manager import JobManager

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Servers:
    """The processes serving one app, and the base URL of each port they listen on."""

    procs: list[subprocess.Popen[bytes]]
    urls: list[str]

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            proc.wait()


def serve(app: str, env: dict[str, str], processes: int, split: str = "ports") -> Servers:
    """``app`` on ``processes`` uvicorn processes: one port they share (``split``
    ``kernel``: ``--workers``, the kernel hands each connection to one of them) or one port
    each (``ports``: the load generator splits the connections evenly)."""
    ports = [free_port() for _ in range(processes if split == "ports" else 1)]
    workers = [] if split == "ports" else ["--workers", str(processes)]
    procs = [subprocess.Popen(
        [sys.executable, "-m", "uvicorn", app, "--factory", "--port", str(port), *workers,
         "--http", HTTP_PROTOCOL, "--log-level", "warning", "--no-access-log"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **env}) for port in ports]
    servers = Servers(procs, [f"http://127.0.0.1:{port}" for port in ports])
    for url in servers.urls:
        wait_http_ok(f"{url}/v1/jobs/x" if "bare" in app else f"{url}/readyz")
    return servers


def wrk(servers: Servers, path: str, connections: int, seconds: int,
        headers: tuple[str, ...] = ()) -> dict[str, Any]:
    """Load ``path`` with wrk for ``seconds``: 2 threads and ``connections`` on one port,
    or one wrk per port, each with its share of the connections, at the same time
    (requests/s summed, p99 the largest of theirs)."""
    n = len(servers.urls)
    runs = [subprocess.Popen(
        ["wrk", f"-t{2 // n or 1}", f"-c{connections // n}", f"-d{seconds}s", "--latency",
         *(a for h in headers for a in ("-H", h)), url + path],
        stdout=subprocess.PIPE, text=True) for url in servers.urls]
    outs = [run.communicate()[0] for run in runs]
    assert all(run.returncode == 0 for run in runs), outs
    parsed = [_wrk_result(out, connections // n) for out in outs]
    return {"rps": sum(p["rps"] for p in parsed), "p99_ms": max(p["p99_ms"] for p in parsed),
            "non_2xx": sum(p["non_2xx"] for p in parsed),
            "latency_consistent": all(p["latency_consistent"] for p in parsed)}


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def _wrk_result(out: str, connections: int) -> dict[str, Any]:
    """wrk's figures, and whether its latencies agree with its own counts: by Little's
    law the mean latency is at most connections × duration / requests. Some runs of two
    wrk processes at once report means 15-60 times that (docs/benchmarks.md §8); their
    percentiles are no latency any request had, and are flagged."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
    mean = re.search(r"^\s+Latency\s+([\d.]+)(us|ms|s)\s", out, re.M)
    done = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m),", out)
    assert p99 is not None and mean is not None and done is not None, out
    mean_ms = float(mean.group(1)) * _UNITS[mean.group(2)]
    duration_ms = float(done.group(2)) * {**_UNITS, "m": 6e4}[done.group(3)]
    little_ms = connections * duration_ms / max(1, int(done.group(1)))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p99_ms": float(p99.group(1)) * _UNITS[p99.group(2)],
            "non_2xx": int(errors.group(1)) if errors else 0,
            "latency_consistent": mean_ms <= 1.5 * little_ms}


def summarise(cells: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each cell's medians over its rounds; a p99 also over the rounds whose latencies wrk
    reported consistently only (None where there is none: :func:`_wrk_result`)."""
    def p99(xs: list[dict[str, Any]], side: str) -> float | None:
        kept = [x[side]["p99_ms"] for x in xs if x[side].get("latency_consistent", True)]
        return statistics.median(kept) if kept else None

    return {cell: {
        "median_ratio": statistics.median(x["ratio"] for x in xs),
        "median_api_rps": statistics.median(x["api"]["rps"] for x in xs),
        "median_bare_rps": statistics.median(x["bare"]["rps"] for x in xs),
        "median_api_p99_ms": statistics.median(x["api"]["p99_ms"] for x in xs),
        "median_bare_p99_ms": statistics.median(x["bare"]["p99_ms"] for x in xs),
        "median_api_p99_consistent_ms": p99(xs, "api"),
        "median_bare_p99_consistent_ms": p99(xs, "bare"),
        "api_non_2xx": sum(x["api"]["non_2xx"] for x in xs),
        "api_latency_consistent_rounds": sum(
            x["api"].get("latency_consistent", True) for x in xs),
        "bare_latency_consistent_rounds": sum(
            x["bare"].get("latency_consistent", True) for x in xs)}
        for cell, xs in cells.items()}


def make_job(db: str) -> str:
    """A succeeded job with 10,000 scores, through the API and the worker's manager."""
    one = serve("service.app:create_app", {"SSAD_DATABASE_URL": db, "SSAD_AUTH": "off"}, 1)
    try:
        test = np.random.default_rng(0).integers(0, 256, (10_000, 8, 8), dtype=np.uint8)
        with httpx.Client(base_url=one.urls[0], timeout=120) as c:
            ds = c.post("/v1/datasets", files={"file": ("t.npz", npz_bytes(test))}).json()["id"]
            job = c.post("/v1/jobs", json={"train_dataset_id": ds, "test_dataset_id": ds,
                                           "n_trials": 1}).json()["id"]
    finally:
        one.stop()
    engine = make_engine(db)
    manager = JobManager(engine)
    claimed = manager.claim_next_job("bench")
    assert claimed is not None
    manager.record_trial(claimed.id, claimed.attempt, 0, augmentation="invert", params={},
                         validation_loss=0.0, losses={"dsv": 0.0}, timings={"total_s": 1.0},
                         scores=np.random.default_rng(1).normal(size=10_000).tolist())
    manager.finish(claimed.id, claimed.attempt)
    engine.dispose()
    return job


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/api_load.json")
    ap.add_argument("--seconds", type=int, default=10)
    # Rounds still differ (the servers, wrk and Postgres share the cores): the median of
    # five is the figure.
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--connections", type=int, nargs="+", default=[10, 50])
    ap.add_argument("--split", choices=["kernel", "ports"], default="ports",
                    help="kernel: one port, uvicorn --workers (the kernel hands each "
                    "connection to a process, unevenly); ports: one uvicorn process per port "
                    "and one wrk per port with an even share of the connections, as a load "
                    "balancer in front of the processes would")
    ap.add_argument("--auth", action="store_true",
                    help="run the API with API keys required and send one with every request "
                         "(to both servers; the bare endpoint ignores it)")
    args = ap.parse_args(argv)
    if shutil.which("wrk") is None:
        print("error: wrk is not installed (apt-get install wrk)", file=sys.stderr)
        return 2
    processes = os.cpu_count() or 1
    cells: dict[str, list[dict[str, Any]]] = {}
    with running_postgres() as server, tempfile.TemporaryDirectory() as tmp:
        db = server.url(server.create_database())
        upgrade_head(db)
        job = make_job(db)
        headers: tuple[str, ...] = ()
        if args.auth:  # the job is the default tenant's (made with auth off)
            engine = make_engine(db)
            with session_scope(engine) as s:
                headers = (f"Authorization: Bearer {tenants.create_key(s, 'default')[1]}",)
            engine.dispose()
        api = serve("service.app:create_app",
                    {"SSAD_DATABASE_URL": db, "SSAD_LOG_FORMAT": "json",
                     "SSAD_AUTH": "required" if args.auth else "off"}, processes, args.split)
        try:
            paths = {"job": f"/v1/jobs/{job}", "scores_10k": f"/v1/jobs/{job}/scores"}
            with httpx.Client(base_url=api.urls[0], timeout=60,
                              headers=dict(h.split(": ", 1) for h in headers)) as c:
                bodies = {k: c.get(p).content for k, p in paths.items()}
            for k, body in bodies.items():
                (Path(tmp) / k).write_bytes(body)
            bare = serve("bench.bare_app:create_app",
                         {"BENCH_BARE_JOB": str(Path(tmp) / "job"),
                          "BENCH_BARE_SCORES": str(Path(tmp) / "scores_10k")},
                         processes, args.split)
            try:
                for r in range(args.rounds):
                    for name, path in paths.items():
                        for conns in args.connections:
                            for servers in (api, bare):
                                wrk(servers, path, conns, 2, headers)  # warm-up
                            a = wrk(api, path, conns, args.seconds, headers)
                            b = wrk(bare, path, conns, args.seconds, headers)
                            cell = f"{name}{'+key' if args.auth else ''}@{conns}"
                            cells.setdefault(cell, []).append(
                                {"api": a, "bare": b, "ratio": a["rps"] / b["rps"]})
                            print(f"round {r + 1} {cell}: api {a['rps']:.0f}/s p99 "
                                  f"{a['p99_ms']:.1f} ms, bare {b['rps']:.0f}/s p99 "
                                  f"{b['p99_ms']:.1f} ms, ratio {a['rps'] / b['rps']:.2f}"
                                  + ("" if a["latency_consistent"] else
                                     " (api latencies inconsistent)"),
                                  flush=True)
            finally:
                bare.stop()
        finally:
            api.stop()
    summary = summarise(cells)
    out = {"machine": f"{platform.node()}, {os.cpu_count()} cores",
           "auth": "required" if args.auth else "off", "uvicorn_processes": processes,
           "split": args.split, "http": HTTP_PROTOCOL,
           "seconds_per_run": args.seconds,
           "rounds": args.rounds, "summary": summary, "cells": cells}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
