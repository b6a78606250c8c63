"""Uploaded backbones: encoder weights a tuning job starts every trial's detector from
(``backbone_id`` in ``POST /v1/jobs``), e.g. an encoder pretrained on the user's own
images.

The API never imports torch, and never unpickles anything. It checks the upload without
running it: a ``torch.save`` file is a zip holding ``<name>/data.pkl``, and that pickle is
read opcode by opcode (``pickletools.genops``, which executes nothing) to list every
global it would import; only what a state dict of tensors needs is accepted
(``collections.OrderedDict``, ``torch._utils._rebuild_*``, ``torch.*Storage``). The worker
then loads it with ``torch.load(weights_only=True)`` and checks that it fits the job's
encoder before the first trial; a file that does not fails the job with the reason.
Stored once per content (a blob), counted in the tenant's stored bytes.
"""

from __future__ import annotations

import hashlib
import pickletools
import uuid
import zipfile
from collections.abc import Sequence
from datetime import datetime
from typing import IO, Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Response, UploadFile, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service import tenants
from service.datasets.repository import drop_blob_if_unused
from service.datasets.routes import upload_size
from service.datasets.service import check_name
from service.deps import SessionDep, SettingsDep, TenantDep
from service.errors import Conflict, InvalidRequest, NotFound, PayloadTooLarge, error_responses
from service.params import ID_PATTERN, Limit, Offset, reject_unknown_query_params
from service.settings import ApiSettings
from ssad_common import blobs
from ssad_common.blobs import CHUNK_BYTES
from ssad_common.models import Backbone, Job

#: The largest data.pkl read (a state dict's pickle is a few kB to a few hundred kB: the
#: tensors' bytes are separate entries).
MAX_PICKLE_BYTES = 16 * 1024**2
STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING",
              "BINSTRING", "SHORT_BINSTRING"}
PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}
GET_OPS = {"GET", "BINGET", "LONG_BINGET"}


class InvalidBackbone(InvalidRequest):
    """422: not a weights-only ``torch.save`` file."""


def _allowed(ref: str) -> bool:
    module, _, name = ref.partition(" ")
    return ((module, name) == ("collections", "OrderedDict")
            or (module == "torch._utils" and name.startswith("_rebuild_"))
            or (module == "torch" and name.endswith("Storage")))


def pickle_globals(data: bytes) -> list[str]:
    """``module name`` of every global the pickle would import, read without running it.
    Raises :class:`InvalidBackbone` when a global's name cannot be told (it is built at
    load time rather than written out) or the stream is not a pickle."""
    found: list[str] = []
    pushed: list[Any] = []  # the values of recent pushes (strings; None for other values)
    memo: dict[Any, Any] = {}
    try:
        for op, arg, _ in pickletools.genops(data):
            if op.name in STRING_OPS:
                pushed.append(arg)
            elif op.name in GET_OPS:
                pushed.append(memo.get(arg))
            elif op.name in PUT_OPS:
                memo[arg] = pushed[-1] if pushed else None
            elif op.name == "MEMOIZE":
                memo[len(memo)] = pushed[-1] if pushed else None
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg))
                pushed.append(None)
            elif op.name == "STACK_GLOBAL":
                module, name = (pushed[-2], pushed[-1]) if len(pushed) >= 2 else (None, None)
                if not (isinstance(module, str) and isinstance(name, str)):
                    raise InvalidBackbone("the file's pickle builds the name of something "
                                          "it imports at load time: not a weights-only file")
                found.append(f"{module} {name}")
                pushed.append(None)
            elif op.name.startswith("EXT"):
                raise InvalidBackbone("the file's pickle uses the extension registry: not a "
                                      "weights-only file")
            else:
                pushed.append(None)
    except ValueError as exc:  # genops' own complaint: not a pickle stream
        raise InvalidBackbone(f"the file's data.pkl is not a valid pickle ({exc})") from None
    return found


