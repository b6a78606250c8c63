"""Every SQL statement about datasets and blobs."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete, exists, func, insert, or_, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from service.models import Blob, BlobChunk, Dataset, Job, utcnow

CHUNK_BYTES = 8 * 1024 * 1024


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


def blob_exists(session: Session, sha256: str) -> bool:
    return session.get(Blob, sha256) is not None


def insert_blob(session: Session, sha256: str, data: bytes) -> bool:
    """Store a blob unless it exists. Two uploads of the same content racing each other
    both succeed: the loser's INSERT ... ON CONFLICT DO NOTHING inserts nothing (on
    Postgres it waits for the winner's commit), and only the winner writes the chunks."""
    chunks = [data[i:i + CHUNK_BYTES] for i in range(0, len(data), CHUNK_BYTES)] or [b""]
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(Blob).values(sha256=sha256, size_bytes=len(data), n_chunks=len(chunks),
                                  created_at=utcnow()).on_conflict_do_nothing(
        index_elements=["sha256"]).returning(Blob.sha256)
    if session.execute(stmt).scalar_one_or_none() is None:
        return False
    session.execute(insert(BlobChunk), [{"sha256": sha256, "index": i, "data": c}
                                        for i, c in enumerate(chunks)])
    return True


def read_blob(session: Session, sha256: str) -> bytes | None:
    blob = session.get(Blob, sha256)
    if blob is None:
        return None
    parts = session.scalars(select(BlobChunk.data).where(BlobChunk.sha256 == sha256)
                            .order_by(BlobChunk.index)).all()
    if len(parts) != blob.n_chunks:
        raise RuntimeError(f"blob {sha256} has {len(parts)} of {blob.n_chunks} chunks")
    return b"".join(parts)


def jobs_using_dataset(session: Session, dataset_id: str, limit: int = 5) -> list[str]:
    """Ids of (at most ``limit``) jobs that train on or score ``dataset_id``."""
    return list(session.scalars(select(Job.id).where(
        or_(Job.train_dataset_id == dataset_id, Job.test_dataset_id == dataset_id))
        .order_by(Job.created_at).limit(limit)).all())


def delete_dataset(session: Session, dataset: Dataset) -> None:
    sha = dataset.sha256
    session.delete(dataset)
    session.flush()
    if not session.scalar(select(exists().where(Dataset.sha256 == sha))):
        session.execute(delete(BlobChunk).where(BlobChunk.sha256 == sha))
        session.execute(delete(Blob).where(Blob.sha256 == sha))
