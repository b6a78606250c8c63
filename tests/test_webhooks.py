"""Webhooks against a real local receiver: one signed notice per terminal state, retried
after a 500, every attempt recorded; the SSRF rule; a slow receiver delays neither the job
nor other notices."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ssad_common.models import WebhookAttempt, WebhookDelivery
from ssad_tune.webhooks import sign, verify
from tests.conftest import fresh_database
from tests.helpers import (
    Receiver,
    assert_error,
    client,
    finish_job_with_scores,
    npz,
    row_counts,
    start_worker,
    tiny_job,
    upload_pair,
    wait_for,
)

FAST = {"webhook_allow_private": True, "webhook_backoff_seconds": 0.2,
        "webhook_poll_seconds": 0.1}


@pytest.fixture
def sqlite_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return fresh_database("sqlite", request, tmp_path)


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver().start()
    yield r
    r.stop()


def _datasets(api: TestClient, digits: Any) -> tuple[str, str]:
    train, test, _ = digits
    return upload_pair(api, npz(train[:40]), npz(test[:30]))


def _deliveries(api: TestClient, job_id: str) -> list[dict[str, Any]]:
    r = api.get(f"/v1/jobs/{job_id}/deliveries")
    assert r.status_code == 200, r.text
    return list(r.json()["deliveries"])


def _delivered(api: TestClient, job_id: str) -> bool:
    """The job's notice has been delivered (a job a worker is cancelling has none yet)."""
    return any(d["status"] == "delivered" for d in _deliveries(api, job_id))


def test_signature_round_trip_and_what_it_refuses() -> None:
    body = b'{"id":"x"}'
    header = sign("whsec_a", body, timestamp=1_000_000)
    assert verify("whsec_a", body, header, now=1_000_010)
    assert not verify("whsec_b", body, header, now=1_000_010)  # another tenant's secret
    assert not verify("whsec_a", body + b" ", header, now=1_000_010)  # body changed
    assert not verify("whsec_a", body, header, now=1_000_000 + 301)  # too old: a replay
    assert not verify("whsec_a", body, "v1=abc", now=1_000_010)  # no timestamp
    forged = header.replace("t=1000000", "t=1000005")  # a fresher timestamp, same MAC
    assert not verify("whsec_a", body, forged, now=1_000_010)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://[::1]/hook",
    "http://169.254.169.254/latest/meta-data", "http://10.1.2.3/hook",
    "http://192.168.0.1/hook", "http://[::ffff:127.0.0.1]/hook", "http://0.0.0.0/",
    "ftp://example.com/hook", "file:///etc/passwd", "http://user:pw@8.8.8.8/hook",
    "not a url", "http:///nohost"])
def test_notify_url_refuses_what_would_reach_the_services_own_network(
        url: str, digits: Any, sqlite_url: str) -> None:
    with client(sqlite_url) as api:
        train_id, test_id = _datasets(api, digits)
        r = api.post("/v1/jobs", json=tiny_job(train_id, test_id, notify_url=url))
        assert_error(r, 422, "InvalidRequest", "notify_url")
        assert api.get("/v1/jobs").json()["total"] == 0  # nothing half written


def test_a_public_address_is_accepted(digits: Any, sqlite_url: str) -> None:
    # An IP literal: no DNS on these machines. Nothing is sent: the job never ends.
    with client(sqlite_url, webhook_dispatch=False) as api:
        train_id, test_id = _datasets(api, digits)
        r = api.post("/v1/jobs", json=tiny_job(train_id, test_id,
                                               notify_url="https://8.8.8.8/hook"))
        assert r.status_code == 202, r.text
        assert r.json()["notify_url"] == "https://8.8.8.8/hook"
        assert _deliveries(api, r.json()["id"]) == []  # nothing until it ends


def test_notice_is_signed_retried_after_a_500_and_recorded(
        db_url: str, digits: Any, receiver: Receiver) -> None:
    receiver.codes = [500]
    with client(db_url, **FAST) as api:
        train_id, test_id = _datasets(api, digits)
        job = api.post("/v1/jobs", json=tiny_job(train_id, test_id,
                                                 notify_url=receiver.url)).json()
        finish_job_with_scores(db_url, job["id"], [
            ("rotate", {"angle": 90.0}, -0.5, list(np.linspace(0, 1, 30)))])
        done = wait_for(lambda: [d for d in _deliveries(api, job["id"])
                                 if d["status"] == "delivered"], timeout=60)
        secret = api.get("/v1/webhooks/secret").json()["secret"]
        assert api.delete(f"/v1/jobs/{job['id']}").status_code == 204  # deliveries go too
        assert row_counts(db_url, WebhookDelivery, WebhookAttempt) == {
            "webhook_deliveries": 0, "webhook_attempts": 0}
    (delivery,) = done
    assert [a["status_code"] for a in delivery["attempts"]] == [500, 200]
    assert delivery["attempts"][0]["error"] == "the receiver answered 500"
    assert len(receiver.received) == 2  # the failed try and the retry, nothing more
    for headers, body in receiver.received:
        assert verify(secret, body, headers["SSAD-Signature"])
        assert headers["SSAD-Delivery"] == delivery["id"]
        assert headers["SSAD-Event"] == "job.succeeded"
    payload = json.loads(receiver.received[-1][1])
    assert payload == delivery["payload"]
    assert payload["type"] == "job.succeeded" and payload["job"]["id"] == job["id"]
    assert payload["job"]["best"]["augmentation"] == "rotate"
    assert payload["job"]["report_url"] == f"/v1/jobs/{job['id']}/report"