def inspect_backbone(file: IO[bytes]) -> dict[str, Any]:
    """What a ``torch.save`` file holds, checked without unpickling it; raises
    :class:`InvalidBackbone` for anything that is not a state dict of tensors."""
    try:
        archive = zipfile.ZipFile(file)
    except zipfile.BadZipFile:
        raise InvalidBackbone("not a torch.save file (a zip archive): save the encoder's "
                              "weights with torch.save(model.state_dict(), path)") from None
    with archive:
        pickles = [i for i in archive.infolist() if i.filename.endswith("/data.pkl")
                   and i.filename.count("/") == 1]
        if len(pickles) != 1:
            raise InvalidBackbone("not a torch.save file: it holds no single <name>/data.pkl")
        if pickles[0].file_size > MAX_PICKLE_BYTES:
            raise InvalidBackbone(f"its data.pkl is over {MAX_PICKLE_BYTES} bytes: not a "
                                  "state dict")
        prefix = pickles[0].filename.split("/")[0]
        try:
            data = archive.read(pickles[0])
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise InvalidBackbone(f"the archive is damaged ({exc})") from None
        tensors = sum(1 for i in archive.infolist()
                      if i.filename.startswith(f"{prefix}/data/"))
    refs = pickle_globals(data)
    refused = sorted({r for r in refs if not _allowed(r)})
    if refused:
        raise InvalidBackbone(
            f"the file would import {', '.join(refused[:5])} when loaded: only a state dict "
            "of tensors is accepted (torch.save(model.state_dict(), path))")
    return {"globals": sorted(set(refs)), "tensors": tensors}


# --------------------------------------------------------------------------- service


def create_backbone(session: Session, tenant_id: str, file: IO[bytes], size: int,
                    filename: str, name: str | None, settings: ApiSettings) -> Backbone:
    if size > settings.max_backbone_bytes:
        raise PayloadTooLarge(f"a backbone file may be at most {settings.max_backbone_bytes} "
                              "bytes (SSAD_MAX_BACKBONE_BYTES)")
    display = check_name(name if name is not None else (filename.rsplit("/", 1)[-1] or
                                                        "backbone.pt"))
    meta = inspect_backbone(file)
    file.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: file.read(CHUNK_BYTES), b""):
        digest.update(chunk)
    sha = digest.hexdigest()
    quotas = tenants.lock_tenant(session, tenant_id, settings)
    tenants.check_storage(session, tenant_id, quotas, size)
    if not blobs.blob_exists(session, sha):
        file.seek(0)
        blobs.insert_blob(session, sha, size, iter(lambda: file.read(CHUNK_BYTES), b""))
    backbone = Backbone(id=str(uuid.uuid4()), tenant_id=tenant_id, name=display, sha256=sha,
                        size_bytes=size, meta=meta)
    session.add(backbone)
    session.flush()
    return backbone


def get_backbone(session: Session, tenant_id: str, backbone_id: str) -> Backbone:
    backbone = session.scalar(select(Backbone).where(Backbone.id == backbone_id,
                                                     Backbone.tenant_id == tenant_id))
    if backbone is None:
        raise NotFound(f"backbone {backbone_id} not found")
    return backbone


def delete_backbone(session: Session, tenant_id: str, backbone_id: str,
                    settings: ApiSettings) -> None:
    tenants.lock_tenant(session, tenant_id, settings)  # as job creation: no job sneaks in
    backbone = get_backbone(session, tenant_id, backbone_id)
    using = session.scalars(select(Job.id).where(Job.backbone_id == backbone_id)
                            .order_by(Job.created_at).limit(5)).all()
    if using:
        raise Conflict(f"backbone {backbone_id} is used by a job ({', '.join(using)}): delete "
                       "the jobs that use it first (DELETE /v1/jobs/{id}) or keep it")
    drop_blob_if_unused(session, backbone)


# --------------------------------------------------------------------------- routes


