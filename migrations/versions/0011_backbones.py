"""Uploaded backbones (issue 12): encoder weights a tenant stores as a blob and a tuning
job starts its detectors from (``jobs.backbone_id``).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-01 11:20:00.000000
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0011'
down_revision: str | None = '0010'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        'backbones',
        sa.Column('id', sa.String(length=36), nullable=False),
        sa.Column('tenant_id', sa.String(length=36), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('size_bytes', sa.BigInteger(), nullable=False),
        sa.Column('meta', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(['sha256'], ['blobs.sha256'],
                                name=op.f('fk_backbones_sha256_blobs')),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'],
                                name=op.f('fk_backbones_tenant_id_tenants')),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_backbones')),
    )
    op.create_index(op.f('ix_backbones_sha256'), 'backbones', ['sha256'])
    op.create_index(op.f('ix_backbones_tenant_id'), 'backbones', ['tenant_id'])
    # On SQLite a batch rebuild of `jobs` (migrations/env.py turns foreign keys off for it,
    # so its children are not cascaded, and checks them after).
    with op.batch_alter_table('jobs') as batch:
        batch.add_column(sa.Column('backbone_id', sa.String(length=36), nullable=True))
        batch.create_index(batch.f('ix_jobs_backbone_id'), ['backbone_id'])
        batch.create_foreign_key(batch.f('fk_jobs_backbone_id_backbones'), 'backbones',
                                 ['backbone_id'], ['id'])


def downgrade() -> None:
    with op.batch_alter_table('jobs') as batch:
        batch.drop_constraint(batch.f('fk_jobs_backbone_id_backbones'), type_='foreignkey')
        batch.drop_index(batch.f('ix_jobs_backbone_id'))
        batch.drop_column('backbone_id')
    op.drop_index(op.f('ix_backbones_tenant_id'), table_name='backbones')
    op.drop_index(op.f('ix_backbones_sha256'), table_name='backbones')
    op.drop_table('backbones')