def test_one_notice_per_terminal_state_and_a_rotated_secret_signs_the_next(
        db_url: str, digits: Any, receiver: Receiver) -> None:
    with client(db_url, **FAST) as api:
        train_id, test_id = _datasets(api, digits)
        first = api.get("/v1/webhooks/secret").json()["secret"]
        rotated = api.post("/v1/webhooks/secret").json()["secret"]
        assert rotated != first and api.get("/v1/webhooks/secret").json()["secret"] == rotated
        job = api.post("/v1/jobs", json=tiny_job(train_id, test_id,
                                                 notify_url=receiver.url)).json()
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
        assert api.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200  # idempotent
        wait_for(lambda: _delivered(api, job["id"]), timeout=60)
        plain = api.post("/v1/jobs", json=tiny_job(train_id, test_id)).json()
        api.post(f"/v1/jobs/{plain['id']}/cancel")
        assert _deliveries(api, plain["id"]) == []  # no notify_url: no notice
    ((headers, body),) = receiver.received  # the second cancel sent nothing
    assert json.loads(body)["type"] == "job.cancelled"
    assert verify(rotated, body, headers["SSAD-Signature"])
    assert not verify(first, body, headers["SSAD-Signature"])


def test_an_unreachable_receiver_is_retried_then_given_up(
        digits: Any, sqlite_url: str) -> None:
    receiver = Receiver().start()
    url = receiver.url
    receiver.stop()  # nothing listens there any more
    with client(sqlite_url, **FAST, webhook_retry_seconds=1.0) as api:
        train_id, test_id = _datasets(api, digits)
        job = api.post("/v1/jobs", json=tiny_job(train_id, test_id, notify_url=url)).json()
        api.post(f"/v1/jobs/{job['id']}/cancel")
        (delivery,) = wait_for(lambda: [d for d in _deliveries(api, job["id"])
                                        if d["status"] == "failed"], timeout=60)
        metrics = api.get("/metrics").text
    assert len(delivery["attempts"]) >= 2  # retried before giving up
    assert all(a["status_code"] is None and "Connect" in a["error"]
               for a in delivery["attempts"])
    assert delivery["next_attempt_at"] is None
    assert 'ssad_webhook_deliveries{status="failed"} 1.0' in metrics
    assert "ssad_webhook_oldest_pending_age_seconds 0.0" in metrics


def test_a_slow_receiver_delays_neither_the_job_nor_other_notices(
        db_url: str, digits: Any, tmp_path: Path) -> None:
    slow = Receiver(release=threading.Event()).start()
    fast = Receiver().start()
    worker = start_worker(db_url, tmp_path)
    try:
        with client(db_url, **FAST, webhook_timeout_seconds=120.0) as api:
            train_id, test_id = _datasets(api, digits)
            trained = api.post("/v1/jobs", json=tiny_job(
                train_id, test_id, notify_url=slow.url)).json()
            # A real worker trains the job; its end is committed while the receiver hangs.
            wait_for(lambda: api.get(f"/v1/jobs/{trained['id']}").json()["status"]
                     == "succeeded", timeout=600, every=0.5)
            other = api.post("/v1/jobs", json=tiny_job(train_id, test_id,
                                                       notify_url=fast.url)).json()
            api.post(f"/v1/jobs/{other['id']}/cancel")
            wait_for(lambda: _delivered(api, other["id"]), timeout=60)
            assert slow.received == []  # still hanging on the first notice
            assert _deliveries(api, trained["id"])[0]["status"] == "pending"
            slow.release.set()  # type: ignore[union-attr]
            wait_for(lambda: _delivered(api, trained["id"]), timeout=60)
    finally:
        worker.terminate()
        worker.wait(timeout=60)
        slow.stop()
        fast.stop()
    assert len(slow.received) == 1 and len(fast.received) == 1


def test_no_more_notices_are_claimed_than_there_are_free_senders(
        digits: Any, sqlite_url: str) -> None:
    """A notice claimed while every sender hangs on a slow receiver would wait out its
    lease in the queue and be claimed (and sent) again: none is claimed until one frees."""
    slow = Receiver(release=threading.Event()).start()
    try:
        with client(sqlite_url, **FAST, webhook_senders=1, webhook_timeout_seconds=120.0) as api:
            train_id, test_id = _datasets(api, digits)
            jobs = [api.post("/v1/jobs", json=tiny_job(train_id, test_id,
                                                       notify_url=slow.url)).json()
                    for _ in range(2)]
            for job in jobs:
                api.post(f"/v1/jobs/{job['id']}/cancel")

            def leased() -> list[bool]:
                now = datetime.now(UTC)
                return [datetime.fromisoformat(_deliveries(api, j["id"])[0]["next_attempt_at"])
                        > now + timedelta(seconds=5) for j in jobs]

            wait_for(lambda: any(leased()), timeout=60)
            for _ in range(20):  # 20 of the dispatcher's 0.1 s looks: the other stays queued
                assert sorted(leased()) == [False, True]
                time.sleep(0.1)
            slow.release.set()  # type: ignore[union-attr]
            wait_for(lambda: all(_delivered(api, j["id"]) for j in jobs), timeout=60)
    finally:
        slow.stop()
    assert len(slow.received) == 2
