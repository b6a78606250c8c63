"""The FastAPI application. Never imports torch: augmentation families and objectives are
validated against the plain data in :mod:`ssad_common.search_space`."""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import migrate
from service.backbones import router as backbones_router
from service.datasets.routes import router as datasets_router
from service.deps import StreamTenantDep
from service.errors import (
    PayloadTooLarge,
    ServiceUnavailable,
    error_response,
    error_responses,
    install_error_handlers,
    use_error_shape_for_validation,
)
from service.jobs.routes import router as jobs_router
from service.metrics import Metrics
from service.params import reject_unknown_query_params
from service.reads import make_reads
from service.settings import ApiSettings, get_settings
from service.webhooks import Dispatcher
from service.webhooks import router as webhooks_router
from ssad_common.db import make_engine, session_factory
from ssad_common.jobspec import DEFAULT_OBJECTIVE
from ssad_common.search_space import DEFAULT_AUGMENTATIONS, OBJECTIVE_NAMES, describe

log = logging.getLogger("ssad.api")

DESCRIPTION = """
Label-free tuning of self-supervised anomaly detectors.

1. `POST /v1/datasets` your unlabeled **train** images and your **test** images.
2. `POST /v1/jobs` with both ids: a worker runs an Optuna study over augmentation families
   and their strength, minimising an alignment validation loss (no labels).
3. Poll `GET /v1/jobs/{id}` (or give the job a `notify_url`: a signed webhook when it
   ends); then `GET /v1/jobs/{id}/scores` (or `?format=csv`).
4. Open `/v1/jobs/{id}/report` in a
   browser: the whole job on one page, live while it runs (with API keys on, open the link
   `POST /v1/jobs/{id}/report-link` returns).

Every error is `{"error": "<ClassName>", "detail": "<what to fix>"}`.
"""


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body is larger than the limit of {limit} bytes")


