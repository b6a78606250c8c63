"""Every SQL statement about datasets and blobs."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, exists, func, or_, select
from sqlalchemy.orm import Session

from ssad_common.models import Backbone, Blob, BlobChunk, Dataset, Job


def get_dataset(session: Session, tenant_id: str, dataset_id: str) -> Dataset | None:
    """The tenant's dataset; another tenant's is None, exactly as a missing one."""
    dataset = session.get(Dataset, dataset_id)
    return dataset if dataset is not None and dataset.tenant_id == tenant_id else None


def list_datasets(session: Session, tenant_id: str, limit: int, offset: int
                  ) -> tuple[Sequence[Dataset], int]:
    rows = session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id)
        .order_by(Dataset.created_at.desc(), Dataset.id).limit(limit).offset(offset)).all()
    total = session.scalar(select(func.count()).select_from(Dataset)
                           .where(Dataset.tenant_id == tenant_id)) or 0
    return rows, total


def find_dataset(session: Session, tenant_id: str, sha256: str, name: str) -> Dataset | None:
    """The tenant's oldest dataset with this content and name, if any."""
    return session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.sha256 == sha256,
                              Dataset.name == name)
        .order_by(Dataset.created_at, Dataset.id).limit(1)).first()


def jobs_using_dataset(session: Session, dataset_id: str, limit: int = 5) -> list[str]:
    """Ids of (at most ``limit``) jobs that train on or score ``dataset_id``."""
    return list(session.scalars(select(Job.id).where(
        or_(Job.train_dataset_id == dataset_id, Job.test_dataset_id == dataset_id))
        .order_by(Job.created_at).limit(limit)).all())


def delete_dataset(session: Session, dataset: Dataset) -> None:
    """Delete the dataset, and its blob when nothing else uses it."""
    drop_blob_if_unused(session, dataset)


def drop_blob_if_unused(session: Session, owner: Dataset | Backbone) -> None:
    """Delete ``owner`` (a dataset or a backbone), and its blob when no dataset or backbone
    (any tenant's) uses it any more. The blob row is locked first, so an upload of the same
    content in another transaction either sees it kept (its row counted here) or sees it
    gone and stores it again."""
    sha = owner.sha256
    session.execute(select(Blob.sha256).where(Blob.sha256 == sha).with_for_update())
    session.delete(owner)
    session.flush()
    if not any(session.scalar(select(exists().where(m.sha256 == sha)))
               for m in (Dataset, Backbone)):
        session.execute(delete(BlobChunk).where(BlobChunk.sha256 == sha))
        session.execute(delete(Blob).where(Blob.sha256 == sha))
