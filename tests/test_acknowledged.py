"""A 2xx means committed: every write is stored before its response starts, so a client
can read it back at once, and a crash of the API the moment the answer arrives loses
nothing that was acknowledged. Real uvicorn processes over real sockets, on Postgres and
SQLite (an in-process TestClient cannot show this: it waits for the whole ASGI call)."""

from __future__ import annotations

import signal
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from tests.helpers import npz, start_api, tiny_job, upload, upload_pair

# No quota gets in the way of a loop of creations (the quotas have tests of their own).
UNLIMITED = {"SSAD_MAX_ACTIVE_JOBS": "100000"}
# The killed-API drill's bound on rounds while it waits for answers that arrived whole.
MAX_ROUNDS = 12


def tiny_images(i: int) -> bytes:
    return npz(np.full((2, 8, 8), i % 256, dtype=np.uint8))


def test_every_create_reads_back_at_once(db_url: str, tmp_path: Path) -> None:
    """1,000 create-then-read pairs (500 datasets, 500 jobs), each GET sent the moment the
    2xx arrived on the same keep-alive connection: not one 404."""
    api, url = start_api(db_url, tmp_path, **UNLIMITED)
    missing: list[str] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            train, test = upload_pair(c, tiny_images(1), tiny_images(2))
            for i in range(500):
                r = upload(c, tiny_images(i), "d.npz", name=f"d{i}")
                assert r.status_code == 201, r.text
                if c.get(f"/v1/datasets/{r.json()['id']}").status_code != 200:
                    missing.append(f"dataset {i}")
            for i in range(500):
                r = c.post("/v1/jobs", json=tiny_job(train, test, seed=i))
                assert r.status_code == 202, r.text
                if c.get(r.headers["location"]).status_code != 200:
                    missing.append(f"job {i}")
    finally:
        api.kill()
        api.wait(timeout=30)
    assert missing == [], f"{len(missing)} acknowledged creations read back as 404: {missing[:5]}"


def raw(request: httpx.Request) -> bytes:
    """``request`` as the bytes an HTTP/1.1 client sends."""
    body = request.read()
    head = [f"{request.method} {request.url.raw_path.decode()} HTTP/1.1",
            f"Host: {request.url.host}"]
    head += [f"{k}: {v}" for k, v in request.headers.items() if k.lower() != "host"]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def send_and_kill_on_first_byte(api: subprocess.Popen[bytes], url: str,
                                request: httpx.Request) -> tuple[int, dict[str, Any] | None]:
    """Send ``request``; SIGKILL the API the moment the first byte of its answer arrives.
    The status and the JSON body, if the whole of it had been sent by then."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    with socket.create_connection((host, port or 80), timeout=60) as sock:
        sock.sendall(raw(request))
        received = sock.recv(1)
        api.send_signal(signal.SIGKILL)
        while chunk := sock.recv(65536):
            received += chunk
    api.wait(timeout=30)
    head, _, body = received.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    headers = dict(line.split(b": ", 1) for line in head.split(b"\r\n")[1:])
    complete = len(body) == int(headers.get(b"content-length", b"-1"))
    return status, (httpx.Response(status, content=body).json() if complete and body else None)


def test_api_killed_on_the_first_byte_of_each_2xx_loses_nothing_acknowledged(
        db_url: str, tmp_path: Path) -> None:
    """Each write on a fresh API process that is killed as its answer starts; after a
    restart, every acknowledged write is there: created datasets and jobs exist, a
    cancelled job is cancelled, a deleted dataset is gone."""
    api, url = start_api(db_url, tmp_path, **UNLIMITED)
    with httpx.Client(base_url=url, timeout=60) as c:
        train, test = upload_pair(c, tiny_images(1), tiny_images(2))
    api.kill()
    api.wait(timeout=30)
    created: list[str] = []   # GET must answer 200
    cancelled: list[str] = []  # GET must say cancelled
    deleted: list[str] = []   # GET must answer 404
    build = httpx.Client(base_url=url)
    # At least two rounds (two cancels, two deletes); more while fewer than three creations
    # were answered whole before the kill (on a loaded machine the kill often lands between
    # the head and the body). Each step starts an API process: the test's cost.
    round_ = 0
    while round_ < 2 or (len(created) < 3 and round_ < MAX_ROUNDS):
        steps: list[tuple[str, httpx.Request]] = [
            ("dataset", build.build_request("POST", "/v1/datasets", files={
                "file": ("d.npz", tiny_images(100 + round_))}, data={"name": f"r{round_}"})),
            ("job", build.build_request("POST", "/v1/jobs",
                                        json=tiny_job(train, test, seed=round_)))]
        for kind, request in steps:
            api, url = start_api(db_url, tmp_path, **UNLIMITED)
            status, body = send_and_kill_on_first_byte(api, url, request)
            assert status in (201, 202), (status, body)
            if body is not None:
                created.append(f"/v1/{kind}s/{body['id']}")
        # Now a cancel and a delete, each acknowledged on a process killed at once.
        api, url = start_api(db_url, tmp_path, **UNLIMITED)
        with httpx.Client(base_url=url, timeout=60) as c:
            job = c.post("/v1/jobs", json=tiny_job(train, test)).json()["id"]
            doomed = upload(c, tiny_images(200 + round_), "x.npz", name=f"x{round_}").json()
        status, body = send_and_kill_on_first_byte(
            api, url, build.build_request("POST", f"/v1/jobs/{job}/cancel"))
        assert status == 200, (status, body)
        cancelled.append(job)
        api, url = start_api(db_url, tmp_path, **UNLIMITED)
        status, body = send_and_kill_on_first_byte(
            api, url, build.build_request("DELETE", f"/v1/datasets/{doomed['id']}"))
        assert status == 204, (status, body)
        deleted.append(doomed["id"])
        round_ += 1
    build.close()
    assert len(created) >= 3, "too few answers arrived whole to prove anything"

    api, url = start_api(db_url, tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            lost = [p for p in created if c.get(p).status_code != 200]
            lost += [f"cancel of {j}" for j in cancelled
                     if c.get(f"/v1/jobs/{j}").json()["status"] != "cancelled"]
            lost += [f"delete of {d}" for d in deleted
                     if c.get(f"/v1/datasets/{d}").status_code != 404]
    finally:
        api.kill()
        api.wait(timeout=30)
    assert lost == [], f"acknowledged but lost after a crash: {lost}"
