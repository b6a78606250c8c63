"""The live progress stream of a job (server-sent events, ``GET /v1/jobs/{id}/stream``).

``progress`` carries the job (as ``GET /v1/jobs/{id}``) whenever what a client shows of it
changes; ``end`` follows once it has ended. sse-starlette's ``EventSourceResponse`` sends
the keep-alive comments and ends the stream when the client goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from sse_starlette import EventSourceResponse, ServerSentEvent

from service.jobs.schemas import JobOut
from ssad_common.lifecycle import TERMINAL

STREAM_POLL_SECONDS = 0.5
STREAM_KEEPALIVE_SECONDS = 15.0
STREAM_MAX_SECONDS = 3600.0
SEP = "\n"


def _progress_key(j: JobOut) -> tuple[Any, ...]:
    best = j.best.trial_number if j.best else None
    return (j.status, j.progress.trials_completed, best, j.attempt, j.cancel_requested,
            j.progress.current_trial)


async def _events(read: Callable[[], Awaitable[JobOut]], job: JobOut
                  ) -> AsyncIterator[ServerSentEvent]:
    last_key = None
    started = time.monotonic()
    while True:
        key = _progress_key(job)
        if key != last_key:
            yield ServerSentEvent(job.model_dump_json(), event="progress", sep=SEP)
            last_key = key
        if job.status in TERMINAL:
            yield ServerSentEvent(json.dumps({"status": job.status}), event="end", sep=SEP)
            return
        if time.monotonic() - started > STREAM_MAX_SECONDS:
            return  # clients reconnect (EventSource does by itself)
        await asyncio.sleep(STREAM_POLL_SECONDS)
        try:
            job = await read()
        except Exception:  # the database blinked: say nothing, try again
            continue


def progress_stream(read: Callable[[], Awaitable[JobOut]], first: JobOut
                    ) -> EventSourceResponse:
    """The stream that starts from ``first`` and polls ``read`` (on the event loop:
    service/reads.py) for the job's changes."""
    return EventSourceResponse(
        _events(read, first), sep=SEP, ping=STREAM_KEEPALIVE_SECONDS,
        ping_message_factory=lambda: ServerSentEvent(comment="keep-alive", sep=SEP),
        headers={"Cache-Control": "no-cache"})
