"""The crack management schema: runs, the frames stored for them, the cracks found per frame and
the lining features (joints, stains, holes...) a multi-class model found per frame.

Typed SQLAlchemy 2.0 declarative models with portable column types only, so SQLite and Postgres
store and return the same values. Units are mm and m; a pixel field always sits beside its mm
counterpart, never alone.

Times are stored as naive UTC (``UTCDateTime``) because SQLite has no time zones; they are handed
out as aware UTC datetimes. ``Crack.chainage_start_m <= Crack.chainage_end_m`` always holds in the
database (the store orders the pair), so a chainage range query is a simple overlap test.

Tables are created and changed only by the migrations in ``management/migrations`` (run by
:mod:`management.schema`): every change here comes with a migration, or the test that compares
the migrated schema with these models fails.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# interrupted: its pipeline died (management killed, say) before management could close it
RUN_STATUSES = ("running", "complete", "incomplete", "stopped", "interrupted")


class UTCDateTime(TypeDecorator):
    """A point in time stored as naive UTC, returned as an aware UTC datetime on every database.

    Naive datetimes given to it are taken to be UTC already."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        return None if value is None else value.replace(tzinfo=timezone.utc)


class Base(DeclarativeBase):
    pass


class Tunnel(Base):
    """A tunnel or route: what runs inspect, again and again over the years."""

    __tablename__ = "tunnels"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String, unique=True)


class Run(Base):
    """One inspection run: a source read once by acquisition, in live or replay mode.

    ``tunnel_id`` and ``vehicle`` come from the run_start's config (``acquisition.tunnel`` /
    ``acquisition.vehicle``), None when it named none. ``cameras`` comes from run_start; a run
    created lazily (a result arrived before its run_start) has source and mode ``"unknown"`` and
    no cameras until run_start fills them in.
    ``cameras_ended`` maps each camera whose end message arrived to that message's counts and
    reason; the ``frames_*`` counters are the sums over those ends, each camera counted once.
    ``frames_duplicate`` counts results skipped because their (camera, seq) was already stored.
    ``database_retries`` counts the retries its messages needed while the database was down.
    ``frames_malformed`` counts results that failed the wire checks but whose header still named
    this run; malformed messages that name no known run are only counted by the service.
    """

    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String, primary_key=True)
    source: Mapped[str] = mapped_column(String, default="unknown")
    mode: Mapped[str] = mapped_column(String, default="unknown")
    tunnel_id: Mapped[int | None] = mapped_column(
        ForeignKey("tunnels.id", name="fk_runs_tunnel_id"), nullable=True, index=True)
    vehicle: Mapped[str | None] = mapped_column(String, nullable=True)
    started_at: Mapped[datetime] = mapped_column(UTCDateTime)
    ended_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    status: Mapped[str] = mapped_column(String, default="running")
    model: Mapped[str | None] = mapped_column(String, nullable=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    cameras: Mapped[list[str]] = mapped_column(JSON, default=list)
    cameras_ended: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    frames_read: Mapped[int] = mapped_column(BigInteger, default=0)
    frames_sent: Mapped[int] = mapped_column(BigInteger, default=0)
    frames_dropped: Mapped[int] = mapped_column(BigInteger, default=0)
    frames_bad: Mapped[int] = mapped_column(BigInteger, default=0)
    frames_duplicate: Mapped[int] = mapped_column(BigInteger, default=0)
    frames_malformed: Mapped[int] = mapped_column(BigInteger, default=0)
    # times a batch holding this run's messages waited for the database (outage, lock) and was
    # stored on a retry: nothing was lost, but the run saw the database fail
    database_retries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # when the run's physical cracks were last merged from its detections (None: not yet; a
    # query merges such a run in memory)
    merged_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)
    # while a run is running, management writes this every RUN_HEARTBEAT_S that its acquisition
    # is heard from: a running run whose heartbeat is older than STALE_RUN_S has lost its
    # pipeline (a power cut) and is closed as interrupted when the database is next opened
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime, nullable=True)


