"""Service benchmarks, on a throwaway Postgres started here (same helper as the tests).

    .venv/bin/python -m bench.service --out bench/results/service.json [--only api,upload,...]

* api: p50/p99 latency of GET /v1/jobs/{id} and of GET /v1/jobs/{id}/scores with 10,000
  scores, 50 concurrent clients on loopback, API (uvicorn, one process) on Postgres.
* auth: p50/p99 of GET /v1/jobs/{id} with API keys required against auth off, one client
  and 50, alternating the two servers three times (the cost of the key lookup).
* upload: a 236 MB uint8 .npy and a 102 MB .npz through POST /v1/datasets: seconds against
  numpy.load + sha256 alone on the same file, and the API process's peak RSS above its RSS
  before the upload, against the file size (medians over repeats).
* hostile: the API's peak RSS for a .npz of 1 GiB of zeros behind an 8x8 header, a
  9000x9000 PNG and a zip of six (each refused with a 4xx).
* queue: 1,000 trivial jobs drained by 8 claimer processes: jobs/s, double claims.
* overhead: one job's wall time through the service (API + worker process) against the same
  study through the CLI on the same data and seed.
Run it on a quiet machine; every comparison is made within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.tasks import DATA
from service.migrate import upgrade_head
from ssad_common.db import make_engine
from tests.helpers import wait_http_ok
from tests.pg import PostgresServer, free_port
from worker.manager import JobManager

ROOT = Path(__file__).resolve().parents[1]


class Api:
    """uvicorn serving the app on a free port, against ``db_url``."""

    def __init__(self, db_url: str, workdir: Path, auth: str = "off") -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "SSAD_DATABASE_URL": db_url, "PYTHONPATH": str(ROOT),
               "SSAD_MAX_UPLOAD_BYTES": str(400 * 1024**2), "SSAD_AUTH": auth}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
             "--port", str(self.port), "--log-level", "warning"],
            cwd=workdir, env=env)
        wait_http_ok(f"{self.url}/readyz")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def npz_bytes(arr: np.ndarray) -> bytes:
    """Uncompressed, so the upload benchmark measures the service, not zlib."""
    buf = io.BytesIO()
    np.savez(buf, images=arr)
    return buf.getvalue()


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.array(xs), q))


async def hammer(url: str, paths: list[str], clients: int, per_client: int,
                 headers: dict[str, str] | None = None) -> dict[str, dict[str, float]]:
    lat: dict[str, list[float]] = {p: [] for p in paths}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60,
                                 headers=headers) as c:
        async def one(i: int) -> None:
            for k in range(per_client):
                path = paths[(i + k) % len(paths)]
                t = time.perf_counter()
                r = await c.get(path)
                lat[path].append(time.perf_counter() - t)
                assert r.status_code == 200, r.text
        await asyncio.gather(*(one(i) for i in range(clients)))
    return {p: {"n": len(v), "p50_ms": 1000 * percentile(v, 50),
                "p99_ms": 1000 * percentile(v, 99)} for p, v in lat.items()}


def bench_api(server: PostgresServer, work: Path) -> dict[str, Any]:
    db = server.url(server.create_database())
    upgrade_head(db)
    api = Api(db, work)
    try:
        test = np.random.default_rng(0).integers(0, 256, (10_000, 8, 8), dtype=np.uint8)
        with httpx.Client(base_url=api.url, timeout=120) as c:
            ds = c.post("/v1/datasets", files={"file": ("t.npz", npz_bytes(test))}).json()["id"]
            job = c.post("/v1/jobs", json={"train_dataset_id": ds, "test_dataset_id": ds,
                                           "n_trials": 1}).json()["id"]
            more = [c.post("/v1/jobs", json={"train_dataset_id": ds, "test_dataset_id": ds,
                                             "n_trials": 1}).json()["id"] for _ in range(20)]
        engine = make_engine(db)
        manager = JobManager(engine)
        for _ in range(1 + len(more)):
            claimed = manager.claim_next_job("bench")
            assert claimed is not None
            manager.record_trial(claimed.id, claimed.attempt, 0, augmentation="invert",
                                 params={}, validation_loss=0.0, losses={"dsv": 0.0},
                                 timings={"total_s": 1.0},
                                 scores=np.random.default_rng(1).normal(size=10_000).tolist())
            manager.finish(claimed.id, claimed.attempt)
        engine.dispose()
        # Cold: the first fetch of each job's scores (nothing rendered yet), one client.
        cold = []
        with httpx.Client(base_url=api.url, timeout=60) as c:
            for j in more:
                t = time.perf_counter()
                assert c.get(f"/v1/jobs/{j}/scores").status_code == 200
                cold.append(time.perf_counter() - t)
        paths = [f"/v1/jobs/{job}", f"/v1/jobs/{job}/scores"]
        asyncio.run(hammer(api.url, paths, 10, 5))  # warm-up
        job_lat = asyncio.run(hammer(api.url, paths[:1], 50, 40))
        score_lat = asyncio.run(hammer(api.url, paths[1:], 50, 8))
        return {"job": job_lat[paths[0]], "scores_10k": score_lat[paths[1]],
                "scores_10k_cold_single_client": {
                    "n": len(cold), "p50_ms": 1000 * percentile(cold, 50),
                    "p99_ms": 1000 * percentile(cold, 99)},
                "clients": 50, "api_processes": 1,
                "note": "client and server share the machine's 2 cores"}
    finally:
        api.stop()


def bench_auth(server: PostgresServer, work: Path, rounds: int = 3) -> dict[str, Any]:
    """GET /v1/jobs/{id} with API keys required against the same with auth off (two API
    processes on one database), alternating them `rounds` times; medians over rounds."""
    from service.tenants import create_key
    from ssad_common.db import session_scope

    db = server.url(server.create_database())
    upgrade_head(db)
    engine = make_engine(db)
    with session_scope(engine) as s:
        key = create_key(s, "bench")[1]
    engine.dispose()
    keyed = {"Authorization": f"Bearer {key}"}
    off, on = Api(db, work), Api(db, work, auth="required")
    try:
        paths = {}
        for name, api, headers in (("off", off, {}), ("on", on, keyed)):
            with httpx.Client(base_url=api.url, timeout=60, headers=headers) as c:
                ds = c.post("/v1/datasets", files={"file": ("t.npz", npz_bytes(
                    np.zeros((4, 8, 8), np.uint8)))}).json()["id"]
                job = c.post("/v1/jobs", json={"train_dataset_id": ds, "test_dataset_id": ds,
                                               "n_trials": 1}).json()["id"]
            paths[name] = [f"/v1/jobs/{job}"]

        def run(name: str, clients: int, per_client: int) -> dict[str, float]:
            api, headers = (off, None) if name == "off" else (on, keyed)
            return asyncio.run(hammer(api.url, paths[name], clients, per_client,
                                      headers))[paths[name][0]]

        run("off", 10, 5)  # warm-up
        run("on", 10, 5)
        runs: dict[str, list[dict[str, float]]] = {}
        for _ in range(rounds):
            for name in ("off", "on"):
                runs.setdefault(f"{name}_1_client", []).append(run(name, 1, 300))
                runs.setdefault(f"{name}_50_clients", []).append(run(name, 50, 40))
        out: dict[str, Any] = {k: {m: statistics.median(r[m] for r in v)
                                   for m in ("p50_ms", "p99_ms")} for k, v in runs.items()}
        for n in ("1_client", "50_clients"):
            out[f"p50_ratio_on_off_{n}"] = out[f"on_{n}"]["p50_ms"] / out[f"off_{n}"]["p50_ms"]
        out["rounds"] = rounds
        out["note"] = "one API process each, on the same 2 cores as the client"
        return out
    finally:
        off.stop()
        on.stop()


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} for {pid}")


def reset_peak(pid: int) -> None:
    """Reset the process's peak RSS (VmHWM) to its current RSS (Linux, own process)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def measured_upload(api: Api, c: httpx.Client, path: Path, filename: str
                    ) -> tuple[httpx.Response, float, int, int]:
    """POST ``path``; (response, seconds, RSS before in bytes, peak RSS during in bytes) of
    the API process. The body is streamed from the file, so the client's memory is not
    in the way."""
    pid = api.proc.pid
    reset_peak(pid)
    before = rss_kb(pid, "VmRSS") * 1024
    t = time.perf_counter()
    with path.open("rb") as f:
        r = c.post("/v1/datasets", files={"file": (filename, f)})
    s = time.perf_counter() - t
    return r, s, before, rss_kb(pid, "VmHWM") * 1024


