"""Request parameters every route shares: resource ids, paging, trial numbers, and the rule
that a query parameter a route does not declare is an error, not silently ignored.

Ids are bounded strings of URL-safe characters, checked before any query runs: a NUL (which
Postgres refuses in text) or a 10 kB id is a 422 naming the parameter, while a well-formed id
that names nothing is a 404. Integers are bounded to what the database's columns hold
(OFFSET and trial numbers beyond a signed 32-bit integer are a 422, not a driver overflow).
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from fastapi import Path, Query, Request
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, Field, ValidationError

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


Q = TypeVar("Q", bound=BaseModel)


def query_parameters(*models: type[BaseModel]) -> list[dict[str, Any]]:
    """The OpenAPI parameters of query ``models`` that a route reads itself
    (:func:`read_query`): every field optional, with its schema and description, for the
    route's ``openapi_extra``. Generated from the models, so what the docs say is what
    :func:`read_query` checks, and what :func:`reject_unknown_query_params` allows."""
    out: list[dict[str, Any]] = []
    for model in models:
        for name, schema in model.model_json_schema()["properties"].items():
            param = {"name": name, "in": "query", "required": False}
            if "description" in schema:  # on both, as FastAPI writes a declared parameter
                param["description"] = schema["description"]
            out.append({**param, "schema": schema})
    return out


def read_query(model: type[Q], request: Request) -> Q:
    """``model`` from the request's query string (the last value of a repeated parameter,
    as FastAPI reads it); what does not validate is FastAPI's own 422, located in the
    query. For the routes clients poll for large bodies, where FastAPI's handling of each
    declared parameter is a measurable share of a request (docs/benchmarks.md §8)."""
    try:
        return model.model_validate(
            {k: v for k, v in request.query_params.items() if k in model.model_fields})
    except ValidationError as e:
        raise RequestValidationError(
            [{**err, "loc": ("query", *err["loc"])} for err in e.errors(include_url=False)]
        ) from None


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
        read = {p["name"] for p in (getattr(route, "openapi_extra", None) or {}).get(
            "parameters", ()) if p.get("in") == "query"}  # read by the route (read_query)
        names = frozenset((_query_names(dependant) if dependant is not None else set())
                          | read)
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
