"""One error tree, one handler, one JSON shape: ``{"error": "<ClassName>", "detail": "..."}``."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import DBAPIError, OperationalError
from starlette.exceptions import HTTPException as StarletteHTTPException

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


class ServiceUnavailable(AppError):
    status_code = 503
    headers: ClassVar[dict[str, str] | None] = {"Retry-After": "2"}


_HTTP_NAMES = {404: "NotFound", 405: "MethodNotAllowed", 413: "PayloadTooLarge",
               415: "UnsupportedMediaType", 400: "BadRequest"}


def error_body(error: str, detail: str) -> dict[str, str]:
    return {"error": error, "detail": detail}


def error_response(exc: AppError) -> JSONResponse:
    """The one rendering of an :class:`AppError` (also used outside exception handlers)."""
    return JSONResponse(error_body(type(exc).__name__, exc.detail), exc.status_code,
                        headers=exc.headers)


def _format_validation(exc: RequestValidationError) -> str:
    parts = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
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
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        name = _HTTP_NAMES.get(exc.status_code, "HTTPError")
        return JSONResponse(error_body(name, str(exc.detail)), exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(OperationalError)
    async def _db_down(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", exc.orig)
        return error_response(ServiceUnavailable("the database is unavailable; retry shortly"))

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


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries for the error codes a route can return."""
    desc = {400: "Bad request", 404: "Not found", 409: "Conflict", 413: "Too large",
            415: "Unsupported media type", 422: "Invalid input", 503: "Database unavailable"}
    return {c: {"model": ErrorResponse, "description": desc.get(c, "Error")} for c in codes}