def bench_upload(server: PostgresServer, work: Path, repeats: int = 3) -> dict[str, Any]:
    """Upload memory and throughput: a 236 MB uint8 .npy (already in the stored layout) and
    a 102 MB uncompressed .npz of uint8 (N, H, W, 3) (decoded and transposed), each new
    content per repeat. Peak RSS of the API process during the upload, above its RSS
    before it, against the file size; time against numpy.load + sha256 of the same file."""
    db = server.url(server.create_database())
    upgrade_head(db)
    api = Api(db, work)
    out: dict[str, Any] = {"repeats": repeats}
    try:
        rng = np.random.default_rng(0)
        cases = {"npy_236mb_uint8_nhw": ((57_600, 64, 64), ".npy"),
                 "npz_102mb_uint8_nhwc3": ((8_333, 64, 64, 3), ".npz")}
        with httpx.Client(base_url=api.url, timeout=600) as c:
            for label, (shape, suffix) in cases.items():
                arr = rng.integers(0, 256, shape, dtype=np.uint8)
                baseline, service, peaks, befores, absolute = [], [], [], [], []
                size = 0
                for i in range(repeats):
                    # New content each time, so the blob is really stored each time.
                    arr[0, 0, 0] = i
                    path = work / f"upload{suffix}"
                    if suffix == ".npy":
                        np.save(path, arr)
                    else:
                        path.write_bytes(npz_bytes(arr))
                    size = path.stat().st_size
                    t = time.perf_counter()
                    loaded = np.load(path, allow_pickle=False)
                    if suffix == ".npz":
                        loaded = loaded["images"]
                    hashlib.sha256(loaded.data).hexdigest()
                    baseline.append(time.perf_counter() - t)
                    del loaded
                    r, s, before, peak = measured_upload(api, c, path, f"big{suffix}")
                    assert r.status_code == 201, r.text
                    service.append(s)
                    peaks.append(peak - before)
                    befores.append(before)
                    absolute.append(peak)
                b, s = statistics.median(baseline), statistics.median(service)
                extra = statistics.median(peaks)
                out[label] = {
                    "file_mb": size / 1e6, "numpy_load_sha256_s": b, "upload_s": s,
                    "upload_mb_per_s": size / 1e6 / s, "baseline_mb_per_s": size / 1e6 / b,
                    "ratio": s / b, "api_rss_before_mb": statistics.median(befores) / 1e6,
                    "api_peak_above_before_mb": extra / 1e6,
                    "peak_above_before_over_file": extra / size,
                    "api_peak_mb": statistics.median(absolute) / 1e6,
                    "api_peak_over_file": statistics.median(absolute) / size}
                del arr
        return out
    finally:
        api.stop()


