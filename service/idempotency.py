"""``Idempotency-Key`` for the creating POSTs: the first request with a key stores which
resource it created, in the same transaction as the resource; a repeat with the same
request fingerprint gets that resource back (``Idempotent-Replayed: true``), a repeat with
a different request a 409. Two concurrent requests with one key: the second to commit gets a
409 ("in progress") and its retry is a replay. Keys expire after ``idempotency_ttl_hours``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from datetime import timedelta
from typing import IO, Any, TypeVar

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from service.errors import Conflict
from ssad_common.models import IdempotencyKey, utcnow

T = TypeVar("T")


def fingerprint(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


def fingerprint_file(file: IO[bytes], *parts: bytes) -> str:
    """:func:`fingerprint` of (the file's bytes, *parts), read in pieces."""
    file.seek(0, 2)
    size = file.tell()
    file.seek(0)
    h = hashlib.sha256()
    h.update(size.to_bytes(8, "big"))
    while piece := file.read(8 * 1024 * 1024):
        h.update(piece)
    for p in parts:
        h.update(len(p).to_bytes(8, "big"))
        h.update(p)
    return h.hexdigest()


def json_fingerprint(body: Any) -> str:
    return fingerprint(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())


def replay(session: Session, tenant_id: str, scope: str, key: str, fp: str, ttl_hours: float,
           load: Callable[[str], T | None]) -> T | None:
    """The resource a previous request with ``key`` created, or None if there is none (or
    it expired, or its resource has since been deleted: the key is then free again)."""
    row = session.get(IdempotencyKey, (tenant_id, scope, key))
    if row is None:
        return None
    resource = None
    if row.created_at >= utcnow() - timedelta(hours=ttl_hours):
        if row.fingerprint != fp:
            raise Conflict(f"Idempotency-Key {key!r} was already used with a different "
                           f"request (it created {scope} {row.resource_id}); use a new key")
        resource = load(row.resource_id)
    if resource is None:
        session.delete(row)
        session.flush()
    return resource


def remember(session: Session, tenant_id: str, scope: str, key: str, fp: str,
             resource_id: str) -> None:
    session.add(IdempotencyKey(tenant_id=tenant_id, scope=scope, key=key, fingerprint=fp,
                               resource_id=resource_id))
    try:
        session.flush()
    except IntegrityError:
        raise Conflict(f"another request with Idempotency-Key {key!r} is being processed; "
                       "retry this one in a moment to get its result") from None
