"""The worker loop (worker/loop.py) against an in-memory job queue and a fake runner: no
database, no training, no real sleeping (the stop event records how long the loop would
have waited). What the loop promises: it claims jobs in the queue's order, stops on
``stop``, honours ``max_jobs``, backs off while the database is down and after a job it
could not finish, and never exits on a claim error."""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path

import optuna
import pytest
import torch
from sqlalchemy.exc import OperationalError

from worker.cache import ArrayCache
from worker.context import WorkerContext
from worker.loop import run_worker
from worker.manager import ClaimedJob, DatasetRef
from worker.settings import WorkerSettings

REF = DatasetRef(id="d", sha256="0" * 64, n_samples=1, channels=1, height=1, width=1)


def job(n: int) -> ClaimedJob:
    return ClaimedJob(id=f"job-{n}", attempt=1, spec={}, train=REF, test=REF)


class RecordingStop(threading.Event):
    """The loop's stop event; ``wait`` returns at once, records its timeout and, after
    ``stop_after_waits`` waits, sets the event (so an idle loop ends)."""

    def __init__(self, stop_after_waits: int | None = None) -> None:
        super().__init__()
        self.waits: list[float | None] = []
        self.stop_after_waits = stop_after_waits

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout)
        if self.stop_after_waits is not None and len(self.waits) >= self.stop_after_waits:
            self.set()
        return self.is_set()


class FakeQueue:
    """The manager as the loop sees it (worker.context.JobQueue), in memory. ``outages``:
    how many calls, from the next one, fail as a database that is down does."""

    def __init__(self, jobs: Iterable[ClaimedJob] = (), outages: int = 0) -> None:
        self.queued = deque(jobs)
        self.outages = outages
        self.calls: list[str] = []
        self.claimed_by: list[str] = []

    def _reach(self, call: str) -> None:
        self.calls.append(call)
        if self.outages:
            self.outages -= 1
            raise OperationalError("SELECT 1", {}, ConnectionRefusedError("database down"))

    def requeue_stale(self) -> list[str]:
        self._reach("requeue_stale")
        return []

    def claim_next_job(self, worker_id: str) -> ClaimedJob | None:
        self._reach("claim_next_job")
        if not self.queued:
            return None
        self.claimed_by.append(worker_id)
        return self.queued.popleft()


Runner = Callable[[ClaimedJob, WorkerContext[FakeQueue]], str]


def no_storage() -> optuna.storages.BaseStorage:
    raise AssertionError("the loop never opens Optuna's storage itself")


def context(queue: FakeQueue, runner: Runner, tmp_path: Path, stop: RecordingStop,
            poll_seconds: float = 0.5) -> WorkerContext[FakeQueue]:
    settings = WorkerSettings(database_url=f"sqlite:///{tmp_path / 'unused.db'}",
                              poll_seconds=poll_seconds, cache_dir=str(tmp_path / "cache"))
    return WorkerContext(settings=settings, manager=queue, run_job=runner,
                         device=torch.device("cpu"), cache=ArrayCache(settings.cache_dir),
                         open_storage=no_storage, stop=stop, worker_id="w-1")


def scripted(outcomes: dict[str, str | Exception], ran: list[str]) -> Runner:
    """A runner that records the jobs it is given and ends each as ``outcomes`` says
    ("succeeded" unless listed; an exception is raised, as a job that could not end)."""
    def run(claimed: ClaimedJob, ctx: WorkerContext[FakeQueue]) -> str:
        ran.append(claimed.id)
        outcome = outcomes.get(claimed.id, "succeeded")
        if isinstance(outcome, Exception):
            raise outcome
        return outcome
    return run


def test_claims_in_order_as_itself_and_honours_max_jobs(tmp_path: Path) -> None:
    queue, stop = FakeQueue([job(1), job(2), job(3)]), RecordingStop()
    ran: list[str] = []
    ctx = context(queue, scripted({}, ran), tmp_path, stop)
    assert run_worker(ctx, max_jobs=2) == 2
    assert ran == ["job-1", "job-2"]
    assert [j.id for j in queue.queued] == ["job-3"]  # the third stays queued
    assert queue.claimed_by == ["w-1", "w-1"]
    assert queue.calls == ["requeue_stale", "claim_next_job"] * 2  # stale leases first
    assert stop.waits == []  # succeeded jobs: straight to the next


def test_stops_when_stop_is_set(tmp_path: Path) -> None:
    queue, stop = FakeQueue([job(1), job(2)]), RecordingStop()
    ran: list[str] = []

    def stop_during_the_job(claimed: ClaimedJob, ctx: WorkerContext[FakeQueue]) -> str:
        ran.append(claimed.id)
        ctx.stop.set()  # SIGTERM while the job runs: it is released, the loop ends
        return "released"

    assert run_worker(context(queue, stop_during_the_job, tmp_path, stop)) == 1
    assert ran == ["job-1"] and [j.id for j in queue.queued] == ["job-2"]
    assert stop.waits == []  # no back-off once stopping

    already = RecordingStop()
    already.set()
    queue = FakeQueue([job(1)])
    assert run_worker(context(queue, stop_during_the_job, tmp_path, already)) == 0
    assert queue.calls == []


def test_an_empty_queue_is_polled(tmp_path: Path) -> None:
    queue, stop = FakeQueue(), RecordingStop(stop_after_waits=3)
    ran: list[str] = []
    assert run_worker(context(queue, scripted({}, ran), tmp_path, stop,
                              poll_seconds=0.25)) == 0
    assert stop.waits == [0.25, 0.25, 0.25] and ran == []
    assert queue.calls.count("claim_next_job") == 3


@pytest.mark.parametrize(("poll", "backoff"), [(0.5, 2.0), (5.0, 5.0)])
def test_waits_out_a_database_outage_and_never_exits_on_it(
        tmp_path: Path, poll: float, backoff: float) -> None:
    """Three calls fail (the database is down): each is followed by a back-off of at
    least two seconds, then the loop goes on and runs the job."""
    queue, stop = FakeQueue([job(1)], outages=3), RecordingStop()
    ran: list[str] = []
    ctx = context(queue, scripted({}, ran), tmp_path, stop, poll_seconds=poll)
    assert run_worker(ctx, max_jobs=1) == 1
    assert stop.waits == [backoff] * 3
    assert ran == ["job-1"]


def test_backs_off_after_a_released_or_abandoned_job(tmp_path: Path) -> None:
    queue, stop = FakeQueue([job(1), job(2), job(3), job(4)]), RecordingStop()
    ran: list[str] = []
    outcomes: dict[str, str | Exception] = {
        "job-1": "released", "job-2": OperationalError("UPDATE", {}, Exception("gone")),
        "job-3": "failed"}
    ctx = context(queue, scripted(outcomes, ran), tmp_path, stop)
    assert run_worker(ctx, max_jobs=4) == 4  # the exception did not end the loop
    assert ran == ["job-1", "job-2", "job-3", "job-4"]
    assert stop.waits == [2.0, 2.0]  # after job-1 (released) and job-2 (abandoned) only