class BackboneOut(BaseModel):
    model_config = ConfigDict(from_attributes=True, json_schema_extra={"example": {
        "id": "5c0d…", "name": "encoder-line3.pt", "sha256": "41be…", "size_bytes": 328129,
        "meta": {"globals": ["collections OrderedDict", "torch FloatStorage",
                             "torch._utils _rebuild_tensor_v2"], "tensors": 62},
        "created_at": "2026-12-01T12:00:00Z"}})

    id: str
    name: str
    sha256: str
    size_bytes: int
    meta: dict[str, Any] = Field(description="what the file's pickle imports (checked "
                                             "without loading it) and how many tensors")
    created_at: datetime


class BackboneList(BaseModel):
    model_config = ConfigDict(json_schema_extra={"example": {"items": [], "total": 0}})

    items: list[BackboneOut]
    total: int


BackboneId = Annotated[str, Path(pattern=ID_PATTERN, description="a backbone id")]
router = APIRouter(prefix="/v1/backbones", tags=["backbones"],
                   dependencies=[Depends(reject_unknown_query_params)])


@router.post("", status_code=status.HTTP_201_CREATED, response_model=BackboneOut,
             responses=error_responses(401, 403, 413, 422),
             summary="Upload encoder weights (a torch.save'd state dict) for jobs to start from",
             openapi_extra={"requestBody": {"content": {"multipart/form-data": {
                 "example": {"file": "(curl -F file=@encoder.pt)", "name": "line-3 encoder"}}}}})
def upload_backbone(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                    file: Annotated[UploadFile, File(description="torch.save(encoder."
                                                                 "state_dict(), path)")],
                    name: Annotated[str | None, Form(max_length=255)] = None) -> BackboneOut:
    """The file must be what `torch.save(model.encoder.state_dict(), path)` writes for the
    job's detector (`small` or `resnet18`, at the job's working size and channels); a job
    names it with `backbone_id`, and every trial's detector starts from it. Checked here
    without unpickling anything (only a state dict of tensors passes); the worker loads it
    with `weights_only=True` and fails the job, saying why, if it does not fit the encoder.
    Counts in the tenant's stored bytes; at most SSAD_MAX_BACKBONE_BYTES (413)."""
    backbone = create_backbone(session, tenant, file.file, upload_size(file),
                               file.filename or "", name, settings)
    return BackboneOut.model_validate(backbone)


@router.get("", response_model=BackboneList, responses=error_responses(401, 422),
            summary="List your backbones, newest first")
def list_backbones(session: SessionDep, tenant: TenantDep, limit: Limit = 100,
                   offset: Offset = 0) -> BackboneList:
    rows: Sequence[Backbone] = session.scalars(
        select(Backbone).where(Backbone.tenant_id == tenant)
        .order_by(Backbone.created_at.desc(), Backbone.id).limit(limit).offset(offset)).all()
    total = session.scalar(select(func.count()).select_from(Backbone)
                           .where(Backbone.tenant_id == tenant)) or 0
    return BackboneList(items=[BackboneOut.model_validate(r) for r in rows], total=total)


@router.get("/{backbone_id}", response_model=BackboneOut,
            responses=error_responses(401, 404, 422), summary="Describe a backbone")
def describe_backbone(session: SessionDep, tenant: TenantDep,
                      backbone_id: BackboneId) -> BackboneOut:
    return BackboneOut.model_validate(get_backbone(session, tenant, backbone_id))


@router.delete("/{backbone_id}", status_code=status.HTTP_204_NO_CONTENT,
               response_class=Response, responses=error_responses(401, 404, 409, 422),
               summary="Delete a backbone (409 while a job uses it)")
def remove_backbone(session: SessionDep, settings: SettingsDep, tenant: TenantDep,
                    backbone_id: BackboneId) -> Response:
    delete_backbone(session, tenant, backbone_id, settings)
    return Response(status_code=status.HTTP_204_NO_CONTENT)

