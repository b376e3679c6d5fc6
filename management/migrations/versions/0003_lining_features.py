"""Lining features: the regions of a multi-class model's other classes (joints, stains, holes...)
found per frame, stored beside the frame's cracks and never counted as cracks. Physical features
are merged from them on query (management.features), so no table holds those.

Revision 0003, after 0002; drafted 2026-12-06 08:13:03.650662.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('lining_features',
    sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('frame_id', sa.Integer(), nullable=False),
    sa.Column('run_id', sa.String(), nullable=False),
    sa.Column('camera_id', sa.String(), nullable=False),
    sa.Column('seq', sa.BigInteger(), nullable=False),
    sa.Column('index', sa.Integer(), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('area_px', sa.BigInteger(), nullable=False),
    sa.Column('area_mm2', sa.Float(), nullable=False),
    sa.Column('bbox_px', sa.JSON(), nullable=False),
    sa.Column('chainage_m', sa.Float(), nullable=False),
    sa.Column('chainage_start_m', sa.Float(), nullable=False),
    sa.Column('chainage_end_m', sa.Float(), nullable=False),
    sa.Column('arc_mm', sa.Float(), nullable=False),
    sa.Column('arc_start_mm', sa.Float(), nullable=False),
    sa.Column('arc_end_mm', sa.Float(), nullable=False),
    sa.Column('length_mm', sa.Float(), nullable=False),
    sa.Column('orientation_deg', sa.Float(), nullable=False),
    sa.ForeignKeyConstraint(['frame_id'], ['frames.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('frame_id', 'index', name='uq_features_frame_index')
    )
    with op.batch_alter_table('lining_features', schema=None) as batch_op:
        batch_op.create_index('ix_features_run_chainage', ['run_id', 'chainage_start_m'],
                              unique=False)
        batch_op.create_index('ix_features_run_kind', ['run_id', 'kind'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('lining_features', schema=None) as batch_op:
        batch_op.drop_index('ix_features_run_kind')
        batch_op.drop_index('ix_features_run_chainage')

    op.drop_table('lining_features')