def hostile_files(work: Path) -> dict[str, tuple[Path, str]]:
    """The issue's hostile uploads: a .npz member of 1 GiB of zeros behind an 8x8 header,
    a 9000x9000 PNG (79 KB), and a zip of six of them."""
    import zipfile

    from PIL import Image

    files: dict[str, tuple[Path, str]] = {}
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": (1, 8, 8)})
    bomb = work / "bomb.npz"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as zf, \
            zf.open("images.npy", "w", force_zip64=True) as member:
        member.write(b"\x93NUMPY" + header.getvalue()[6:])
        zeros = bytes(16 * 1024**2)
        for _ in range(64):
            member.write(zeros)
    files["npz_1gib_zeros_behind_8x8_header"] = (bomb, "bomb.npz")
    png = io.BytesIO()
    Image.new("L", (9000, 9000)).save(png, format="PNG", optimize=True)
    big = work / "big.png"
    big.write_bytes(png.getvalue())
    files["png_9000x9000"] = (big, "big.png")
    six = work / "six.zip"
    with zipfile.ZipFile(six, "w") as zf:
        for i in range(6):
            zf.writestr(f"{i}.png", png.getvalue())
    files["zip_of_six_9000x9000_pngs"] = (six, "six.zip")
    return files


def bench_hostile(server: PostgresServer, work: Path, repeats: int = 3) -> dict[str, Any]:
    """Peak RSS of the API process (default limits) for each hostile upload; medians."""
    db = server.url(server.create_database())
    upgrade_head(db)
    api = Api(db, work)
    out: dict[str, Any] = {"repeats": repeats}
    try:
        with httpx.Client(base_url=api.url, timeout=600) as c:
            for label, (path, filename) in hostile_files(work).items():
                peaks, statuses, secs, absolute = [], [], [], []
                for _ in range(repeats):
                    r, s, before, peak = measured_upload(api, c, path, filename)
                    peaks.append(peak - before)
                    absolute.append(peak)
                    statuses.append(r.status_code)
                    secs.append(s)
                out[label] = {"file_bytes": path.stat().st_size, "statuses": statuses,
                              "api_peak_above_before_mb": statistics.median(peaks) / 1e6,
                              "api_peak_mb": statistics.median(absolute) / 1e6,
                              "seconds": statistics.median(secs),
                              "api_rss_after_mb": rss_kb(api.proc.pid, "VmRSS") * 1024 / 1e6}
        return out
    finally:
        api.stop()


