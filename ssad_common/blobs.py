"""Blob storage: uploaded files, stored once per content hash in chunks (Postgres keeps
each chunk out of line, see migration 0005). The API writes blobs; the API and the worker
read them."""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import Session

from ssad_common.models import Blob, BlobChunk, utcnow

CHUNK_BYTES = 8 * 1024 * 1024


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


def read_blob(session: Session, sha256: str) -> bytes | None:
    blob = session.get(Blob, sha256)
    if blob is None:
        return None
    parts = session.scalars(select(BlobChunk.data).where(BlobChunk.sha256 == sha256)
                            .order_by(BlobChunk.index)).all()
    if len(parts) != blob.n_chunks:
        raise RuntimeError(f"blob {sha256} has {len(parts)} of {blob.n_chunks} chunks")
    return b"".join(parts)
