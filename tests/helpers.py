"""Shared helpers for the service tests: files to upload, an app client, a real worker."""

from __future__ import annotations

import io
import os
import shutil
import struct
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.serving import HTTP_PROTOCOL
from service.settings import ApiSettings
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[1]


def npz(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez_compressed(buf, images=arr)
    return buf.getvalue()


def png_zip(images: np.ndarray, names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for img, name in zip(images, names, strict=True):
            b = io.BytesIO()
            Image.fromarray(img).save(b, format="PNG")
            zf.writestr(name, b.getvalue())
    return buf.getvalue()


def client(db_url: str, **overrides: Any) -> TestClient:
    """An in-process client; single-user (``auth="off"``) unless ``auth="required"``."""
    overrides.setdefault("auth", "off")
    settings = ApiSettings(database_url=db_url, embedded_worker=False, **overrides)
    return TestClient(create_app(settings))


def upload(c: TestClient | httpx.Client, data: bytes, filename: str,
           name: str | None = None) -> httpx.Response:
    form = {"name": name} if name is not None else None
    return c.post("/v1/datasets", files={"file": (filename, data)}, data=form)


def upload_pair(c: TestClient | httpx.Client, train: bytes, test: bytes) -> tuple[str, str]:
    """Upload a train and a test .npz; their dataset ids."""
    ids = []
    for data, filename in ((train, "train.npz"), (test, "test.npz")):
        r = upload(c, data, filename)
        assert r.status_code == 201, r.text
        ids.append(str(r.json()["id"]))
    return ids[0], ids[1]


def tiny_job(train_id: str, test_id: str, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"train_dataset_id": train_id, "test_dataset_id": test_id,
                            "n_trials": 3, "train_steps": 6, "batch_size": 8,
                            "search_space": {"augmentations": ["invert", "flip", "rotate"]}}
    body.update(extra)
    return body


def worker_env(db_url: str, tmp: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "SSAD_DATABASE_URL": db_url, "SSAD_CACHE_DIR": str(tmp / "cache"),
           "SSAD_HEARTBEAT_SECONDS": "0.5", "SSAD_POLL_SECONDS": "0.2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.update(extra)
    return env


def start_worker(db_url: str, tmp: Path, *args: str, **env: str) -> subprocess.Popen[bytes]:
    log = open(tmp / f"worker-{time.monotonic_ns()}.log", "wb")  # noqa: SIM115 - lives with the process
    return subprocess.Popen([sys.executable, "-m", "worker", "--device", "cpu", *args],
                            cwd=ROOT, env=worker_env(db_url, tmp, **env), stdout=log,
                            stderr=subprocess.STDOUT)


def wait_for(predicate: Callable[[], Any], timeout: float = 120, every: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(every)


def job_status(c: TestClient, job_id: str) -> dict[str, Any]:
    r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def assert_error(r: httpx.Response, status: int, error: str, contains: str = "") -> None:
    """The response is the project's one error shape, with this class and detail."""
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail"}, body
    assert body["error"] == error, body
    assert contains in body["detail"], body


def start_api(db_url: str, tmp_path: Path, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """The API as its own uvicorn process on a free port (auth off unless ``env`` says),
    ready to serve; the process and its base URL."""
    port = free_port()
    log = open(tmp_path / f"api-{port}.log", "wb")  # noqa: SIM115 - lives with the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
         "--port", str(port), "--http", HTTP_PROTOCOL, "--log-level", "warning"], cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "SSAD_DATABASE_URL": db_url, "SSAD_AUTH": "off",
             "PYTHONPATH": str(ROOT), **env})
    url = f"http://127.0.0.1:{port}"
    wait_http_ok(f"{url}/healthz")
    return proc, url


def build_wheel(dest: Path) -> Path:
    """The project's wheel built from this checkout's files as git sees them (tracked and
    new, not ignored) into ``dest``; its path."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.splitlines()
    src = dest / "src"
    for name in files:
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps",
                    "--no-build-isolation", "-w", str(dest / "dist"), str(src)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = (dest / "dist").glob("ssad_tune-*.whl")
    return wheel


def chromium_path() -> str | None:
    """The system's Chromium for the browser tests (skipped without it), except under CI
    (``CI`` set: .ci/run installs it), where its absence is an error, not a skip."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None and os.environ.get("CI"):
        raise RuntimeError("chromium is not installed: the browser tests cannot run")
    return found


def wait_http_ok(url: str, timeout: float = 60, every: float = 0.2) -> None:
    """Wait until GET ``url`` answers 200 (a server process starting up), asking every
    ``every`` seconds."""
    def ok() -> bool:
        try:
            return httpx.get(url, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ok, timeout=timeout, every=every)


def finish_job_with_scores(db_url: str, job_id: str,
                           trials: list[tuple[str, dict[str, Any], float, list[float]]],
                           selection: dict[str, Any] | None = None,
                           mmd: Sequence[float] | None = None) -> None:
    """Play the worker's part for a queued job without training: claim it, store each
    ``(augmentation, params, loss, scores)`` as a finished trial (with ``mmd[i]`` as its
    MMD loss where given; without MMD the rank sum falls back to the loss order), and
    finish it with ``selection`` (the worker's own JobManager calls, so what the API reads
    is what a worker writes)."""
    from ssad_common.db import make_engine
    from worker.manager import JobManager

    engine = make_engine(db_url)
    try:
        manager = JobManager(engine)
        claimed = manager.claim_next_job("test-helper")
        assert claimed is not None and claimed.id == job_id
        for number, (family, params, loss, scores) in enumerate(trials):
            manager.record_trial(job_id, claimed.attempt, number, augmentation=family,
                                 params=params, validation_loss=loss,
                                 losses={"dsv": loss} if mmd is None else
                                 {"dsv": loss, "mmd": mmd[number]},
                                 timings={"total_s": 1.0 + number}, scores=scores)
        manager.finish(job_id, claimed.attempt, selection)
    finally:
        engine.dispose()


def claim_and_cancel(db_url: str, url: str, client: subprocess.Popen[str],
                     api: subprocess.Popen[bytes], trials: Sequence[tuple[float, list[float]]] = (),
                     timeout: float = 120) -> str:
    """Play the worker for the job the ``client`` process is following: claim it, store each
    ``(loss, scores)`` as a finished ``rotate`` trial, then cancel it through the API and
    stop as a worker would (the worker's own JobManager calls). Returns the client's stderr
    once it exits; both processes are stopped either way."""
    try:
        _claim_and_cancel(db_url, url, trials)
        return client.communicate(timeout=timeout)[1]
    finally:
        if client.poll() is None:
            client.kill()
        api.kill()
        api.wait()


def _claim_and_cancel(db_url: str, url: str, trials: Sequence[tuple[float, list[float]]]) -> None:
    from ssad_common.db import make_engine
    from worker.manager import JobManager

    engine = make_engine(db_url)
    try:
        manager = JobManager(engine)
        claimed = wait_for(lambda: manager.claim_next_job("test-worker"), timeout=60)
        for number, (loss, scores) in enumerate(trials):
            manager.record_trial(claimed.id, claimed.attempt, number, augmentation="rotate",
                                 params={"angle": 90.0 * (number + 1)}, validation_loss=loss,
                                 losses={"dsv": loss}, timings={"total_s": 1.0},
                                 scores=scores)
        assert httpx.post(f"{url}/v1/jobs/{claimed.id}/cancel").status_code == 200
        manager.mark_cancelled(claimed.id, claimed.attempt)
    finally:
        engine.dispose()


def row_counts(db_url: str, *models: type) -> dict[str, int]:
    """Rows in each model's table, by table name (what a test says was or was not stored)."""
    from sqlalchemy import func, select

    from ssad_common.db import make_engine

    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            return {m.__tablename__: int(conn.execute(  # type: ignore[attr-defined]
                select(func.count()).select_from(m)).scalar_one()) for m in models}
    finally:
        engine.dispose()


def count(db_url: str, model: type) -> int:
    return row_counts(db_url, model)[model.__tablename__]  # type: ignore[attr-defined]


def run_in_process(job: Any, manager: Any, db_url: str, tmp: Path,
                   open_storage: Callable[[], Any] | None = None) -> str:
    """worker.runner.run_job on CPU in this process (to inject faults or play a zombie);
    its outcome: "succeeded", "failed", "lost", ... ``open_storage`` replaces the worker's
    Optuna storage opener."""
    import dataclasses
    import threading

    from worker.loop import build_context
    from worker.runner import run_job
    from worker.settings import WorkerSettings

    settings = WorkerSettings(database_url=db_url, cache_dir=str(tmp / "cache"),
                              heartbeat_seconds=30)
    ctx = build_context(settings, manager, "cpu", threading.Event())
    if open_storage is not None:
        ctx = dataclasses.replace(ctx, open_storage=open_storage)
    return run_job(job, ctx)


def make_key(db_url: str, tenant: str) -> str:
    """A new API key for ``tenant`` (created if new), as ``ssad-tune keys create`` makes it."""
    from service import tenants
    from ssad_common.db import make_engine, session_scope

    engine = make_engine(db_url)
    try:
        with session_scope(engine) as s:
            return tenants.create_key(s, tenant)[1]
    finally:
        engine.dispose()


# Image files, well-formed or crafted, for the image-reading tests (test_images.py,
# test_hostile.py).

#: A 12x10 grey image (the first of test_images.GREY).
SAMPLE = np.random.default_rng(0).integers(0, 256, (5, 12, 10), dtype=np.uint8)[0]


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=True)
    return buf.getvalue()


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def zip_bytes(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def npy_member_zip(header_shape: tuple[int, ...], data: bytes) -> bytes:
    """A .npz whose one member is a uint8 .npy header for ``header_shape`` and then
    ``data`` (which may disagree with the header), deflated."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "|u1", "fortran_order": False, "shape": header_shape})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("images.npy", header.getvalue() + data)
    return buf.getvalue()


def raw_zip(entry_name: bytes, utf8_flag: bool = False) -> bytes:
    """A zip with one PNG entry whose stored name is ``entry_name`` (any bytes)."""
    placeholder = b"Q" * len(entry_name)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(placeholder.decode(), png_bytes(SAMPLE))
    data = buf.getvalue().replace(placeholder, entry_name)
    if utf8_flag:  # set general purpose bit 11 (UTF-8 names) in both headers
        data = data.replace(b"PK\x03\x04\x14\x00\x00\x00", b"PK\x03\x04\x14\x00\x00\x08")
        data = data.replace(b"PK\x01\x02\x14\x03\x14\x00\x00\x00",
                            b"PK\x01\x02\x14\x03\x14\x00\x00\x08")
    return data


def patch_zip(data: bytes, *, flag_bits: int = 0, method: int | None = None) -> bytes:
    """``data`` (a zip) with ``flag_bits`` set and/or the compression method replaced in
    every entry's local and central headers."""
    buf = bytearray(data)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        offsets = [(i.header_offset, 6) for i in zf.infolist()]  # local: flags at +6
        pos = zf.start_dir
    while buf[pos:pos + 4] == b"PK\x01\x02":  # central: flags at +8
        offsets.append((pos, 8))
        n, m, k = struct.unpack("<HHH", buf[pos + 28:pos + 34])
        pos += 46 + n + m + k
    for at, flags in offsets:
        (old,) = struct.unpack("<H", buf[at + flags:at + flags + 2])
        buf[at + flags:at + flags + 2] = struct.pack("<H", old | flag_bits)
        if method is not None:  # the method follows the flags
            buf[at + flags + 2:at + flags + 4] = struct.pack("<H", method)
    return bytes(buf)


ENCRYPTED = 0x1


def other_format(fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(SAMPLE).save(buf, format=fmt)
    return buf.getvalue()


def queue_and_claim(db_url: str, digits: Any, worker_id: str) -> tuple[str, Any, Any, Any]:
    """A tiny tuning job on 30 train and 20 test digits, queued through the API and claimed
    by a fresh JobManager: (job id, engine, manager, claimed job). Dispose of the engine."""
    from ssad_common.db import make_engine
    from worker.manager import JobManager

    train, test, _ = digits
    with client(db_url) as api:
        tr, te = upload_pair(api, npz(train[:30, 0]), npz(test[:20, 0]))
        job_id = api.post("/v1/jobs", json=tiny_job(tr, te)).json()["id"]
    engine = make_engine(db_url)
    manager = JobManager(engine, lease_seconds=60)
    claimed = manager.claim_next_job(worker_id)
    assert claimed is not None
    return job_id, engine, manager, claimed


# A webhook receiver (tests/test_webhooks.py, bench/notify.py).


@dataclass
class Receiver:
    """A webhook receiver: a real HTTP server on a free loopback port that answers each
    POST with the next of ``codes`` (then 200), after waiting for ``release`` when it is
    given, and keeps each request's headers and body (``received``) with the code it got
    (``answered``) and the ``time.monotonic()`` it got it at (``at``)."""

    codes: list[int] = field(default_factory=list)
    release: threading.Event | None = None
    received: list[tuple[dict[str, str], bytes]] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    at: list[float] = field(default_factory=list)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}/hook"

    def start(self) -> Receiver:
        receiver, lock = self, threading.Lock()

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if receiver.release is not None:
                    receiver.release.wait(60)
                with lock:  # handler threads run at once
                    code = receiver.codes.pop(0) if receiver.codes else 200
                    receiver.received.append((dict(self.headers), body))
                    receiver.answered.append(code)
                    receiver.at.append(time.monotonic())
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.release is not None:
            self.release.set()
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()


def by_selection_rule(trials: Sequence[Any]) -> list[tuple[float, int]]:
    """(rank sum, trial number) of ``trials`` best first, as the product chooses among them
    (the rank under the loss plus the rank under MMD; ties to the lower loss, then the
    earlier trial), written here independently of ssad_common.strategy.ranked. Takes the
    API's or the CLI's trial dicts or the worker's TrialRecords, all full-length."""
    from scipy.stats import rankdata

    def get(t: Any, key: str) -> Any:
        return t[key] if isinstance(t, dict) else getattr(t, key)

    rows = [(get(t, "number"), get(t, "validation_loss"), get(t, "losses")["mmd"])
            for t in trials if get(t, "validation_loss") is not None]
    sums = rankdata([r[1] for r in rows]) + rankdata([r[2] for r in rows])
    order = sorted(zip(sums, rows, strict=True), key=lambda p: (p[0], p[1][1], p[1][0]))
    return [(float(total), row[0]) for total, row in order]
