"""Everything a worker process needs, built once at its entry point (``python -m worker``)
and passed whole: to the loop (worker/loop.py), which passes it to each job's run
(worker/runner.py). Nothing below the entry point reads settings or the environment."""

from __future__ import annotations

import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

import optuna
import torch

from worker.cache import ArrayCache
from worker.manager import ClaimedJob
from worker.settings import WorkerSettings


class JobQueue(Protocol):
    """What the loop asks of the job manager (worker/manager.py's ``JobManager``; an
    in-memory fake in tests/test_worker_loop.py)."""

    def requeue_stale(self) -> list[str]: ...

    def claim_next_job(self, worker_id: str) -> ClaimedJob | None: ...


Q = TypeVar("Q", bound=JobQueue)


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"


@dataclass(frozen=True)
class WorkerContext(Generic[Q]):
    """One worker's dependencies. ``manager`` is the job queue the loop claims from and the
    runner reports to; ``run_job`` runs one claimed job to an outcome ("succeeded",
    "released", ...): ``worker.runner.run_job`` in a worker, a fake in the loop's tests."""

    settings: WorkerSettings
    manager: Q
    run_job: Callable[[ClaimedJob, WorkerContext[Q]], str]
    device: torch.device
    cache: ArrayCache
    #: The Optuna storage (``worker.storage.open_study_storage``: opened once per process).
    open_storage: Callable[[], optuna.storages.BaseStorage]
    stop: threading.Event = field(default_factory=threading.Event)
    worker_id: str = field(default_factory=new_worker_id)

    @property
    def heartbeat_seconds(self) -> float:
        return self.settings.heartbeat_seconds

    @property
    def poll_seconds(self) -> float:
        return self.settings.poll_seconds
