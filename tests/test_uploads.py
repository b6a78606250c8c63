"""The upload path end to end: reuse of the same content, resized sets, chunked bodies over
the limit, a busy connection pool, and many uploads at once against a real server."""

from __future__ import annotations

import io
import select
import socket
import threading
import time
import zipfile
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
from PIL import Image

from ssad_common.models import Blob, Dataset
from tests.helpers import assert_error, client, count, make_key, npz, start_api, tiny_job, upload

GREY = np.random.default_rng(3).integers(0, 256, (6, 8, 8), dtype=np.uint8)


def png(arr: np.ndarray) -> bytes:
    b = io.BytesIO()
    Image.fromarray(arr).save(b, format="PNG")
    return b.getvalue()


def test_same_content_and_name_answers_the_existing_dataset(db_url: str) -> None:
    with client(db_url) as c:
        first = upload(c, npz(GREY), "a.npz", name="line 3")
        assert first.status_code == 201, first.text
        ds = first.json()["id"]
        assert first.headers["Location"] == f"/v1/datasets/{ds}"
        assert "Dataset-Existing" not in first.headers
        again = upload(c, npz(GREY), "b.npz", name="line 3")  # same array, same name
        assert again.status_code == 200, again.text
        assert again.headers["Dataset-Existing"] == "true"
        assert again.headers["Location"] == f"/v1/datasets/{ds}"
        assert again.json()["id"] == ds
        # Same array as .npy and as a zip of PNGs: the same stored content.
        npy = io.BytesIO()
        np.save(npy, GREY)
        assert upload(c, npy.getvalue(), "a.npy", name="line 3").json()["id"] == ds
        # Another name: a new dataset (sharing the stored blob).
        other = upload(c, npz(GREY), "a.npz", name="line 4")
        assert other.status_code == 201 and other.json()["id"] != ds
        assert c.get(other.headers["Location"]).json()["name"] == "line 4"
        assert (count(db_url, Dataset), count(db_url, Blob)) == (2, 1)
        # Once deleted, the same upload creates it again.
        assert c.delete(f"/v1/datasets/{ds}").status_code == 204
        assert upload(c, npz(GREY), "a.npz", name="line 3").status_code == 201


def test_a_zip_of_mixed_sizes_is_resized_to_the_most_common_and_says_so(db_url: str) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for i in range(3):
            zf.writestr(f"{i}.png", png(GREY[i]))
        zf.writestr("big.png", png(np.zeros((16, 12), np.uint8)))
    with client(db_url) as c:
        r = upload(c, buf.getvalue(), "mixed.zip")
        assert r.status_code == 201, r.text
        body = r.json()
        assert (body["n_samples"], body["height"], body["width"]) == (4, 8, 8)
        assert body["resized_from"] == [{"height": 16, "width": 12, "count": 1}]
        assert upload(c, npz(GREY), "same.npz").json()["resized_from"] is None
        again = c.get(r.headers["Location"]).json()  # stored: every read says so
        assert again["height"] == 8 and again["resized_from"] == body["resized_from"]
        # A job then resizes train and test to its working size, and says so.
        other = upload(c, npz(np.zeros((3, 40, 40), np.uint8)), "big.npz").json()["id"]
        job = c.post("/v1/jobs", json=tiny_job(r.json()["id"], other))
        assert job.status_code == 202, job.text
        assert job.json()["spec"]["images"] == {"train": [8, 8], "test": [40, 40],
                                                "working_size": 32}
        first = c.get(f"/v1/jobs/{job.json()['id']}/events").json()["events"][0]
        assert "resized to the working size 32x32 (train 8x8, test 40x40)" in first["message"]


def test_pool_exhaustion_is_a_503_with_retry_after(pg_url: str) -> None:
    with client(pg_url, db_pool_size=1, db_max_overflow=0, db_pool_timeout_seconds=0.5) as c:
        held = c.app.state.engine.connect()  # type: ignore[attr-defined]
        try:
            r = c.get("/v1/datasets")
            assert_error(r, 503, "ServiceUnavailable", "busy")
            assert int(r.headers["Retry-After"]) >= 1
        finally:
            held.close()
        assert c.get("/v1/datasets").status_code == 200


