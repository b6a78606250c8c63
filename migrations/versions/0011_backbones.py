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
    # No batch rebuild of `jobs` on SQLite (it would rewrite the table's other constraints
    # in a form that 0007's downgrade cannot drop): SQLite takes the reference inline.
    if op.get_bind().dialect.name == 'sqlite':
        op.execute('ALTER TABLE jobs ADD COLUMN backbone_id VARCHAR(36) '
                   'CONSTRAINT fk_jobs_backbone_id_backbones REFERENCES backbones (id)')
    else:
        op.add_column('jobs', sa.Column('backbone_id', sa.String(length=36), nullable=True))
        op.create_foreign_key(op.f('fk_jobs_backbone_id_backbones'), 'jobs', 'backbones',
                              ['backbone_id'], ['id'])
    op.create_index(op.f('ix_jobs_backbone_id'), 'jobs', ['backbone_id'])


def downgrade() -> None:
    op.drop_index(op.f('ix_jobs_backbone_id'), table_name='jobs')
    if op.get_bind().dialect.name != 'sqlite':  # SQLite drops the inline reference with it
        op.drop_constraint(op.f('fk_jobs_backbone_id_backbones'), 'jobs', type_='foreignkey')
    op.drop_column('jobs', 'backbone_id')
    op.drop_index(op.f('ix_backbones_tenant_id'), table_name='backbones')
    op.drop_index(op.f('ix_backbones_sha256'), table_name='backbones')
    op.drop_table('backbones')
