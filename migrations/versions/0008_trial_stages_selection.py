"""The staged search (issue 11): each trial's stage and training length, the job's training
steps and seconds so far (for the time-left estimate) and how decisive its choice was.

Columns are added in place (ALTER TABLE ... ADD COLUMN), as in 0007: nullable or with a
server default, so existing rows need no backfill (their trials read as stage-less, of
unknown length; their jobs as having no selection summary).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01 03:30:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column('job_trials', sa.Column('stage', sa.String(length=16), nullable=True))
    op.add_column('job_trials', sa.Column('train_steps', sa.Integer(), nullable=True))
    op.add_column('jobs', sa.Column('train_steps_done', sa.Integer(), nullable=False,
                                    server_default='0'))
    op.add_column('jobs', sa.Column('train_seconds_done', sa.Float(), nullable=False,
                                    server_default='0'))
    op.add_column('jobs', sa.Column('selection', sa.JSON(), nullable=True))


def downgrade() -> None:
    op.drop_column('jobs', 'selection')
    op.drop_column('jobs', 'train_seconds_done')
    op.drop_column('jobs', 'train_steps_done')
    op.drop_column('job_trials', 'train_steps')
    op.drop_column('job_trials', 'stage')
