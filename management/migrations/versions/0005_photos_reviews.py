"""Evidence and review: each crack detection keeps a JPEG of the frame around it (with the box it
shows), and inspectors' verdicts on physical cracks are stored (``crack_reviews``). Databases
from before keep their records; their detections have no photo.

Revision 0005, after 0004; drafted 2026-12-06.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('cracks', schema=None) as batch_op:
        batch_op.add_column(sa.Column('photo_jpeg', sa.LargeBinary(), nullable=True))
        batch_op.add_column(sa.Column('photo_box_px', sa.JSON(), nullable=True))
    op.create_table(
        'crack_reviews',
        sa.Column('id', sa.Integer(), autoincrement=True, nullable=False),
        sa.Column('run_id', sa.String(), nullable=False),
        sa.Column('number', sa.Integer(), nullable=False),
        sa.Column('verdict', sa.String(length=16), nullable=False),
        sa.Column('reason', sa.String(length=16), nullable=True),
        sa.Column('note', sa.String(), nullable=False),
        sa.Column('reviewer', sa.String(length=100), nullable=False),
        sa.Column('reviewed_at', sa.DateTime(), nullable=False),
        sa.Column('chainage_m', sa.Float(), nullable=False),
        sa.Column('arc_mm', sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(['run_id'], ['runs.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index('ix_reviews_run_number', 'crack_reviews', ['run_id', 'number'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_reviews_run_number', table_name='crack_reviews')
    op.drop_table('crack_reviews')
    with op.batch_alter_table('cracks', schema=None) as batch_op:
        batch_op.drop_column('photo_box_px')
        batch_op.drop_column('photo_jpeg')
