"""Tunnels, physical cracks, detection mask crops, and the runs' new fields.

Physical cracks are the detections of one crack merged across frames and cameras
(management.merge); each detection gains its mask crop (PNG) and its physical crack. A run names
its tunnel (a row of ``tunnels``) and vehicle when its config did, when its physical cracks
were merged, and how many database retries its results needed.

Revision 0002, after 0001; drafted 2026-11-22 01:31:54.791623.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('tunnels',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('name')
    )
    op.create_table('physical_cracks',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('run_id', sa.String(), nullable=False),
    sa.Column('number', sa.Integer(), nullable=False),
    sa.Column('chainage_m', sa.Float(), nullable=False),
    sa.Column('chainage_start_m', sa.Float(), nullable=False),
    sa.Column('chainage_end_m', sa.Float(), nullable=False),
    sa.Column('arc_mm', sa.Float(), nullable=False),
    sa.Column('arc_start_mm', sa.Float(), nullable=False),
    sa.Column('arc_end_mm', sa.Float(), nullable=False),
    sa.Column('length_mm', sa.Float(), nullable=False),
    sa.Column('width_mean_mm', sa.Float(), nullable=False),
    sa.Column('width_max_mm', sa.Float(), nullable=False),
    sa.Column('width_p95_mm', sa.Float(), nullable=False),
    sa.Column('orientation_deg', sa.Float(), nullable=False),
    sa.Column('type', sa.String(), nullable=False),
    sa.Column('severity', sa.String(), nullable=False),
    sa.Column('detections', sa.Integer(), nullable=False),
    sa.Column('frames', sa.Integer(), nullable=False),
    sa.Column('cameras', sa.JSON(), nullable=False),
    sa.Column('seq_first', sa.BigInteger(), nullable=False),
    sa.Column('seq_last', sa.BigInteger(), nullable=False),
    sa.Column('polyline', sa.JSON(), nullable=False),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('run_id', 'number', name='uq_physical_run_number')
    )
    with op.batch_alter_table('physical_cracks', schema=None) as batch_op:
        batch_op.create_index('ix_physical_chainage', ['chainage_start_m'], unique=False)
        batch_op.create_index('ix_physical_run_chainage', ['run_id', 'chainage_start_m'],
                              unique=False)

    with op.batch_alter_table('cracks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('mask_png', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('physical_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_cracks_physical_id'), ['physical_id'], unique=False)
        batch_op.create_foreign_key('fk_cracks_physical_id', 'physical_cracks', ['physical_id'],
                                    ['id'], ondelete='SET NULL')

    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('merged_at', sa.DateTime(), nullable=True))
        batch_op.add_column(sa.Column('database_retries', sa.Integer(), nullable=False,
                                      server_default='0'))
        batch_op.add_column(sa.Column('tunnel_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('vehicle', sa.String(), nullable=True))
        batch_op.create_index(batch_op.f('ix_runs_tunnel_id'), ['tunnel_id'], unique=False)
        batch_op.create_foreign_key('fk_runs_tunnel_id', 'tunnels', ['tunnel_id'], ['id'])



def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_runs_tunnel_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_runs_tunnel_id'))
        batch_op.drop_column('vehicle')
        batch_op.drop_column('tunnel_id')
        batch_op.drop_column('database_retries')
        batch_op.drop_column('merged_at')

    with op.batch_alter_table('cracks', schema=None) as batch_op:
        batch_op.drop_constraint('fk_cracks_physical_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_cracks_physical_id'))
        batch_op.drop_column('physical_id')
        batch_op.drop_column('mask_png')

    with op.batch_alter_table('physical_cracks', schema=None) as batch_op:
        batch_op.drop_index('ix_physical_run_chainage')
        batch_op.drop_index('ix_physical_chainage')

    op.drop_table('physical_cracks')
    op.drop_table('tunnels')
