"""Request parameters every route shares: resource ids, paging, trial numbers, and the rule
that a query parameter a route does not declare is an error, not silently ignored.

Ids are bounded strings of URL-safe characters, checked before any query runs: a NUL (which
Postgres refuses in text) or a 10 kB id is a 422 naming the parameter, while a well-formed id
that names nothing is a 404. Integers are bounded to what the database's columns hold
(OFFSET and trial numbers beyond a signed 32-bit integer are a 422, not a driver overflow).
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Request
from fastapi.dependencies.models import Dependant
from pydantic import Field

from service.errors import InvalidRequest

#: Every id the API hands out is a UUID; this accepts those and any other short, URL-safe
#: token (so an unknown id is a plain 404), and nothing a database cannot compare.
ID_PATTERN = r"^[A-Za-z0-9._~-]{1,64}$"
ID_DESCRIPTION = "an id as returned by the API (1-64 characters: letters, digits, . _ ~ -)"
#: The largest value of the integer columns (trial numbers) and of a sane OFFSET.
MAX_INT32 = 2**31 - 1

ResourceId = Annotated[str, Field(pattern=ID_PATTERN, description=ID_DESCRIPTION)]
JobId = Annotated[str, Path(pattern=ID_PATTERN, description="a job id")]
DatasetId = Annotated[str, Path(pattern=ID_PATTERN, description="a dataset id")]
TrialNumber = Annotated[int, Path(ge=0, le=MAX_INT32, description="a trial number")]
Limit = Annotated[int, Query(ge=1, le=1000, description="at most this many items")]
Offset = Annotated[int, Query(ge=0, le=MAX_INT32, description="skip this many items")]


def _query_names(dependant: Dependant) -> set[str]:
    names = {f.alias for f in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return names


def declared_query_params(route: Any) -> frozenset[str]:
    """The query parameters a route (its function and its dependencies) declares; worked
    out once and kept on the route itself (routes are unhashable, and an ``id()`` could be
    reused by another app's route)."""
    names: frozenset[str] | None = getattr(route, "_ssad_query_params", None)
    if names is None:
        dependant = getattr(route, "dependant", None)
        names = frozenset(_query_names(dependant) if dependant is not None else ())
        route._ssad_query_params = names
    return names


async def reject_unknown_query_params(request: Request) -> None:
    """A router dependency: a query parameter the route does not declare is a 422 that names
    it (a misspelt ``?stauts=failed`` would otherwise list every job as if it had worked).
    ``async``: it does no I/O, so it runs on the event loop instead of costing every
    request a trip through the thread pool."""
    route = request.scope.get("route")
    if route is None:
        return
    allowed = declared_query_params(route)
    unknown = sorted({k for k in request.query_params if k not in allowed})
    if unknown:
        takes = ", ".join(sorted(allowed)) or "none"
        raise InvalidRequest(
            f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(repr(u) for u in unknown)} (this endpoint takes: {takes})")
