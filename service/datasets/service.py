"""Dataset rules: decode and validate an upload, store its canonical bytes once."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import IO

import numpy as np
from sqlalchemy.orm import Session, sessionmaker

from service import idempotency, tenants
from service.datasets import repository as repo
from service.errors import Conflict, InvalidDataset, InvalidRequest, NotFound
from service.settings import ApiSettings
from ssad_common import blobs
from ssad_common.db import transaction
from ssad_common.images import ImageDataError, ImageSet, Limits, NpyFile, npy_header, read_upload
from ssad_common.models import Dataset

_transaction = contextmanager(transaction)

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]|^\.\.?$")


def limits(settings: ApiSettings) -> Limits:
    return Limits(max_images=settings.max_images,
                  max_pixels_per_image=settings.max_pixels_per_image,
                  max_total_bytes=settings.max_decoded_bytes)


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 255 or _BAD_NAME.search(name):
        raise InvalidRequest(
            "name must be 1-255 printable characters without '/', '\\' or control characters")
    return name


def blob_chunks(upload: ImageSet | NpyFile) -> Iterator[bytes]:
    """The stored form of an upload (the .npy bytes ``np.save`` writes for its uint8
    (N, C, H, W) array) in chunks of :data:`blobs.CHUNK_BYTES`, produced one at a time:
    from the array's memory, or read from the uploaded file when it already is that form."""
    if isinstance(upload, NpyFile):
        pieces: Iterable[bytes | memoryview] = upload.read_data()
    else:
        data = np.ascontiguousarray(upload.images)
        view = data.reshape(-1).data
        pieces = (view[i:i + blobs.CHUNK_BYTES] for i in range(0, len(view), blobs.CHUNK_BYTES))
    buf = bytearray(npy_header(upload.shape))
    for piece in pieces:
        buf += piece
        while len(buf) >= blobs.CHUNK_BYTES:
            yield bytes(buf[:blobs.CHUNK_BYTES])
            del buf[:blobs.CHUNK_BYTES]
    if buf:
        yield bytes(buf)


def stored_size(upload: ImageSet | NpyFile) -> int:
    n, c, h, w = upload.shape
    return len(npy_header(upload.shape)) + n * c * h * w


def stored_sha256(upload: ImageSet | NpyFile) -> str:
    h = hashlib.sha256()
    for chunk in blob_chunks(upload):
        h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Created:
    dataset: Dataset
    outcome: str  # "created", "existing" (same content and name) or "replayed"


def create_dataset(factory: sessionmaker[Session], tenant_id: str, file: IO[bytes],
                   filename: str, name: str | None, settings: ApiSettings,
                   idempotency_key: str | None = None) -> Created:
    """Decode ``file`` (a seekable upload, format from ``filename``), normalise it to uint8
    (N, C, H, W), store its canonical .npy bytes once per sha256, and describe it.

    No database connection is held while the upload is read and decoded: a short
    transaction answers a replayed ``idempotency_key``, and one transaction, opened after
    decoding, does the writes (committed before this returns). The tenant's dataset with
    the same content and name, if there is one, is returned instead of a second copy."""
    display = check_name(name if name is not None else (filename.rsplit("/", 1)[-1] or "upload"))
    fp = ""
    if idempotency_key is not None:
        fp = idempotency.fingerprint_file(file, filename.encode(), (name or "").encode())
        with _transaction(factory) as session:
            earlier = idempotency.replay(session, tenant_id, "datasets", idempotency_key, fp,
                                         settings.idempotency_ttl_hours,
                                         lambda i: repo.get_dataset(session, tenant_id, i))
        if earlier is not None:
            return Created(earlier, "replayed")
    try:
        upload = read_upload(file, filename, limits(settings))
        sha = stored_sha256(upload)
    except ImageDataError as exc:
        raise InvalidDataset(str(exc)) from None
    size = stored_size(upload)
    n, c, h, w = upload.shape
    resized = upload.resized_from if isinstance(upload, ImageSet) else ()
    with _transaction(factory) as session:
        quotas = tenants.lock_tenant(session, tenant_id, settings)  # serialises the tenant
        dataset = repo.find_dataset(session, tenant_id, sha, display)
        outcome = "existing"
        if dataset is None:
            outcome = "created"
            tenants.check_storage(session, tenant_id, quotas, size)
            if not blobs.blob_exists(session, sha):
                blobs.insert_blob(session, sha, size, blob_chunks(upload))
            dataset = Dataset(id=str(uuid.uuid4()), tenant_id=tenant_id, name=display,
                              sha256=sha, n_samples=n, channels=c, height=h, width=w,
                              size_bytes=size, names=upload.names,
                              resized_from=[{"height": rh, "width": rw, "count": k}
                                            for rh, rw, k in resized] or None)
            session.add(dataset)
            session.flush()
        if idempotency_key is not None:
            idempotency.remember(session, tenant_id, "datasets", idempotency_key, fp,
                                 dataset.id)
    return Created(dataset, outcome)


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = repo.get_dataset(session, tenant_id, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(session: Session, tenant_id: str, limit: int, offset: int
                  ) -> tuple[Sequence[Dataset], int]:
    return repo.list_datasets(session, tenant_id, limit, offset)


def delete_dataset(session: Session, tenant_id: str, dataset_id: str, settings: ApiSettings
                   ) -> None:
    # The tenant's lock, as job creation takes it: a job cannot be created on the dataset
    # between the check below and the delete (that was a foreign-key 500).
    tenants.lock_tenant(session, tenant_id, settings)
    dataset = get_dataset(session, tenant_id, dataset_id)
    using = repo.jobs_using_dataset(session, dataset_id)
    if using:
        raise Conflict(f"dataset {dataset_id} is used by a job ({', '.join(using)}"
                       f"{', ...' if len(using) >= 5 else ''}): delete the jobs that use it "
                       "first (DELETE /v1/jobs/{id}, once each has ended) or keep the dataset")
    repo.delete_dataset(session, dataset)
