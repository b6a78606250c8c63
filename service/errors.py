"""One error tree, one handler, one JSON shape: ``{"error": "<ClassName>", "detail": "..."}``."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

log = logging.getLogger("ssad.api")


class ErrorResponse(BaseModel):
    error: str
    detail: str


class AppError(Exception):
    status_code = 500
    headers: ClassVar[dict[str, str] | None] = None

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class InternalError(AppError):
    status_code = 500


class NotFound(AppError):
    status_code = 404


class Conflict(AppError):
    status_code = 409


class InvalidDataset(AppError):
    status_code = 422


class InvalidRequest(AppError):
    status_code = 422


class IncompatibleDatasets(AppError):
    status_code = 422


class PayloadTooLarge(AppError):
    status_code = 413


class Unauthorized(AppError):
    status_code = 401
    headers: ClassVar[dict[str, str] | None] = {"WWW-Authenticate": "Bearer"}


class QuotaExceeded(AppError):
    """The request would take the tenant over one of its quotas (stored bytes, trials per
    job): refused, and retrying will not help. 403, not 413: the request itself may be small;
    413 is kept for bodies over the upload limit."""

    status_code = 403


class ComputeQuotaExceeded(AppError):
    """The job would process more training images than the tenant's quota allows;
    retrying the same request will not help (403)."""

    status_code = 403


class TooManyActiveJobs(AppError):
    """The tenant has as many jobs queued or running as its quota allows (retry later)."""

    status_code = 429
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "30"}


class ServiceUnavailable(AppError):
    status_code = 503
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "2"}


_HTTP_NAMES = {401: "Unauthorized", 404: "NotFound", 405: "MethodNotAllowed",
               413: "PayloadTooLarge", 415: "UnsupportedMediaType", 400: "BadRequest"}


def error_body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


def error_response(exc: AppError) -> JSONResponse:
    """The one rendering of an :class:`AppError` (also used outside exception handlers)."""
    return JSONResponse(error_body(type(exc).__name__, exc.detail), exc.status_code,
                        headers=exc.headers)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        where = tuple(e.get("loc", ()))
        if e.get("type") == "json_invalid":  # loc: ("body", character offset)
            pos = where[-1] if len(where) > 1 else None
            why = str((e.get("ctx") or {}).get("error") or "")
            if why.endswith(" at") and pos is not None:  # "Unterminated string starting at"
                parts.append(f"the body is not valid JSON: {why} character {pos}")
            else:
                parts.append("the body is not valid JSON"
                             + ("" if pos is None else f" at character {pos}")
                             + (f" ({why})" if why else ""))
            continue
        if e.get("type") == "missing" and where == ("body",):
            parts.append("the request needs a JSON body")
            continue
        if where == ("body",) and e.get("type") in ("model_attributes_type", "dict_type"):
            parts.append("the body must be a JSON object, sent with content-type: "
                         "application/json")
            continue
        loc = ".".join(str(p) for p in where if p != "body")
        parts.append(f"{loc}: {e.get('msg')}" if loc else str(e.get("msg")))
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def _app_error(_: Request, exc: AppError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(error_body("ValidationError", _format_validation(exc)), 422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = _HTTP_NAMES.get(exc.status_code, "HTTPError")
        headers = dict(getattr(exc, "headers", None) or {})
        if exc.status_code == 405:
            # Starlette names only the first route's methods; a path served by several
            # routes (GET and DELETE /v1/datasets/{id}) allows all of theirs.
            headers["Allow"] = ", ".join(sorted(allowed_methods(request))) or headers.get(
                "Allow", "")
        return JSONResponse(error_body(name, str(exc.detail)), exc.status_code,
                            headers=headers or None)

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(ServiceUnavailable("the database is unavailable; retry shortly"))

    @app.exception_handler(PoolTimeout)
    async def _pool_exhausted(_: Request, exc: PoolTimeout) -> JSONResponse:
        log.warning("database connection pool exhausted: %s", exc)
        return error_response(ServiceUnavailable(
            "all database connections are busy; retry shortly"))

    @app.exception_handler(DBAPIError)
    async def _db_error(_: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return error_response(ServiceUnavailable("the database connection was lost; retry"))
        log.exception("database error")
        return error_response(InternalError("internal database error"))

    @app.exception_handler(Exception)
    async def _unhandled(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(InternalError("internal server error"))


_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> set[str]:
    """The methods some route serves at the request's path. Asked of each route with a fresh
    scope per method: included routers are one opaque route each (FastAPI >= 0.16x), and the
    request's own scope already carries the routing state of the failed match."""
    methods: set[str] = set()
    for method in _METHODS:
        scope = {"type": "http", "method": method, "path": request.scope["path"],
                 "root_path": request.scope.get("root_path", "")}
        if any(route.matches(scope)[0] == Match.FULL for route in request.app.router.routes):
            methods.add(method)
    return methods


def use_error_shape_for_validation(openapi: dict[str, Any]) -> dict[str, Any]:
    """FastAPI documents its own 422 body; ours is :class:`ErrorResponse`. Rewrite every
    operation's 422 to it and drop FastAPI's validation schemas."""
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    for ops in openapi.get("paths", {}).values():
        for op in ops.values():
            r422 = op.get("responses", {}).get("422")
            if r422 is not None:
                r422["content"] = {"application/json": {"schema": ref}}
                if r422.get("description") == "Validation Error":
                    r422["description"] = "Invalid input"
    schemas = openapi.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["ErrorResponse"] = ErrorResponse.model_json_schema()
    return openapi


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error codes a route can return."""
    desc = {400: "Bad request", 401: "Missing, unknown or revoked API key", 404: "Not found",
            403: "Over one of the tenant's quotas (stored bytes, trials per job)",
            409: "Conflict", 413: "Request body over the upload limit",
            415: "Unsupported media type", 422: "Invalid input",
            429: "Too many active jobs for the tenant's quota; retry later",
            503: "Database unavailable or busy; retry after Retry-After seconds"}
    # Errors are JSON whatever the route's own media type (a PNG, a page): say so, rather
    # than let the route's response class name the error's content type.
    schema = {"$ref": "#/components/schemas/ErrorResponse"}
    return {c: {"model": ErrorResponse, "description": desc.get(c, "Error"),
                "content": {"application/json": {"schema": schema}}} for c in codes}
