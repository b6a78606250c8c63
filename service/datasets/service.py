"""Dataset rules: decode and validate an upload, store its canonical bytes once."""

from __future__ import annotations

import hashlib
import io
import re
import uuid
from collections.abc import Sequence

import numpy as np
from sqlalchemy.orm import Session

from service import idempotency, tenants
from service.datasets import repository as repo
from service.errors import Conflict, InvalidDataset, InvalidRequest, NotFound
from service.models import Dataset
from service.settings import Settings
from worker.images import ImageDataError, Limits, load_bytes

_BAD_NAME = re.compile(r"[\x00-\x1f\x7f/\\]|^\.\.?$")


def limits(settings: Settings) -> Limits:
    return Limits(max_images=settings.max_images,
                  max_pixels_per_image=settings.max_pixels_per_image,
                  max_total_bytes=settings.max_decoded_bytes)


def check_name(name: str) -> str:
    name = name.strip()
    if not name or len(name) > 255 or _BAD_NAME.search(name):
        raise InvalidRequest(
            "name must be 1-255 printable characters without '/', '\\' or control characters")
    return name


def canonical_bytes(images: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(images, dtype=np.uint8), allow_pickle=False)
    return buf.getvalue()


def create_dataset(session: Session, tenant_id: str, data: bytes, filename: str,
                   name: str | None, settings: Settings,
                   idempotency_key: str | None = None) -> tuple[Dataset, bool]:
    """Decode ``data`` (format from ``filename``), normalise it to uint8 (N, C, H, W), store
    the canonical .npy bytes once per sha256, and describe it. Returns the dataset and
    whether it is a replay of an earlier request with the same ``idempotency_key``."""
    fp = ""
    if idempotency_key is not None:
        fp = idempotency.fingerprint(data, filename.encode(), (name or "").encode())
        earlier = idempotency.replay(session, tenant_id, "datasets", idempotency_key, fp,
                                     settings.idempotency_ttl_hours,
                                     lambda i: repo.get_dataset(session, tenant_id, i))
        if earlier is not None:
            return earlier, True
    display = check_name(name if name is not None else (filename.rsplit("/", 1)[-1] or "upload"))
    try:
        images = load_bytes(data, filename, limits(settings))
    except ImageDataError as exc:
        raise InvalidDataset(str(exc)) from None
    blob = canonical_bytes(images.images)
    tenants.check_storage(session, tenant_id, tenants.lock_tenant(session, tenant_id, settings),
                          len(blob))
    sha = hashlib.sha256(blob).hexdigest()
    if not repo.blob_exists(session, sha):
        repo.insert_blob(session, sha, blob)
    n, c, h, w = images.shape
    dataset = Dataset(id=str(uuid.uuid4()), tenant_id=tenant_id, name=display, sha256=sha,
                      n_samples=n, channels=c, height=h, width=w, size_bytes=len(blob),
                      names=images.names)
    session.add(dataset)
    session.flush()
    if idempotency_key is not None:
        idempotency.remember(session, tenant_id, "datasets", idempotency_key, fp, dataset.id)
    return dataset, False


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset:
    dataset = repo.get_dataset(session, tenant_id, dataset_id)
    if dataset is None:
        raise NotFound(f"dataset {dataset_id} not found")
    return dataset


def list_datasets(session: Session, tenant_id: str, limit: int, offset: int
                  ) -> tuple[Sequence[Dataset], int]:
    return repo.list_datasets(session, tenant_id, limit, offset)


def delete_dataset(session: Session, tenant_id: str, dataset_id: str) -> None:
    dataset = get_dataset(session, tenant_id, dataset_id)
    using = repo.jobs_using_dataset(session, dataset_id)
    if using:
        raise Conflict(f"dataset {dataset_id} is used by a job ({', '.join(using)}"
                       f"{', ...' if len(using) >= 5 else ''}): delete the jobs that use it "
                       "first (DELETE /v1/jobs/{id}, once each has ended) or keep the dataset")
    repo.delete_dataset(session, dataset)