CLAIMER = """
import json, sys, time
from ssad_common.db import make_engine
from worker.manager import JobManager
manager = JobManager(make_engine(sys.argv[1]))
claimed = []
while (job := manager.claim_next_job(sys.argv[2])) is not None:
    manager.record_trial(job.id, job.attempt, 0, augmentation="invert", params={},
                         validation_loss=0.0, losses={}, timings={"total_s": 0.0}, scores=[0.0])
    manager.finish(job.id, job.attempt)
    claimed.append(job.id)
print(json.dumps(claimed))
"""


def bench_queue(server: PostgresServer, work: Path, n_jobs: int = 1000,
                n_claimers: int = 8) -> dict[str, Any]:
    db = server.url(server.create_database())
    upgrade_head(db)
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import ApiSettings

    settings = ApiSettings(database_url=db, auth="off", max_active_jobs=n_jobs)
    with TestClient(create_app(settings)) as c:
        ds = c.post("/v1/datasets", files={"file": ("a.npz", npz_bytes(
            np.zeros((4, 8, 8), np.uint8)))}).json()["id"]
        for _ in range(n_jobs):
            c.post("/v1/jobs", json={"train_dataset_id": ds, "test_dataset_id": ds})
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", CLAIMER, db, f"c{i}"], env=env,
                              stdout=subprocess.PIPE, text=True) for i in range(n_claimers)]
    results = [json.loads(p.communicate()[0]) for p in procs]
    wall = time.perf_counter() - t
    claimed = [j for r in results for j in r]
    return {"jobs": n_jobs, "claimers": n_claimers, "wall_s": wall,
            "jobs_per_s": n_jobs / wall, "claimed": len(claimed),
            "double_claims": len(claimed) - len(set(claimed)),
            "per_claimer": [len(r) for r in results],
            "note": "each job: claim, record one trial with one score, finish (3 transactions)"}


