"""The signature on ssad-tune's webhooks, for receivers to check (standard library only).

Every delivery is a POST of a JSON body with these headers:

* ``SSAD-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``, keyed with
  your tenant's webhook secret (``GET /v1/webhooks/secret``), as Stripe signs its events;
* ``SSAD-Delivery``: the delivery's id (the body's ``id``): the same on every retry, so a
  receiver that may see a notice twice (a retry after a lost answer) can drop repeats;
* ``SSAD-Event``: ``job.succeeded``, ``job.failed`` or ``job.cancelled``.

A receiver checks the signature on the raw bytes, before parsing them::

    from ssad_tune.webhooks import verify
    if not verify(secret, request_body, request.headers["SSAD-Signature"]):
        return 400
"""

from __future__ import annotations

import hashlib
import hmac
import time

SIGNATURE_HEADER = "SSAD-Signature"
DELIVERY_HEADER = "SSAD-Delivery"
EVENT_HEADER = "SSAD-Event"
#: How old a signature's timestamp may be (seconds) before :func:`verify` refuses it: a
#: captured request cannot be replayed later than this.
DEFAULT_TOLERANCE = 300


def _mac(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secret: str, body: bytes, timestamp: int | None = None) -> str:
    """The ``SSAD-Signature`` header's value for ``body`` sent at ``timestamp`` (now)."""
    t = int(time.time()) if timestamp is None else timestamp
    return f"t={t},v1={_mac(secret, t, body)}"


def verify(secret: str, body: bytes, header: str, *, tolerance: float = DEFAULT_TOLERANCE,
           now: float | None = None) -> bool:
    """Whether ``header`` is a valid signature of ``body`` under ``secret``, made at most
    ``tolerance`` seconds ago. Compares in constant time."""
    fields: dict[str, list[str]] = {}
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        fields.setdefault(key, []).append(value)
    try:
        t = int(fields["t"][0])
    except (KeyError, ValueError):
        return False
    if abs((time.time() if now is None else now) - t) > tolerance:
        return False
    expected = _mac(secret, t, body)
    return any(hmac.compare_digest(expected, v) for v in fields.get("v1", []))
