"""Faults a production deployment meets: the device running out of memory, Postgres
restarting under a running job and a serving API, the API killed mid-request. Real
processes, a real Postgres server, real signals; see docs/reliability.md."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch

from service import migrate
from ssad_common.models import Blob, BlobChunk, Dataset, Job, JobTrial
from tests.helpers import (
    client,
    job_status,
    npz,
    queue_and_claim,
    row_counts,
    run_in_process,
    start_api,
    start_worker,
    tiny_job,
    upload_pair,
    wait_for,
)
from tests.pg import PostgresServer, running_postgres
from worker.core import study as study_module

# --------------------------------------------------------------------------- device OOM


def oom_on(trials: Callable[[int], bool]) -> Callable[..., Any]:
    """run_trial, except that the trials chosen raise the error CUDA raises when the
    device is full (trial number = seed - settings.seed; the jobs here use seed 0)."""
    real = study_module.run_trial

    def run_trial(*args: Any, **kwargs: Any) -> Any:
        if trials(kwargs["seed"]):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB "
                                         "(GPU 0; 79.15 GiB total capacity)")
        return real(*args, **kwargs)

    return run_trial


def run_one_job(db_url: str, tmp_path: Path, digits: Any) -> tuple[str, str]:
    job_id, engine, manager, claimed = queue_and_claim(db_url, digits, "oom-test")
    outcome = run_in_process(claimed, manager, db_url, tmp_path)
    engine.dispose()
    return job_id, outcome


def test_a_trial_out_of_device_memory_fails_alone(db_url: str, tmp_path: Path, digits: Any,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study_module, "run_trial", oom_on(lambda seed: seed == 1))
    job_id, outcome = run_one_job(db_url, tmp_path, digits)
    assert outcome == "succeeded"
    with client(db_url) as api:
        job = job_status(api, job_id)
        trials = api.get(f"/v1/jobs/{job_id}/trials").json()["trials"]
        events = api.get(f"/v1/jobs/{job_id}/events").json()["events"]
        assert api.get(f"/v1/jobs/{job_id}/trials/1/scores").status_code == 404
    # The default plan: 3 screen trials (trial 1 runs out of memory), 2 full-length ones.
    assert job["status"] == "succeeded" and job["progress"]["trials_completed"] == 4
    states = {t["number"]: (t["state"], t["error"]) for t in trials}
    assert states[0] == ("COMPLETE", None) and states[2] == ("COMPLETE", None)
    assert states[1][0] == "FAIL" and "out of memory" in states[1][1]
    assert "batch_size" in states[1][1]  # says what to change
    failed = next(t for t in trials if t["number"] == 1)
    assert (failed["stage"], failed["train_steps"]) == ("screen", 2)  # it used its steps
    assert job["progress"]["train_steps_done"] == job["progress"]["train_steps_planned"]
    assert len(trials) == 5 and job["best"]["trial_number"] in (3, 4)  # full-length only
    assert any("trial 1 failed: out of memory" in (e["message"] or "") for e in events)


def test_a_job_whose_every_trial_runs_out_of_memory_fails_clearly(
        db_url: str, tmp_path: Path, digits: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study_module, "run_trial", oom_on(lambda seed: True))
    job_id, outcome = run_one_job(db_url, tmp_path, digits)
    assert outcome == "failed"
    with client(db_url) as api:
        job = job_status(api, job_id)
        trials = api.get(f"/v1/jobs/{job_id}/trials").json()["trials"]
    assert job["status"] == "failed" and "out of memory" in job["error"]
    assert [t["state"] for t in trials] == ["FAIL"] * 5  # the whole plan, no more


# --------------------------------------------------------------------------- Postgres down


@pytest.fixture
def own_postgres() -> Iterator[PostgresServer]:
    """A server of this test's own: it is stopped and started again mid-test."""
    if os.environ.get("SSAD_TEST_POSTGRES_URL"):
        pytest.skip("needs a Postgres server the test may restart")
    with running_postgres() as server:
        yield server


def test_postgres_restart_under_a_running_job_and_a_serving_api(
        own_postgres: PostgresServer, tmp_path: Path, digits: Any) -> None:
    db_url = own_postgres.url(own_postgres.create_database())
    migrate.upgrade_head(db_url)
    train, test, _ = digits
    api, url = start_api(db_url, tmp_path)
    worker = start_worker(db_url, tmp_path, SSAD_LEASE_SECONDS="30")
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            tr, te = upload_pair(c, npz(train[:60, 0]), npz(test[:40, 0]))
            job_id = c.post("/v1/jobs", json=tiny_job(tr, te, n_trials=4, train_steps=40)
                            ).json()["id"]
            planned = c.get(f"/v1/jobs/{job_id}").json()["progress"]["trials_planned"]
            wait_for(lambda: c.get(f"/v1/jobs/{job_id}").json()["progress"][
                "trials_completed"] >= 1, timeout=120)

            own_postgres.pause()  # the outage starts
            down = c.get(f"/v1/jobs/{job_id}")
            assert down.status_code == 503, down.text
            assert down.json()["error"] == "ServiceUnavailable" and down.headers["retry-after"]
            assert c.get("/readyz").status_code == 503
            assert c.get("/healthz").status_code == 200  # the process itself is fine
            time.sleep(3)  # the worker's heartbeats fail meanwhile
            own_postgres.resume()

            wait_for(lambda: c.get("/readyz").status_code == 200, timeout=30)  # by itself
            done = wait_for(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"]
                            in ("succeeded", "failed") and j, timeout=240)
            assert done["status"] == "succeeded", done
            trials = c.get(f"/v1/jobs/{job_id}/trials").json()["trials"]
            # 4 trial-equivalents: 3 families and flip's other direction screened (one
            # equivalent), then 3 full-length trials.
            assert sum(t["state"] == "COMPLETE" for t in trials) == planned == 7
            assert c.get(f"/v1/jobs/{job_id}/scores").status_code == 200
        worker.terminate()
        assert worker.wait(timeout=60) == 0
    finally:
        for p in (api, worker):
            if p.poll() is None:
                p.kill()