def test_a_chunked_body_over_the_limit_gets_413_before_it_is_all_read(
        pg_url: str, tmp_path: Path) -> None:
    limit = 1_000_000
    api, url = start_api(pg_url, tmp_path, SSAD_MAX_UPLOAD_BYTES=str(limit))
    try:
        u = urlparse(url)
        preamble = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"x.npy\""
                    b"\r\nContent-Type: application/octet-stream\r\n\r\n")
        piece = bytes(64 * 1024)
        sent = 0
        with socket.create_connection((u.hostname, u.port), timeout=30) as s:
            s.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"Content-Type: multipart/form-data; boundary=B\r\n\r\n")
            s.sendall(b"%x\r\n%s\r\n" % (len(preamble), preamble))
            try:
                while sent < 256 * 1024**2 and not select.select([s], [], [], 0)[0]:
                    s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent += len(piece)
            except (BrokenPipeError, ConnectionResetError):
                pass
            select.select([s], [], [], 30)
            reply = b""
            try:
                while b"}" not in reply and (data := s.recv(65536)):
                    reply += data
            except ConnectionResetError:
                pass
        head, _, body = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), reply[:300]
        assert b'"error":"PayloadTooLarge"' in body, body
        # Refused once the bytes received passed the limit: the client could push at most
        # a few socket buffers more, never the 256 MB it had to send.
        assert sent < 32 * 1024**2, sent
        assert count(pg_url, Dataset) == 0
        assert httpx.get(f"{url}/healthz").status_code == 200
    finally:
        api.terminate()
        api.wait(timeout=30)


def test_many_concurrent_uploads_on_a_small_pool(pg_url: str, tmp_path: Path) -> None:
    """60 uploads at once against a real server with a pool of 2 connections: every answer
    is a 201 or a 503 with Retry-After (never a 500), each 201 is stored, and /healthz
    keeps answering quickly throughout."""
    key = make_key(pg_url, "busy")
    api, url = start_api(pg_url, tmp_path, SSAD_AUTH="required", SSAD_DB_POOL_SIZE="2",
                         SSAD_DB_MAX_OVERFLOW="0", SSAD_DB_POOL_TIMEOUT_SECONDS="5")
    rng = np.random.default_rng(7)
    files = [npz(rng.integers(0, 256, (100, 32, 32), dtype=np.uint8)) for _ in range(60)]
    results: list[httpx.Response | Exception] = []
    health: list[float] = []
    done = threading.Event()

    def one(data: bytes) -> None:
        try:
            with httpx.Client(base_url=url, timeout=120,
                              headers={"Authorization": f"Bearer {key}"}) as c:
                results.append(upload(c, data, "x.npz"))
        except Exception as exc:
            results.append(exc)

    def watch_health() -> None:
        with httpx.Client(base_url=url, timeout=120) as c:
            while not done.is_set():
                t = time.perf_counter()
                assert c.get("/healthz").status_code == 200
                health.append(time.perf_counter() - t)
                done.wait(0.1)

    try:
        watcher = threading.Thread(target=watch_health)
        watcher.start()
        threads = [threading.Thread(target=one, args=(f,)) for f in files]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        done.set()
        watcher.join(timeout=60)
        statuses = []
        for r in results:
            assert isinstance(r, httpx.Response), r
            statuses.append(r.status_code)
            if r.status_code == 503:
                assert_error(r, 503, "ServiceUnavailable")
                assert "Retry-After" in r.headers
            else:
                assert r.status_code == 201, r.text
        print(f"60 uploads: {statuses.count(201)} x 201, {statuses.count(503)} x 503; "
              f"/healthz max {max(health):.3f} s over {len(health)} probes")
        assert len(statuses) == 60
        assert statuses.count(201) >= 1
        assert count(pg_url, Dataset) == statuses.count(201)
        assert health and max(health) < 10, max(health, default=None)
    finally:
        done.set()
        api.terminate()
        api.wait(timeout=30)