def bench_overhead(server: PostgresServer, work: Path, n_trials: int, steps: int
                   ) -> dict[str, Any]:
    d = np.load(DATA / "mnist.npz")
    train = d["x_train_subset"][d["y_train_subset"] == 3]
    test = d["x_test"][:400]
    tr, te = work / "train.npz", work / "test.npz"
    tr.write_bytes(npz_bytes(train))
    te.write_bytes(npz_bytes(test))
    space = "cutout,rotate,noise,invert"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "worker.tune", "--train", str(tr), "--test", str(te),
                    "--n-trials", str(n_trials), "--steps", str(steps), "--augmentations",
                    space, "--quiet", "--device", "cpu"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    cli_s = time.perf_counter() - t

    db = server.url(server.create_database())
    upgrade_head(db)
    api = Api(db, work)
    env = {**os.environ, "SSAD_DATABASE_URL": db, "PYTHONPATH": str(ROOT),
           "SSAD_POLL_SECONDS": "0.5", "SSAD_CACHE_DIR": str(work / "cache")}
    worker = subprocess.Popen([sys.executable, "-m", "worker", "--device", "cpu",
                               "--max-jobs", "1"], cwd=ROOT, env=env)
    try:
        time.sleep(8)  # let the worker import torch and start polling, as a running one has
        with httpx.Client(base_url=api.url, timeout=120) as c:
            t = time.perf_counter()
            a = c.post("/v1/datasets", files={"file": ("train.npz", tr.read_bytes())}).json()
            b = c.post("/v1/datasets", files={"file": ("test.npz", te.read_bytes())}).json()
            job = c.post("/v1/jobs", json={
                "train_dataset_id": a["id"], "test_dataset_id": b["id"], "n_trials": n_trials,
                "train_steps": steps,
                "search_space": {"augmentations": space.split(",")}}).json()["id"]
            while (s := c.get(f"/v1/jobs/{job}").json())["status"] not in (
                    "succeeded", "failed", "cancelled"):
                time.sleep(0.25)
            c.get(f"/v1/jobs/{job}/scores", params={"format": "csv"})
            service_s = time.perf_counter() - t
        worker.wait(timeout=60)
        assert s["status"] == "succeeded", s
    finally:
        if worker.poll() is None:
            worker.kill()
        api.stop()
    return {"n_trials": n_trials, "steps": steps, "n_train": len(train), "n_test": len(test),
            "cli_s": cli_s, "service_s": service_s, "ratio": service_s / cli_s,
            "note": "CLI time includes its Python/torch start-up; the service worker was "
                    "already running; service time includes both uploads and the CSV fetch"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench/results/service.json")
    ap.add_argument("--only", default="api,auth,upload,hostile,queue,overhead")
    ap.add_argument("--overhead-trials", type=int, default=4)
    ap.add_argument("--overhead-steps", type=int, default=200)
    args = ap.parse_args(argv)
    wanted = args.only.split(",")
    server = PostgresServer().start()
    server.wait_ready()
    results: dict[str, Any] = {"meta": {
        "command": "python -m bench.service " + " ".join(argv or sys.argv[1:]),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores", "postgres": "15 (local)"}}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            for name, fn in (("api", lambda: bench_api(server, work)),
                             ("auth", lambda: bench_auth(server, work)),
                             ("upload", lambda: bench_upload(server, work)),
                             ("hostile", lambda: bench_hostile(server, work)),
                             ("queue", lambda: bench_queue(server, work)),
                             ("overhead", lambda: bench_overhead(
                                 server, work, args.overhead_trials, args.overhead_steps))):
                if name in wanted:
                    results[name] = fn()
                    print(name, json.dumps(results[name]), flush=True)
    finally:
        server.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
