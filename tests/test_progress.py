"""Progress inside a trial (issue 9 item 14): while a trial trains, its worker reports the
step and the training loss (about once a second, on the heartbeat), the API shows them in
``progress.current_trial`` and the stream sends them; the CLI bar turns them into an ETA."""

from __future__ import annotations

import io
import json
import threading
from datetime import UTC
from pathlib import Path
from typing import Any

from httpx_sse import EventSource

from ssad_common.db import make_engine
from ssad_tune.client import Progress, eta_seconds, step_counts
from tests.helpers import client, job_status, npz, run_in_process, tiny_job, upload_pair, wait_for
from worker.manager import JobManager


def test_a_running_trial_reports_its_step_and_loss(pg_url: str, tmp_path: Path,
                                                   digits: Any) -> None:
    train, test, _ = digits
    with client(pg_url) as api:
        tr, te = upload_pair(api, npz(train[:30, 0]), npz(test[:20, 0]))
        created = api.post("/v1/jobs", json=tiny_job(tr, te, train_steps=50_000)).json()
        job_id = created["id"]
        screen_steps = created["plan"]["screen"]["train_steps_each"]  # the first trial's
        assert screen_steps == 50_000 // 3
        engine = make_engine(pg_url)
        manager = JobManager(engine, lease_seconds=60)
        claimed = manager.claim_next_job("progress-test")
        assert claimed is not None
        outcome: list[str] = []
        runner = threading.Thread(target=lambda: outcome.append(
            run_in_process(claimed, manager, pg_url, tmp_path)))
        runner.start()
        try:
            def current(min_step: int) -> dict[str, Any] | None:
                cur = job_status(api, job_id)["progress"]["current_trial"]
                return cur if cur is not None and cur["step"] > min_step else None

            first = wait_for(lambda: current(0), timeout=120)
            assert first["number"] == 0 and first["steps"] == screen_steps
            assert isinstance(first["loss"], float) and first["at"]
            later = wait_for(lambda: current(first["step"]), timeout=60)  # it moves on
            assert later["step"] > first["step"] and later["number"] == 0
            # The stream sends an event whenever the step changes (not only per trial).
            steps_seen: list[int] = []
            with api.stream("GET", f"/v1/jobs/{job_id}/stream") as r:
                for sse in EventSource(r).iter_sse():
                    assert sse.event == "progress"
                    cur = json.loads(sse.data)["progress"]["current_trial"]
                    steps_seen.append(cur["step"])
                    if len(steps_seen) == 2:
                        break
            assert later["step"] <= steps_seen[0] < steps_seen[1]
            assert api.post(f"/v1/jobs/{job_id}/cancel").status_code == 200
            runner.join(timeout=60)
            assert outcome == ["cancelled"]
            done = job_status(api, job_id)
            assert done["status"] == "cancelled" and done["progress"]["current_trial"] is None
        finally:
            if runner.is_alive():  # make sure the trial stops even if an assert failed
                api.post(f"/v1/jobs/{job_id}/cancel")
                runner.join(timeout=60)
            engine.dispose()


def _job(status: str, done: int, step: int | None = None, loss: float | None = 0.5,
         n_trials: int = 4, steps: int = 100) -> dict[str, Any]:
    current = (None if step is None else
               {"number": done, "step": step, "steps": steps, "loss": loss, "at": None})
    return {"status": status, "best": None,
            "progress": {"n_trials": n_trials, "trials_completed": done,
                         "current_trial": current}}


def test_step_counts_and_eta() -> None:
    assert step_counts(_job("running", 0)) is None  # no report yet: trials only
    assert step_counts(_job("running", 1, step=40)) == (140, 400)
    # The last step, not yet stored: its steps count in full (no jump backwards) ...
    assert step_counts(_job("running", 1, step=100)) == (200, 400)
    # ... and once it is stored (among trials_completed), only that counts it.
    stored = _job("running", 2, step=100)
    stored["progress"]["current_trial"]["number"] = 1
    assert step_counts(stored) == (200, 400)
    assert eta_seconds(140, 400, 40, 50.0) == 130.0  # 100 steps in 50 s, 260 to go
    assert eta_seconds(40, 400, 40, 50.0) is None  # nothing seen to move yet
    assert eta_seconds(400, 400, 0, 10.0) == 0.0


def test_the_bar_shows_steps_and_an_eta_from_the_step_rate() -> None:
    now = [100.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0], tick_seconds=None)
    bar.update(_job("running", 0, step=10, loss=0.69))
    now[0] = 120.0  # 50 steps in 20 s: 2.5 steps/s, 340 to go
    bar.update(_job("running", 0, step=60, loss=0.4123))
    lines = out.getvalue().splitlines()
    assert lines[0] == ("[--------------------] 0/4 trials  trial 0 step 10/100 loss 0.6900  "
                        "best -  running  elapsed 0s  ETA -")
    assert lines[1] == ("[###-----------------] 0/4 trials  trial 0 step 60/100 loss 0.4123  "
                        "best -  running  elapsed 20s  ETA 2m16s")
    now[0] = 130.0
    bar.update(_job("running", 1, step=5, loss=None))  # a non-finite loss is sent as null
    assert out.getvalue().splitlines()[-1].startswith(
        "[#####---------------] 1/4 trials  trial 1 step 5/100 loss -  best -  running")


