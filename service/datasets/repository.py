"""Every SQL statement about datasets and blobs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

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
    """Whether the blob is stored; on Postgres it stays so until this transaction ends
    (``FOR KEY SHARE``: a concurrent delete of its last dataset waits for us)."""
    return session.scalar(select(Blob.sha256).where(Blob.sha256 == sha256)
                          .with_for_update(key_share=True)) is not None


def insert_blob(session: Session, sha256: str, size_bytes: int,
                chunks: Iterable[bytes]) -> bool:
    """Store a blob unless it exists, its chunks (of :data:`CHUNK_BYTES`, the last one
    shorter) taken one at a time from ``chunks``. Two uploads of the same content racing
    each other both succeed: the loser's INSERT ... ON CONFLICT DO NOTHING inserts nothing
    (on Postgres it waits for the winner's commit), and only the winner writes the chunks."""
    n_chunks = max(1, -(-size_bytes // CHUNK_BYTES))
    dialect = session.get_bind().dialect.name
    insert_fn = postgresql_insert if dialect == "postgresql" else sqlite_insert
    stmt = insert_fn(Blob).values(sha256=sha256, size_bytes=size_bytes, n_chunks=n_chunks,
                                  created_at=utcnow()).on_conflict_do_nothing(
        index_elements=["sha256"]).returning(Blob.sha256)
    if session.execute(stmt).scalar_one_or_none() is None:
        return False
    written = 0
    for i, chunk in enumerate(chunks):
        session.execute(insert(BlobChunk).values(sha256=sha256, index=i, data=chunk))
        written += 1
    if written != n_chunks:
        raise RuntimeError(f"blob {sha256}: wrote {written} of {n_chunks} chunks")
    return True


def find_dataset(session: Session, tenant_id: str, sha256: str, name: str) -> Dataset | None:
    """The tenant's oldest dataset with this content and name, if any."""
    return session.scalars(
        select(Dataset).where(Dataset.tenant_id == tenant_id, Dataset.sha256 == sha256,
                              Dataset.name == name)
        .order_by(Dataset.created_at, Dataset.id).limit(1)).first()


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
    """Delete the dataset, and its blob when no other dataset (any tenant's) uses it. The
    blob row is locked first, so an upload of the same content in another transaction
    either sees it kept (its dataset counted here) or sees it gone and stores it again."""
    sha = dataset.sha256
    session.execute(select(Blob.sha256).where(Blob.sha256 == sha).with_for_update())
    session.delete(dataset)
    session.flush()
    if not session.scalar(select(exists().where(Dataset.sha256 == sha))):
        session.execute(delete(BlobChunk).where(BlobChunk.sha256 == sha))
        session.execute(delete(Blob).where(Blob.sha256 == sha))
