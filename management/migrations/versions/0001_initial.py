"""Initial schema: runs, frames and cracks.

Revision 0001, the first: the tables as crackscan created them before it had migrations. A
database made by ``create_all`` in those builds has exactly these tables and is stamped 0001 when
crackscan first opens it (see management.schema).
Types are SQLAlchemy's own: the models' ``UTCDateTime`` stores a plain ``DateTime``.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.String(), nullable=False),
        sa.Column("source", sa.String(), nullable=False),
        sa.Column("mode", sa.String(), nullable=False),
        sa.Column("started_at", sa.DateTime(), nullable=False),
        sa.Column("ended_at", sa.DateTime(), nullable=True),
        sa.Column("status", sa.String(), nullable=False),
        sa.Column("model", sa.String(), nullable=True),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("cameras", sa.JSON(), nullable=False),
        sa.Column("cameras_ended", sa.JSON(), nullable=False),
        sa.Column("frames_read", sa.BigInteger(), nullable=False),
        sa.Column("frames_sent", sa.BigInteger(), nullable=False),
        sa.Column("frames_dropped", sa.BigInteger(), nullable=False),
        sa.Column("frames_bad", sa.BigInteger(), nullable=False),
        sa.Column("frames_duplicate", sa.BigInteger(), nullable=False),
        sa.Column("frames_malformed", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_table(
        "frames",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("capture_time", sa.DateTime(), nullable=False),
        sa.Column("chainage_m", sa.Float(), nullable=False),
        sa.Column("width", sa.Integer(), nullable=False),
        sa.Column("height", sa.Integer(), nullable=False),
        sa.Column("inference_ms", sa.Float(), nullable=False),
        sa.Column("worker", sa.String(), nullable=False),
        sa.Column("crack_count", sa.Integer(), nullable=False),
        sa.Column("stored_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("run_id", "camera_id", "seq", name="uq_frames_run_cam_seq"),
    )
    op.create_index("ix_frames_run_chainage", "frames", ["run_id", "chainage_m"])
    op.create_table(
        "cracks",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("frame_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.String(), nullable=False),
        sa.Column("camera_id", sa.String(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("length_px", sa.Float(), nullable=False),
        sa.Column("length_mm", sa.Float(), nullable=False),
        sa.Column("width_mean_mm", sa.Float(), nullable=False),
        sa.Column("width_max_mm", sa.Float(), nullable=False),
        sa.Column("width_p95_mm", sa.Float(), nullable=False),
        sa.Column("width_max_px", sa.Float(), nullable=False),
        sa.Column("orientation_deg", sa.Float(), nullable=False),
        sa.Column("type", sa.String(), nullable=False),
        sa.Column("severity", sa.String(), nullable=False),
        sa.Column("area_px", sa.BigInteger(), nullable=False),
        sa.Column("area_mm2", sa.Float(), nullable=False),
        sa.Column("bbox_px", sa.JSON(), nullable=False),
        sa.Column("chainage_m", sa.Float(), nullable=False),
        sa.Column("chainage_start_m", sa.Float(), nullable=False),
        sa.Column("chainage_end_m", sa.Float(), nullable=False),
        sa.Column("arc_mm", sa.Float(), nullable=False),
        sa.Column("score_mean", sa.Float(), nullable=False),
        sa.Column("polyline_px", sa.JSON(), nullable=False),
        sa.Column("polyline", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["frame_id"], ["frames.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("frame_id", "index", name="uq_cracks_frame_index"),
    )
    op.create_index("ix_cracks_run_chainage", "cracks", ["run_id", "chainage_m"])
    op.create_index("ix_cracks_chainage", "cracks", ["chainage_m"])


def downgrade() -> None:
    op.drop_table("cracks")  # its indexes go with it
    op.drop_table("frames")
    op.drop_table("runs")