class Frame(Base):
    """One frame's inference result as stored: at most one per (run, camera, seq).

    ``width`` / ``height`` are the mask size in pixels."""

    __tablename__ = "frames"
    __table_args__ = (UniqueConstraint("run_id", "camera_id", "seq", name="uq_frames_run_cam_seq"),
                      Index("ix_frames_run_chainage", "run_id", "chainage_m"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    camera_id: Mapped[str] = mapped_column(String)
    seq: Mapped[int] = mapped_column(BigInteger)
    capture_time: Mapped[datetime] = mapped_column(UTCDateTime)
    chainage_m: Mapped[float] = mapped_column(Float)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    inference_ms: Mapped[float] = mapped_column(Float)
    worker: Mapped[str] = mapped_column(String)
    crack_count: Mapped[int] = mapped_column(Integer)
    stored_at: Mapped[datetime] = mapped_column(UTCDateTime)

    cracks: Mapped[list[Crack]] = relationship(back_populates="frame",
                                               cascade="all, delete-orphan",
                                               passive_deletes=True)
    features: Mapped[list[LiningFeature]] = relationship(back_populates="frame",
                                                         cascade="all, delete-orphan",
                                                         passive_deletes=True)


class Crack(Base):
    """One crack as measured in one frame (a per-frame record; merging the records of one
    physical crack across frames is done on top of these, never instead of them).

    Every field of :class:`crackscan.wire.CrackRecord` has a column; ``bbox_px`` ([x, y, w, h]),
    ``polyline_px`` ([[x, y], ...] image points) and ``polyline`` ([[chainage_m, arc_mm], ...])
    are JSON. ``run_id``, ``camera_id`` and ``seq`` repeat the frame's so queries need no join."""

    __tablename__ = "cracks"
    __table_args__ = (UniqueConstraint("frame_id", "index", name="uq_cracks_frame_index"),
                      Index("ix_cracks_run_chainage", "run_id", "chainage_m"),
                      Index("ix_cracks_chainage", "chainage_m"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    frame_id: Mapped[int] = mapped_column(ForeignKey("frames.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    camera_id: Mapped[str] = mapped_column(String)
    seq: Mapped[int] = mapped_column(BigInteger)
    index: Mapped[int] = mapped_column(Integer)
    length_px: Mapped[float] = mapped_column(Float)
    length_mm: Mapped[float] = mapped_column(Float)
    width_mean_mm: Mapped[float] = mapped_column(Float)
    width_max_mm: Mapped[float] = mapped_column(Float)
    width_p95_mm: Mapped[float] = mapped_column(Float)
    width_max_px: Mapped[float] = mapped_column(Float)
    orientation_deg: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String)
    severity: Mapped[str] = mapped_column(String)
    area_px: Mapped[int] = mapped_column(BigInteger)
    area_mm2: Mapped[float] = mapped_column(Float)
    bbox_px: Mapped[list[int]] = mapped_column(JSON)
    chainage_m: Mapped[float] = mapped_column(Float)
    chainage_start_m: Mapped[float] = mapped_column(Float)
    chainage_end_m: Mapped[float] = mapped_column(Float)
    arc_mm: Mapped[float] = mapped_column(Float)
    score_mean: Mapped[float] = mapped_column(Float)
    polyline_px: Mapped[list[list[float]]] = mapped_column(JSON)
    polyline: Mapped[list[list[float]]] = mapped_column(JSON)
    # the binary mask inside bbox_px as PNG (0 / 255; other cracks of the frame that reach into
    # the box show too), None for records stored before masks were kept
    mask_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    # the frame's pixels around the detection as JPEG (schema 0005): photo_box_px ([x, y, w, h]
    # in frame pixels) is the region it shows, bbox_px plus a margin, scaled to at most
    # PHOTO_MAX_PX on its long side; None for records stored without photos
    photo_jpeg: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True, deferred=True)
    photo_box_px: Mapped[list[int] | None] = mapped_column(JSON, nullable=True)
    physical_id: Mapped[int | None] = mapped_column(
        ForeignKey("physical_cracks.id", ondelete="SET NULL", name="fk_cracks_physical_id"),
        nullable=True, index=True)

    frame: Mapped[Frame] = relationship(back_populates="cracks")


class PhysicalCrack(Base):
    """One crack of the lining as merged from its per-frame detections (:mod:`management.merge`);
    ``number`` counts a run's physical cracks 1.. in order of chainage. The detections point here
    through ``Crack.physical_id``; re-merging a run replaces its physical cracks."""

    __tablename__ = "physical_cracks"
    __table_args__ = (UniqueConstraint("run_id", "number", name="uq_physical_run_number"),
                      Index("ix_physical_run_chainage", "run_id", "chainage_start_m"),
                      Index("ix_physical_chainage", "chainage_start_m"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    chainage_m: Mapped[float] = mapped_column(Float)
    chainage_start_m: Mapped[float] = mapped_column(Float)
    chainage_end_m: Mapped[float] = mapped_column(Float)
    arc_mm: Mapped[float] = mapped_column(Float)
    arc_start_mm: Mapped[float] = mapped_column(Float)
    arc_end_mm: Mapped[float] = mapped_column(Float)
    length_mm: Mapped[float] = mapped_column(Float)
    width_mean_mm: Mapped[float] = mapped_column(Float)
    width_max_mm: Mapped[float] = mapped_column(Float)
    width_p95_mm: Mapped[float] = mapped_column(Float)
    orientation_deg: Mapped[float] = mapped_column(Float)
    type: Mapped[str] = mapped_column(String)
    severity: Mapped[str] = mapped_column(String)
    detections: Mapped[int] = mapped_column(Integer)
    frames: Mapped[int] = mapped_column(Integer)
    cameras: Mapped[list[str]] = mapped_column(JSON)
    seq_first: Mapped[int] = mapped_column(BigInteger)
    seq_last: Mapped[int] = mapped_column(BigInteger)
    polyline: Mapped[list[list[float]]] = mapped_column(JSON)


VERDICTS = ("confirmed", "rejected", "site_visit")  # an inspector's verdict on a physical crack
REJECT_REASONS = ("joint", "stain", "scratch", "other")  # why a rejected crack is not a crack


class CrackReview(Base):
    """An inspector's verdict on one physical crack of a run (schema 0005): ``verdict`` one of
    :data:`VERDICTS`, ``reason`` one of :data:`REJECT_REASONS` for a rejection (None otherwise),
    with a note, who and when. Reviews are kept, never overwritten: a crack's verdict is its
    latest review. They name the crack by (run, number), which a re-merge of unchanged
    detections keeps (merging is deterministic); ``chainage_m`` / ``arc_mm`` record where the
    crack was, so a verdict stays a label (exportable for training) whatever happens later."""

    __tablename__ = "crack_reviews"
    __table_args__ = (Index("ix_reviews_run_number", "run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    number: Mapped[int] = mapped_column(Integer)
    verdict: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    note: Mapped[str] = mapped_column(String, default="")
    reviewer: Mapped[str] = mapped_column(String(100))
    reviewed_at: Mapped[datetime] = mapped_column(UTCDateTime)
    chainage_m: Mapped[float] = mapped_column(Float)
    arc_mm: Mapped[float] = mapped_column(Float)


class LiningFeature(Base):
    """One lining feature as found in one frame (schema 0003): a connected region of a
    multi-class model's class other than background and crack (``kind`` is the class name:
    joint, stain, spalling, hole, cable, marking, scratch...). Never a crack, never counted as
    one. Physical features (one feature seen in several frames and cameras) are merged from these
    on query (:mod:`management.features`), not stored.

    Every field of :class:`crackscan.wire.FeatureRecord` has a column; ``bbox_px`` ([x, y, w, h])
    is JSON. ``run_id``, ``camera_id`` and ``seq`` repeat the frame's so queries need no join."""

    __tablename__ = "lining_features"
    __table_args__ = (UniqueConstraint("frame_id", "index", name="uq_features_frame_index"),
                      Index("ix_features_run_chainage", "run_id", "chainage_start_m"),
                      Index("ix_features_run_kind", "run_id", "kind"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    frame_id: Mapped[int] = mapped_column(ForeignKey("frames.id", ondelete="CASCADE"))
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    camera_id: Mapped[str] = mapped_column(String)
    seq: Mapped[int] = mapped_column(BigInteger)
    index: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    area_px: Mapped[int] = mapped_column(BigInteger)
    area_mm2: Mapped[float] = mapped_column(Float)
    bbox_px: Mapped[list[int]] = mapped_column(JSON)
    chainage_m: Mapped[float] = mapped_column(Float)
    chainage_start_m: Mapped[float] = mapped_column(Float)
    chainage_end_m: Mapped[float] = mapped_column(Float)
    arc_mm: Mapped[float] = mapped_column(Float)
    arc_start_mm: Mapped[float] = mapped_column(Float)
    arc_end_mm: Mapped[float] = mapped_column(Float)
    length_mm: Mapped[float] = mapped_column(Float)
    orientation_deg: Mapped[float] = mapped_column(Float)

    frame: Mapped[Frame] = relationship(back_populates="features")
