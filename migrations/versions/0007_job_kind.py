"""A job's kind (tune | score) becomes a column, out of its spec: the API lists and filters by
it, and the worker validates the spec as that kind (ssad_common/jobspec.py). Existing rows take
the kind their spec says; tuning specs never said it, so they are 'tune'.

On SQLite the column is added in place (ALTER TABLE ... ADD COLUMN, with its default and
check), not by the batch copy of the table: with foreign keys on, dropping the old ``jobs``
would cascade to every job's events, trials and artifacts.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 22:50:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('jobs', sa.Column(
        'kind', sa.String(length=16),
        sa.CheckConstraint("kind IN ('tune', 'score')", name=op.f('ck_jobs_kind')),
        nullable=False, server_default='tune'))
    spec_kind = ("spec->>'kind'" if op.get_bind().dialect.name == "postgresql"
                 else "json_extract(spec, '$.kind')")
    op.execute(f"UPDATE jobs SET kind = 'score' WHERE {spec_kind} = 'score'")


def downgrade() -> None:
    op.drop_column('jobs', 'kind')
