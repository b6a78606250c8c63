"""Jobs count the leases they lost apart from their claims (a clean hand-back is free),
carry the running trial's progress, and tenants get a per-job compute quota.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30 18:45:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0004'
down_revision: str | None = '0003'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        # Existing jobs have lost no lease that counts: their attempts so far include clean
        # hand-backs, which are no longer charged.
        batch_op.add_column(sa.Column('lost_leases', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('trial_progress', sa.JSON(), nullable=True))
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.add_column(sa.Column('max_compute_per_job', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('tenants', schema=None) as batch_op:
        batch_op.drop_column('max_compute_per_job')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('trial_progress')
        batch_op.drop_column('lost_leases')
