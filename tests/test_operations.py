"""Operations: Prometheus /metrics, structured worker logs with the job id, and the Optuna
dashboard's view of the studies."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import optuna
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ssad_common.db import make_engine
from ssad_common.settings import optuna_storage_url
from tests.conftest import fresh_database
from tests.helpers import (
    client,
    finish_job_with_scores,
    job_status,
    npz,
    start_worker,
    tiny_job,
    upload,
    upload_pair,
    wait_http_ok,
)
from tests.pg import free_port
from worker.manager import JobManager


def scrape(api: Any) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = api.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(r.text) for s in fam.samples}


def test_metrics_follow_the_queue(db_url: str) -> None:
    with client(db_url) as api:
        before = scrape(api)
        assert before[("ssad_database_up", ())] == 1
        assert before[("ssad_queue_depth", ())] == 0
        data = npz(np.zeros((10, 8, 8), np.uint8))
        ds = upload(api, data, "d.npz").json()["id"]
        upload(api, b"junk", "bad.npz")
        done = api.post("/v1/jobs", json=tiny_job(ds, ds)).json()["id"]
        finish_job_with_scores(db_url, done, [("invert", {}, 0.5, [1.0] * 10),
                                              ("rotate", {"angle": 90.0}, 0.1, [2.0] * 10)])
        api.post("/v1/jobs", json=tiny_job(ds, ds))
        running = api.post("/v1/jobs", json=tiny_job(ds, ds)).json()["id"]
        engine = make_engine(db_url)
        claimed = JobManager(engine).claim_next_job("worker-a")  # the older queued job
        engine.dispose()
        assert claimed is not None and claimed.id != running
        m = scrape(api)
    assert m[("ssad_jobs", (("status", "succeeded"),))] == 1
    assert m[("ssad_jobs", (("status", "running"),))] == 1
    assert m[("ssad_jobs", (("status", "queued"),))] == 1 == m[("ssad_queue_depth", ())]
    assert m[("ssad_queue_oldest_age_seconds", ())] >= 0
    assert m[("ssad_workers_busy", ())] == 1
    # The autoscaling target: the running job's slot and the queued job's one (parallelism 1).
    assert m[("ssad_trial_slots_wanted", ())] == 2
    assert m[("ssad_trial_slots_running", ())] == 1
    assert ("ssad_worker_heartbeat_age_seconds", (("worker", "worker-a"),)) in m
    assert m[("ssad_trials", (("state", "COMPLETE"),))] == 2
    assert m[("ssad_trial_duration_seconds_count", ())] == 2
    assert m[("ssad_trial_duration_seconds_sum", ())] == 3.0  # 1 s + 2 s (the helper's)
    assert m[("ssad_trial_duration_seconds_bucket", (("le", "1.0"),))] == 1
    assert m[("ssad_upload_bytes_total", ())] == len(data) + 4
    assert m[("ssad_uploads_total", (("outcome", "created"),))] == 1
    assert m[("ssad_uploads_total", (("outcome", "refused"),))] == 1


def test_metrics_answer_while_the_database_is_down() -> None:
    with client("postgresql+psycopg://nobody@127.0.0.1:9/none") as api:
        m = scrape(api)
    assert m[("ssad_database_up", ())] == 0


def test_worker_logs_are_json_with_the_job_id(request: pytest.FixtureRequest, tmp_path: Path,
                                               digits: Any) -> None:
    """On SQLite only: the log format does not depend on the database (a worker process
    each, the test's whole cost)."""
    db_url = fresh_database("sqlite", request, tmp_path)
    train, test, _ = digits
    with client(db_url) as api:
        tr, te = upload_pair(api, npz(train[:40, 0]), npz(test[:20, 0]))
        job = api.post("/v1/jobs", json=tiny_job(tr, te)).json()["id"]
        worker = start_worker(db_url, tmp_path, "--max-jobs", "1", SSAD_LOG_FORMAT="json")
        assert worker.wait(timeout=240) == 0
        assert job_status(api, job)["status"] == "succeeded"
    log = next(tmp_path.glob("worker-*.log")).read_text().splitlines()
    records = [json.loads(line) for line in log]  # every line is one JSON object
    assert {"ts", "level", "logger", "message", "job_id"} <= set(records[0])
    start = next(i for i, r in enumerate(records) if "claimed" in r["message"])
    end = next(i for i, r in enumerate(records) if r["message"].endswith(": succeeded"))
    during = records[start + 1:end]
    assert len(during) >= 3  # the trials
    assert all(r["job_id"] == job for r in during), [r for r in during if r["job_id"] != job]
    assert records[0]["job_id"] is None  # "worker ... on cpu", before any job


def test_optuna_dashboard_lists_each_jobs_study(db_url: str, tmp_path: Path) -> None:
    """The documented command, `optuna-dashboard <optuna_storage_url(database url)>`, run
    for real: its API lists every job's study, named job-<id>, with its trials."""
    with client(db_url) as api:
        ds = upload(api, npz(np.zeros((6, 8, 8), np.uint8)), "d.npz").json()["id"]
        job = api.post("/v1/jobs", json=tiny_job(ds, ds)).json()["id"]
    url = optuna_storage_url(db_url.replace("+psycopg", ""))
    study = optuna.create_study(storage=url, study_name=f"job-{job}")  # as a worker does
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), url, "--host", "127.0.0.1",
         "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http_ok(f"{base}/api/studies", timeout=60)
        listed = httpx.get(f"{base}/api/studies").json()["study_summaries"]
        assert [s["study_name"] for s in listed] == [f"job-{job}"]
        detail = httpx.get(f"{base}/api/studies/{listed[0]['study_id']}").json()
        assert len(detail["trials"]) == 2
    finally:
        dashboard.kill()
        dashboard.wait()