def test_the_bar_counts_steps_between_trials_too_and_never_moves_back() -> None:
    """A server that states its plan's steps: the bar counts steps between trials as well
    as during one. Counting trials between them made it jump back when a trial started
    (3 of 5 trials is 60 %, but 3 short screen trials are far less of the steps)."""
    def planned(done: int, steps_done: int, step: int | None = None,
                steps: int = 40) -> dict[str, Any]:
        job = _job("running", done, step=step, steps=steps, n_trials=2)
        job["progress"].update(trials_planned=5, train_steps_planned=150,
                               train_steps_done=steps_done)
        return job

    out = io.StringIO()
    bar = Progress(out, clock=lambda: 0.0, tick_seconds=None)
    # 3 screen trials of 10 steps, then 2 full-length ones of 40 and... 150 in all.
    sequence = [planned(3, 30), planned(3, 30, step=1), planned(3, 30, step=40),
                planned(4, 70), planned(4, 70, step=1), planned(4, 70, step=20)]
    fractions = []
    for job in sequence:
        bar.update(job)
        line = out.getvalue().splitlines()[-1]
        fractions.append(line[1:21].count("#"))
    assert fractions == sorted(fractions), (fractions, out.getvalue())
    assert step_counts(planned(3, 30)) == (30, 150)
    assert out.getvalue().splitlines()[0].startswith("[####----------------] 3/5 trials  best -")


def test_the_eta_waits_for_a_training_step_before_it_measures_a_rate() -> None:
    """Claimed, but no step reported yet: no ETA, and the rate is measured from the first
    step seen, not from the claim (the worker's start would inflate it: a new user saw
    'ETA 10m02s' for a 50 s job)."""
    now = [0.0]
    out = io.StringIO()
    bar = Progress(out, clock=lambda: now[0], tick_seconds=None)

    def planned(step: int | None) -> dict[str, Any]:
        job = _job("running", 0, step=step, steps=100, n_trials=2)
        job["progress"].update(trials_planned=2, train_steps_planned=200, train_steps_done=0)
        return job

    bar.update(planned(None))  # claimed, loading data
    now[0] = 30.0
    bar.update(planned(1))  # the first step, 30 s after the claim
    now[0] = 40.0
    bar.update(planned(51))  # 50 steps in 10 s: 5 steps/s, 149 to go
    lines = out.getvalue().splitlines()
    assert lines[0].endswith("ETA -") and lines[1].endswith("ETA -"), lines
    assert lines[2].endswith("ETA 30s"), lines


def test_attached_to_a_running_job_elapsed_counts_from_its_start() -> None:
    """`ssad-tune follow` on a job that has run for 93 s shows elapsed 1m33s, not 0s; a
    job seen queued first (`tune`) counts from when it was seen to start."""
    from datetime import datetime, timedelta

    from ssad_tune.client import running_for

    started = datetime.now(UTC) - timedelta(seconds=93)
    job = _job("running", 1)
    job["started_at"] = started.isoformat().replace("+00:00", "Z")
    assert 92 <= running_for(job) <= 120
    assert running_for({"started_at": None}) == 0.0
    assert running_for({"started_at": (datetime.now(UTC) + timedelta(hours=1))
                        .isoformat()}) == 0.0  # a clock ahead of ours: nothing behind
    out = io.StringIO()
    now = [500.0]
    attached = Progress(out, clock=lambda: now[0], tick_seconds=None)
    attached.update(job)
    assert "elapsed 1m3" in out.getvalue(), out.getvalue()
    # Its trial rate is every finished trial over the whole run: 2 of 4 in ~153 s, so
    # about 153 s to go (counting only the trial seen finish would say 3 × 153 s).
    now[0] = 560.0
    attached.update(_job("running", 2))
    eta = out.getvalue().splitlines()[-1].rsplit("ETA ", 1)[1]
    assert eta.startswith("2m3"), out.getvalue()
    fresh = io.StringIO()
    bar = Progress(fresh, clock=lambda: 500.0, tick_seconds=None)
    bar.update(_job("queued", 0))
    bar.update(job)  # seen queued first: it started while followed
    assert "elapsed 0s" in fresh.getvalue().splitlines()[-1]


def test_a_job_found_ended_shows_how_long_it_ran_not_how_long_it_was_watched() -> None:
    """``follow`` on a finished job drew ``elapsed 0s`` for a job that ran 54 s (a new
    user's report): the bar now reads the job's own start and finish."""
    out = io.StringIO()
    bar = Progress(out, clock=lambda: 500.0, tick_seconds=None)
    ended = {**_job("succeeded", 4), "started_at": "2026-12-03T21:00:01Z",
             "finished_at": "2026-12-03T21:00:55.4+00:00"}
    bar.update(ended)
    assert out.getvalue().splitlines()[-1].endswith("succeeded  elapsed 54s  ETA -")
    # a server that does not state both times: nothing to say but 0s, as before
    bar = Progress(out, clock=lambda: 500.0, tick_seconds=None)
    bar.update({**_job("cancelled", 1), "started_at": None, "finished_at": None})
    assert out.getvalue().splitlines()[-1].endswith("cancelled  elapsed 0s  ETA -")
