"""Logging for every ssad-tune process: plain text for people, or one JSON object per line
for log pipelines (``SSAD_LOG_FORMAT=json``). Either way a line written while a worker
runs a job carries that job's id (``job_id``), whichever thread wrote it."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Literal

#: The job the current thread is working on (set by the worker around a job, and by the
#: job's heartbeat thread for itself: threads do not inherit context variables).
current_job: contextvars.ContextVar[str | None] = contextvars.ContextVar("job_id", default=None)


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    token = current_job.set(job_id)
    try:
        yield
    finally:
        current_job.reset(token)


class JobIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        job = current_job.get()
        record.job_id = job
        record.job = f" [job {job}]" if job else ""
        return True


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "job_id": getattr(record, "job_id", None),
            "process": record.process,
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s%(job)s %(message)s"


def configure(fmt: Literal["text", "json"] = "text", level: int = logging.INFO) -> None:
    """Route the root logger to stderr in ``fmt``; idempotent."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(JobIdFilter())
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_ssad", False):
            root.removeHandler(old)
    handler._ssad = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(level)