class BodyLimit:
    """Refuse request bodies over ``limit`` (+ 64 KiB for the multipart envelope) with 413
    in the error shape: at once when Content-Length says so, else (chunked bodies) as soon
    as the bytes received pass it, so that nothing beyond the limit is read or spooled."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit
        self.allowed = limit + 65536

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_large = BodyTooLarge(self.limit)
        has_body = False
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit():
                length = int(value)
                if length > self.allowed:
                    await error_response(PayloadTooLarge(too_large.detail))(
                        scope, receive, send)
                    return
                has_body = has_body or length > 0
            elif key == b"transfer-encoding":
                has_body = True
        if not has_body:
            # HTTP/1.1: neither header, no body (the server reads none); the GETs clients
            # poll skip the counting wrappers.
            await self.app(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.allowed:
                    # FastAPI re-raises HTTPExceptions from body parsing; the handler
                    # renders it as PayloadTooLarge.
                    raise too_large
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:
                raise
            await error_response(PayloadTooLarge(too_large.detail))(scope, receive, send)


def swagger_assets_dir() -> str:
    import swagger_ui_bundle

    return str(swagger_ui_bundle.swagger_ui_path)


def create_app(settings: ApiSettings | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = {} if settings.embedded else {
            "pool_size": settings.db_pool_size, "max_overflow": settings.db_max_overflow,
            "pool_timeout": settings.db_pool_timeout_seconds}
        engine = make_engine(settings.database_url, **pool)
        app.state.engine = engine
        app.state.session_factory = session_factory(engine)
        app.state.metrics = Metrics(engine)
        app.state.reads = make_reads(
            app.state.session_factory, settings.database_url, engine.dialect,
            settings.db_pool_size, settings.db_pool_timeout_seconds)
        dispatcher = None
        try:
            if settings.webhook_dispatch:
                dispatcher = Dispatcher(app.state.session_factory, settings)
                dispatcher.start()
            # What is alive now (modules, the app, its routes and models) lives as long as
            # the process: out of the collector's sight, a full collection no longer walks
            # it, which held requests up for 31-114 ms under load (docs/benchmarks.md §8).
            # No collection first: start-up leaves little garbage, and a full collection
            # is what each test's app start would then pay. Process-wide: in a process
            # running two apps (tests), the first to stop unfreezes both.
            gc.freeze()
            yield
        finally:
            gc.unfreeze()  # an app that stops in a longer-lived process (tests)
            try:
                if dispatcher is not None:
                    dispatcher.stop()
            finally:
                await app.state.reads.close()
                engine.dispose()

    app = FastAPI(title="ssad-tune", version="1.0.0", description=DESCRIPTION,
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.settings = settings
    head = migrate.head_revision()  # fixed for the life of the process; read once
    install_error_handlers(app)
    app.include_router(datasets_router)
    app.include_router(jobs_router)
    app.include_router(webhooks_router)
    app.include_router(backbones_router)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = use_error_shape_for_validation(get_openapi(
                title=app.title, version=app.version, description=app.description,
                routes=app.routes))
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    # Swagger UI from the installed package, not a CDN: the docs work air-gapped.
    app.mount("/static/swagger", StaticFiles(directory=swagger_assets_dir()), name="swagger")

    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url="/openapi.json", title="ssad-tune API",
            swagger_js_url="/static/swagger/swagger-ui-bundle.js",
            swagger_css_url="/static/swagger/swagger-ui.css",
            swagger_favicon_url="/static/swagger/favicon-32x32.png")

    @app.get("/healthz", tags=["operations"], summary="The process is up",
             responses={200: {"content": {"application/json": {"example": {"status": "ok"}}}}})
    async def healthz() -> dict[str, str]:  # async: never waits for a worker thread
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"],
             responses={200: {"content": {"application/json": {"example": {
                 "status": "ready", "schema": "0003"}}}}, **error_responses(503)},
             summary="The database is reachable and migrated")
    def readyz(request: Request) -> dict[str, Any]:
        engine = request.app.state.engine
        try:
            with engine.connect() as conn:
                conn.execute(text("SELECT 1"))
                current = migrate.current_revision(conn)
        except Exception as exc:
            log.warning("not ready: %s", exc)
            raise ServiceUnavailable("database unavailable") from None
        if current != head:
            raise ServiceUnavailable(f"database schema is at {current}, not {head}: "
                                     "run `alembic upgrade head`")
        return {"status": "ready", "schema": current}

    @app.get("/metrics", tags=["operations"], response_class=PlainTextResponse,
             responses={200: {"content": {"text/plain": {"example": (
                 "# HELP ssad_queue_depth Jobs waiting for a worker\n"
                 "# TYPE ssad_queue_depth gauge\nssad_queue_depth 3.0\n")}},
                 "description": "Prometheus text exposition format"}},
             summary="Prometheus metrics: jobs, queue, trials, workers, uploads")
    def metrics(request: Request) -> PlainTextResponse:
        body = generate_latest(request.app.state.metrics.registry)
        return PlainTextResponse(body, media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/augmentations", tags=["reference"],
             responses={200: {"content": {"application/json": {"example": {
                 "families": describe()[:1], "default_augmentations": list(
                     DEFAULT_AUGMENTATIONS),
                 "objectives": list(OBJECTIVE_NAMES),
                 "default_objective": DEFAULT_OBJECTIVE}}}},
                 **error_responses(401, 422)},
             dependencies=[Depends(reject_unknown_query_params)],
             summary="Augmentation families, their hyperparameters and ranges")
    def augmentations(_: StreamTenantDep) -> dict[str, Any]:
        # Like all of /v1, behind the key when auth is on (one rule for operators and
        # gateways); the tenant's own short session: nothing here needs a transaction.
        return {"families": describe(), "default_augmentations": list(DEFAULT_AUGMENTATIONS),
                "objectives": list(OBJECTIVE_NAMES), "default_objective": DEFAULT_OBJECTIVE}

    return app
