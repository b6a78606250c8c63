"""A job's notice of its terminal state, queued in the transaction that ends the job (an
outbox: the notice is committed exactly when the state is, and no worker ever waits for a
receiver). The API's dispatcher (service/webhooks.py) signs and sends it.

The body, as sent (``type`` is ``job.succeeded``, ``job.failed`` or ``job.cancelled``)::

    {"id": "<delivery id>", "type": "job.succeeded", "created_at": "...",
     "job": {"id": "...", "kind": "tune", "status": "succeeded", "message": "...",
             "best": {"augmentation": "cutout", "params": {...}, "validation_loss": 0.1},
             "url": "/v1/jobs/<id>", "report_url": "/v1/jobs/<id>/report"}}
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from sqlalchemy.orm import Session

from ssad_common.models import JobStatus, WebhookDelivery, utcnow


def event_name(status: JobStatus) -> str:
    return f"job.{status.value}"


def queue_notice(session: Session, *, job_id: str, tenant_id: str, url: str, kind: str,
                 status: JobStatus, message: str, best: dict[str, Any] | None) -> None:
    """Add the delivery of ``status``'s notice to ``url`` to the caller's transaction."""
    delivery_id = str(uuid.uuid4())
    now = utcnow()
    best_out = None if not best else {k: best.get(k) for k in (
        "augmentation", "params", "validation_loss", "trial_number")}
    body = {"id": delivery_id, "type": event_name(status), "created_at": now.isoformat(),
            "job": {"id": job_id, "kind": kind, "status": status.value, "message": message,
                    "best": best_out, "url": f"/v1/jobs/{job_id}",
                    "report_url": f"/v1/jobs/{job_id}/report"}}
    session.add(WebhookDelivery(
        id=delivery_id, job_id=job_id, tenant_id=tenant_id, event=event_name(status),
        url=url, payload=json.dumps(body, separators=(",", ":")), status="pending",
        attempts=0, next_attempt_at=now, created_at=now))
