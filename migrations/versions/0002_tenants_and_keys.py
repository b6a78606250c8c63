"""Tenants, API keys and idempotency keys; every dataset and job gets an owner (rows that
existed before belong to the "default" tenant, the embedded mode's); failed trials keep
their reason.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 16:04:02.954525
"""
from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0002'
down_revision: str | None = '0001'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_TENANT_ID = "00000000-0000-0000-0000-000000000000"  # ssad_common.models.DEFAULT_TENANT_ID


def upgrade() -> None:
    op.create_table('tenants',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('name', sa.String(length=64), nullable=False),
    sa.Column('max_active_jobs', sa.Integer(), nullable=True),
    sa.Column('max_stored_bytes', sa.BigInteger(), nullable=True),
    sa.Column('max_trials_per_job', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_tenants')),
    sa.UniqueConstraint('name', name=op.f('uq_tenants_name'))
    )
    op.execute(sa.text("INSERT INTO tenants (id, name, created_at) "
                       "VALUES (:id, 'default', CURRENT_TIMESTAMP)").bindparams(
                           id=DEFAULT_TENANT_ID))
    op.create_table('api_keys',
    sa.Column('id', sa.String(length=36), nullable=False),
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('prefix', sa.String(length=16), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_api_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id', name=op.f('pk_api_keys')),
    sa.UniqueConstraint('key_hash', name=op.f('uq_api_keys_key_hash'))
    )
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_api_keys_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('idempotency_keys',
    sa.Column('tenant_id', sa.String(length=36), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('key', sa.String(length=255), nullable=False),
    sa.Column('fingerprint', sa.String(length=64), nullable=False),
    sa.Column('resource_id', sa.String(length=36), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], name=op.f('fk_idempotency_keys_tenant_id_tenants'), ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('tenant_id', 'scope', 'key', name=op.f('pk_idempotency_keys'))
    )
    # Existing rows go to the default tenant; new rows must name their owner.
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=36), nullable=False,
                                      server_default=DEFAULT_TENANT_ID))
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.alter_column('tenant_id', server_default=None)
        batch_op.create_index(batch_op.f('ix_datasets_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_datasets_tenant_id_tenants'), 'tenants', ['tenant_id'], ['id'])

    with op.batch_alter_table('job_trials', schema=None) as batch_op:
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))

    # Existing rows go to the default tenant; new rows must name their owner.
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('tenant_id', sa.String(length=36), nullable=False,
                                      server_default=DEFAULT_TENANT_ID))
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.alter_column('tenant_id', server_default=None)
        batch_op.create_index(batch_op.f('ix_jobs_tenant_id'), ['tenant_id'], unique=False)
        batch_op.create_foreign_key(batch_op.f('fk_jobs_tenant_id_tenants'), 'tenants', ['tenant_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_jobs_tenant_id_tenants'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_jobs_tenant_id'))
        batch_op.drop_column('tenant_id')

    with op.batch_alter_table('job_trials', schema=None) as batch_op:
        batch_op.drop_column('error')

    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f('fk_datasets_tenant_id_tenants'), type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_datasets_tenant_id'))
        batch_op.drop_column('tenant_id')

    op.drop_table('idempotency_keys')
    with op.batch_alter_table('api_keys', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_api_keys_tenant_id'))

    op.drop_table('api_keys')
    op.drop_table('tenants')
