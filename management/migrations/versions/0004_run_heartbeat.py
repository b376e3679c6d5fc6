"""A run's heartbeat: while it runs, management writes the time its acquisition was last heard
from, so a run whose whole pipeline died (a power cut) is recognised and closed as interrupted
the next time the database is opened (``management.store.close_stale_runs``).

Revision 0004, after 0003; drafted 2026-12-06 14:03:45.202412.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('heartbeat_at', sa.DateTime(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('runs', schema=None) as batch_op:
        batch_op.drop_column('heartbeat_at')
