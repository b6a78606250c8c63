"""Datasets keep the sizes their images were resized from (an upload of mixed sizes is
resized to its most common size), so every read of the dataset says so, not only the
upload's answer.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 19:15:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0006'
down_revision: str | None = '0005'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('resized_from', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('resized_from')
