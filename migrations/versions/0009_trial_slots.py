"""Parallel trials (issue 12): a job's live claims move to ``job_slots`` (up to the job's
``parallelism`` of them), the job keeps its planned trial count so a claimer can tell
whether it has work left, and each trial records the worker that ran it and when.

Existing jobs read as parallelism 1 with an unknown plan (claimed only while queued, as
before); a job running during the upgrade has no slot row, so its worker's next fenced
write is refused and the job is requeued once its lease (``jobs.lease_expires_at``)
expires: stop the workers before migrating, as docs/deploy.md says.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-01 07:00:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'job_slots',
        sa.Column('job_id', sa.String(length=36), nullable=False),
        sa.Column('attempt', sa.Integer(), nullable=False),
        sa.Column('worker_id', sa.String(length=255), nullable=False),
        sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('heartbeat_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('trial_number', sa.Integer(), nullable=True),
        sa.Column('trial_started_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('trial_progress', sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'],
                                name=op.f('fk_job_slots_job_id_jobs'), ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('job_id', 'attempt', name=op.f('pk_job_slots')),
    )
    op.create_index(op.f('ix_job_slots_lease_expires_at'), 'job_slots', ['lease_expires_at'])
    op.add_column('jobs', sa.Column('parallelism', sa.Integer(), nullable=False,
                                    server_default='1'))
    op.add_column('jobs', sa.Column('trials_planned', sa.Integer(), nullable=True))
    op.add_column('job_trials', sa.Column('worker_id', sa.String(length=255), nullable=True))
    for name in ('started_at', 'finished_at'):
        op.add_column('job_trials', sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    op.drop_column('job_trials', 'finished_at')
    op.drop_column('job_trials', 'started_at')
    op.drop_column('job_trials', 'worker_id')
    op.drop_column('jobs', 'trials_planned')
    op.drop_column('jobs', 'parallelism')
    op.drop_index(op.f('ix_job_slots_lease_expires_at'), table_name='job_slots')
    op.drop_table('job_slots')
