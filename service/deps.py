"""FastAPI dependencies: settings, the per-request transaction, and the caller's tenant."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import Depends, Header, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, Field
from sqlalchemy.orm import Session

from service.errors import Unauthorized
from service.links import tenant_for_token
from service.params import JobId, query_parameters, read_query
from service.settings import ApiSettings
from service.tenants import lookup_hash, tenant_for_key
from ssad_common.db import end_transaction
from ssad_common.models import DEFAULT_TENANT_ID

# The dependencies are ``async``: FastAPI runs a plain ``def`` dependency in its thread
# pool, a trip that cost more than the work on every request (profiled in
# docs/benchmarks.md §8). Only a database query goes to the pool (:func:`_caller`).


async def get_app_settings(request: Request) -> ApiSettings:
    settings: ApiSettings = request.app.state.settings
    return settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """The request's transaction: committed if the route returned, else rolled back, and
    closed, in one trip through the thread pool (opening a session does no I/O: its
    connection is taken at its first statement, in the route's thread)."""
    session = request.app.state.session_factory()
    done = False
    try:
        yield session
        done = True
    finally:
        await run_in_threadpool(end_transaction, session, done)


# scope="function": the commit runs when the route function returns, before the response
# starts. With the default ("request") FastAPI runs the code after `yield` once the response
# has been sent, so a 201 could name a row that a crash or a failed commit then lost.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[ApiSettings, Depends(get_app_settings)]

bearer = HTTPBearer(auto_error=False, scheme_name="ApiKey",
                    description="An API key from `ssad-tune keys create --tenant NAME`, sent "
                                "as `Authorization: Bearer <key>`")


CredentialsDep = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]


def _tenant(settings: ApiSettings, credentials: HTTPAuthorizationCredentials | None,
            session: Session | None, request: Request) -> str:
    if settings.auth == "off":
        return DEFAULT_TENANT_ID
    if credentials is None:
        raise _no_key()
    if session is None:
        with request.app.state.session_factory() as own:
            tenant = tenant_for_key(own, credentials.credentials)
    else:
        tenant = tenant_for_key(session, credentials.credentials)
    if tenant is None:
        raise _bad_key()
    return tenant


def _no_key() -> Unauthorized:
    return Unauthorized("this server needs an API key: send `Authorization: Bearer <key>` "
                        "(an operator creates one with `ssad-tune keys create --tenant NAME`)")


def _bad_key() -> Unauthorized:
    return Unauthorized("unknown or revoked API key")


async def _caller(settings: ApiSettings, resolve: Callable[..., str], *args: Any) -> str:
    """The default tenant in single-user mode (no I/O); else ``resolve(settings, *args)``,
    which reads the database, in the thread pool."""
    if settings.auth == "off":
        return DEFAULT_TENANT_ID
    return await run_in_threadpool(resolve, settings, *args)


async def get_tenant(request: Request, settings: SettingsDep, session: SessionDep,
                     credentials: CredentialsDep) -> str:
    """The id of the tenant making the request: from its API key, or the default tenant
    when the server runs with ``SSAD_AUTH=off`` (single-user mode)."""
    return await _caller(settings, _tenant, credentials, session, request)


async def get_tenant_without_session(request: Request, settings: SettingsDep,
                                     credentials: CredentialsDep) -> str:
    """As :func:`get_tenant`, with a session of its own that is closed at once: for
    long-lived responses (streams) that must not hold the request's transaction open."""
    return await _caller(settings, _tenant, credentials, None, request)


TenantDep = Annotated[str, Depends(get_tenant)]
StreamTenantDep = Annotated[str, Depends(get_tenant_without_session)]

LINK_TOKEN_DOC = ("instead of an API key: the token of a report link (POST "
                  "/v1/jobs/{id}/report-link), which lets a browser read this one job until "
                  "it expires")
LINK_TOKEN_MAX = 256
LinkToken = Annotated[str | None, Query(max_length=LINK_TOKEN_MAX, description=LINK_TOKEN_DOC)]


class LinkTokenQuery(BaseModel):
    """The caller's part of the query of a route that reads its own (service.params.
    read_query): a report link's token."""

    token: str | None = Field(None, max_length=LINK_TOKEN_MAX, description=LINK_TOKEN_DOC)


def _job_reader(settings: ApiSettings, credentials: HTTPAuthorizationCredentials | None,
                session: Session | None, request: Request, job_id: str,
                token: str | None) -> str:
    if settings.auth == "off" or credentials is not None or token is None:
        return _tenant(settings, credentials, session, request)
    if session is None:
        with request.app.state.session_factory.begin() as own:
            tenant = tenant_for_token(own, settings, job_id, token)
    else:
        tenant = tenant_for_token(session, settings, job_id, token)
    if tenant is None:
        raise Unauthorized("this report link is invalid or has expired: ask for a new one "
                           "(POST /v1/jobs/{id}/report-link with your API key)")
    return tenant


async def get_job_reader(request: Request, settings: SettingsDep, session: SessionDep,
                         credentials: CredentialsDep, job_id: JobId,
                         token: LinkToken = None) -> str:
    """The tenant reading job ``job_id``: from the API key, as :func:`get_tenant`, or
    from a report link's ``token`` for that job (service/links.py)."""
    return await _caller(settings, _job_reader, credentials, session, request, job_id, token)


async def get_job_reader_without_session(request: Request, settings: SettingsDep,
                                         credentials: CredentialsDep, job_id: JobId,
                                         token: LinkToken = None) -> str:
    """As :func:`get_job_reader`, for streams (a short session of its own)."""
    return await _caller(settings, _job_reader, credentials, None, request, job_id, token)


async def polled_job_reader(request: Request, job_id: str) -> str:
    """The tenant reading job ``job_id``, for the routes clients poll, which read their
    query themselves (:func:`polled_route_docs`): the report link's ``token`` from the
    query (:class:`LinkTokenQuery`), then the API key, as :func:`get_job_reader` without
    the request's session. An API key is looked up by ``app.state.reads`` (on the event
    loop on Postgres, service/reads.py); a report link's token as for a stream."""
    token = read_query(LinkTokenQuery, request).token
    settings: ApiSettings = request.app.state.settings
    if settings.auth == "off":
        return DEFAULT_TENANT_ID
    credentials = await bearer(request)
    if credentials is None:
        if token is not None:
            return await get_job_reader_without_session(request, settings, None, job_id,
                                                        token)
        raise _no_key()
    digest = lookup_hash(credentials.credentials)
    tenant = None if digest is None else await request.app.state.reads.key_tenant(digest)
    if tenant is None:
        raise _bad_key()
    return str(tenant)


def polled_route_docs(*query: type[BaseModel]) -> dict[str, Any]:
    """The ``openapi_extra`` of a route that reads its own ``query`` models and its caller
    (:func:`polled_job_reader`): their parameters and the link's token, and the API key."""
    return {"parameters": query_parameters(*query, LinkTokenQuery),
            "security": [{bearer.scheme_name: []}]}


JobReaderDep = Annotated[str, Depends(get_job_reader)]
StreamJobReaderDep = Annotated[str, Depends(get_job_reader_without_session)]
IdempotencyKeyDep = Annotated[str | None, Header(
    alias="Idempotency-Key", min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$",
    description="Any unique string (e.g. a UUID): a retry with the same key and the same "
                "request returns the first result instead of creating a second; the same key "
                "with a different request is a 409. Kept for 24 hours.")]