# --------------------------------------------------------------------------- API killed


def counts(db_url: str) -> dict[str, int]:
    return row_counts(db_url, Dataset, Blob, BlobChunk, Job, JobTrial)


def wait_for_lock_wait(server: PostgresServer, database: str) -> None:
    """Until one backend of ``database`` is blocked on a lock (the API mid-transaction)."""
    def blocked() -> bool:
        with server.admin() as conn:
            return bool(conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                "AND wait_event_type = 'Lock'", (database,)).fetchone()[0])  # type: ignore[index]

    wait_for(blocked, timeout=30)


def test_api_killed_mid_upload_and_mid_transaction_leaves_nothing_half_written(
        postgres: PostgresServer, pg_template: str, tmp_path: Path, digits: Any) -> None:
    database = postgres.create_database(pg_template)
    db_url = postgres.url(database)
    train, test, _ = digits
    api, url = start_api(db_url, tmp_path)
    port = int(url.rsplit(":", 1)[1])
    # 1. Killed while the body is still arriving: half of a 3 MB upload sent.
    body = npz(np.random.default_rng(0).integers(0, 255, (3000, 32, 32), dtype=np.uint8))
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"big.npz\"\r\nContent-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/"
                     f"form-data; boundary={boundary}\r\nContent-Length: "
                     f"{len(head) + len(body) + len(tail)}\r\n\r\n".encode()
                     + head + body[: len(body) // 2])
        time.sleep(0.5)
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=10)
    assert counts(db_url) == {"datasets": 0, "blobs": 0, "blob_chunks": 0, "jobs": 0,
                              "job_trials": 0}

    # 2. Killed inside the upload's transaction: the blob and its chunks are written, the
    # dataset row waits on a lock the test holds, and the API dies there.
    api, url = start_api(db_url, tmp_path)
    kill_inside_transaction(api, postgres, database, "datasets", f"{url}/v1/datasets",
                            files={"file": ("t.npz", npz(train[:50, 0]))})
    assert counts(db_url)["blobs"] == 0 and counts(db_url)["blob_chunks"] == 0
    assert counts(db_url)["datasets"] == 0

    # 3. Killed inside a job creation's transaction (the job row waits on a lock).
    api, url = start_api(db_url, tmp_path)
    with httpx.Client(base_url=url, timeout=30) as c:
        tr, te = upload_pair(c, npz(train[:30, 0]), npz(test[:20, 0]))
    kill_inside_transaction(api, postgres, database, "jobs", f"{url}/v1/jobs",
                            json=tiny_job(tr, te))
    after = counts(db_url)
    assert after["jobs"] == 0 and after["datasets"] == 2
    # ... and a restarted API serves on, with nothing half-written visible.
    api, url = start_api(db_url, tmp_path)
    try:
        with httpx.Client(base_url=url, timeout=30) as c:
            assert c.get("/v1/jobs").json()["total"] == 0
            assert c.get("/v1/datasets").json()["total"] == 2
            assert c.post("/v1/jobs", json=tiny_job(tr, te)).status_code == 202
    finally:
        api.kill()


def kill_inside_transaction(api: subprocess.Popen[bytes], server: PostgresServer,
                            database: str, table: str, url: str, **post: Any) -> None:
    """POST to the API while the test holds a lock on ``table``, so the request's
    transaction stops at its write there; SIGKILL the API in that state, then let go."""
    import psycopg

    with psycopg.connect(server.url(database, "postgresql")) as locker:
        locker.execute(f"LOCK TABLE {table} IN EXCLUSIVE MODE")
        threading.Thread(target=_post_quietly, args=(url,), kwargs=post, daemon=True).start()
        wait_for_lock_wait(server, database)
        api.send_signal(signal.SIGKILL)
        api.wait(timeout=10)
        locker.rollback()


def _post_quietly(url: str, **kwargs: Any) -> None:
    with contextlib.suppress(httpx.HTTPError):  # the server is killed under this request
        httpx.post(url, timeout=60, **kwargs)


def test_deleting_a_dataset_waits_for_a_job_being_created_on_it(
        postgres: PostgresServer, pg_template: str, tmp_path: Path) -> None:
    """Deleting a dataset takes the tenant's lock, as creating a job does: a job cannot be
    inserted between the delete's "is it used?" check and the delete (that was a
    foreign-key violation, a 500). The test holds the lock as a job creation would; the
    delete waits for it, then answers."""
    import psycopg

    from ssad_common.models import DEFAULT_TENANT_ID

    database = postgres.create_database(pg_template)
    db_url = postgres.url(database)
    api, url = start_api(db_url, tmp_path)
    answers: list[int] = []
    try:
        with httpx.Client(base_url=url, timeout=60) as c:
            _, te = upload_pair(c, npz(np.zeros((4, 8, 8), np.uint8)),
                                 npz(np.ones((4, 8, 8), np.uint8)))
        with psycopg.connect(postgres.url(database, "postgresql")) as locker:
            locker.execute("UPDATE tenants SET id = id WHERE id = %s", (DEFAULT_TENANT_ID,))
            t = threading.Thread(target=lambda: answers.append(
                httpx.delete(f"{url}/v1/datasets/{te}", timeout=60).status_code))
            t.start()
            wait_for_lock_wait(postgres, database)  # the delete waits for the tenant
            assert answers == []
            locker.rollback()
        t.join(timeout=60)
        assert answers == [204]
    finally:
        api.kill()
        api.wait(timeout=30)
