"""Data access for crack management: plain functions that take a Session. No other layer writes SQL.

Writers (``start_run``, ``store_results``, ``end_stream``, ``finish_run``, ``count_malformed``)
only add to the session; the caller commits, so one batch is one transaction. Writes are
idempotent: a run_start or end seen twice, or a result for an already stored (run, camera, seq),
changes nothing the second time (a duplicate result is counted on its run, never an error).
One management process writes a given run; concurrent writers of the same run are not supported.

``merge_run`` (re)builds a run's physical cracks from its detections (:mod:`management.merge`).

Readers (``run_progress``, ``list_runs``, ``run_summary``, ``query_cracks``, ``query_physical``,
``feature_detections``, ``query_features``) return plain dicts of JSON-ready values: times as
ISO 8601 UTC strings, lengths in mm, chainage in m. Lining features (joints, stains... of a
multi-class model) are stored beside the cracks of their frame and never counted as cracks;
their physical features are merged on query (:mod:`management.features`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import cv2
import numpy as np
from sqlalchemy import delete, func, insert, select, tuple_, update
from sqlalchemy.orm import Session

from crackscan.wire import (
    FEATURE_KIND_MAX,
    CrackRecord,
    EndOfStreamMessage,
    ResultMessage,
    RunStartMessage,
)
from management.errors import CrackNotFound, QueryError, ResumeRefused, RunNotFound
from management.features import merge_features
from management.merge import LINK_MM, merge
from management.models import (
    REJECT_REASONS,
    RUN_STATUSES,
    VERDICTS,
    Crack,
    CrackReview,
    Frame,
    LiningFeature,
    PhysicalCrack,
    Run,
    Tunnel,
)

log = logging.getLogger(__name__)

UNKNOWN = "unknown"  # source and mode of a run created before its run_start arrived



def _utc(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, tz=timezone.utc)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.astimezone(timezone.utc).isoformat()


def _get_or_create_run(session: Session, run_id: str, started_at: float) -> Run:
    run = session.get(Run, run_id)
    if run is None:
        run = Run(id=run_id, source=UNKNOWN, mode=UNKNOWN, started_at=_utc(started_at),
                  status="running", config={}, cameras=[], cameras_ended={}, frames_read=0,
                  frames_sent=0, frames_dropped=0, frames_bad=0, frames_duplicate=0,
                  frames_malformed=0, database_retries=0,
                  heartbeat_at=datetime.now(timezone.utc))
        session.add(run)
        session.flush()
    return run


# --- writers -----------------------------------------------------------------------------------

def _tunnel_id(session: Session, name: str) -> int:
    tunnel = session.scalar(select(Tunnel).where(Tunnel.name == name))
    if tunnel is None:
        tunnel = Tunnel(name=name)
        session.add(tunnel)
        session.flush()
    return tunnel.id


def start_run(session: Session, msg: RunStartMessage) -> Run:
    """Create the run, or fill in one created lazily by an early result. Status and counters of
    an existing run are kept, so a repeated run_start is harmless."""
    run = _get_or_create_run(session, msg.run_id, msg.started_at)
    run.source = msg.source
    run.mode = msg.mode
    acquisition = msg.config.get("acquisition") or {}
    if isinstance(acquisition, dict):
        tunnel, vehicle = acquisition.get("tunnel"), acquisition.get("vehicle")
        run.tunnel_id = _tunnel_id(session, tunnel) if isinstance(tunnel, str) and tunnel else None
        run.vehicle = vehicle if isinstance(vehicle, str) and vehicle else None
    run.started_at = _utc(msg.started_at)
    run.heartbeat_at = datetime.now(timezone.utc)
    run.cameras = list(msg.cameras)
    run.config = dict(msg.config)
    return run


def store_results(session: Session, results: list[ResultMessage]) -> tuple[int, int]:
    """Store each result's frame, cracks and lining features once; returns (stored, duplicates).

    A result whose (run, camera, seq) is already in the database, or earlier in ``results``, is
    skipped and counted in the run's ``frames_duplicate``. A run not yet started is created
    lazily (source "unknown") so no result waits on its run_start."""
    if not results:
        return 0, 0
    runs: dict[str, Run] = {}
    for result in results:
        if result.run_id not in runs:
            runs[result.run_id] = _get_or_create_run(session, result.run_id, result.capture_time)
    keys = {(r.run_id, r.camera_id, r.seq) for r in results}
    seen: set[tuple[str, str, int]] = set()
    key_list = sorted(keys)
    for start in range(0, len(key_list), 500):  # bounded IN lists
        chunk = key_list[start:start + 500]
        rows = session.execute(select(Frame.run_id, Frame.camera_id, Frame.seq)
                               .where(tuple_(Frame.run_id, Frame.camera_id, Frame.seq).in_(chunk)))
        seen.update((run_id, camera_id, seq) for run_id, camera_id, seq in rows)
    duplicates = 0
    now = datetime.now(timezone.utc)
    frames: list[dict[str, Any]] = []
    details: list[tuple[list[dict[str, Any]], list[dict[str, Any]]]] = []  # (cracks, features)
    for result in results:
        key = (result.run_id, result.camera_id, result.seq)
        run = runs[result.run_id]
        if key in seen:
            duplicates += 1
            run.frames_duplicate += 1
            continue
        seen.add(key)
        if run.model is None:
            run.model = result.model
        height, width = result.mask.shape[:2]
        frames.append(dict(run_id=result.run_id, camera_id=result.camera_id, seq=result.seq,
                           capture_time=_utc(result.capture_time), chainage_m=result.chainage_m,
                           width=int(width), height=int(height),
                           inference_ms=result.inference_ms, worker=result.worker,
                           crack_count=len(result.cracks), stored_at=now))
        details.append(([_crack_row(result, record) for record in result.cracks],
                        [dict(run_id=result.run_id, camera_id=result.camera_id, seq=result.seq,
                              **feature.to_dict()) for feature in result.features]))
    session.flush()  # the runs first, for the foreign keys
    if not frames:
        return 0, duplicates
    # bulk inserts: one statement a table, not the unit of work's object a row (most of
    # management's time a frame went to the ORM)
    frame_ids = session.scalars(insert(Frame).returning(Frame.id, sort_by_parameter_order=True),
                                frames).all()
    cracks, features = [], []
    for frame_id, (frame_cracks, frame_features) in zip(frame_ids, details, strict=True):
        cracks += [dict(row, frame_id=frame_id) for row in frame_cracks]
        features += [dict(row, frame_id=frame_id) for row in frame_features]
    if cracks:
        session.execute(insert(Crack), cracks)
    if features:  # none from a binary model
        session.execute(insert(LiningFeature), features)
    return len(frames), duplicates


def _crack_row(result: ResultMessage, record: CrackRecord) -> dict[str, Any]:
    """The ``cracks`` row of one crack of ``result`` (without its frame id)."""
    fields = record.to_dict()
    start_m, end_m = sorted((record.chainage_start_m, record.chainage_end_m))
    photo = next((photo for photo in result.photos if photo.crack == record.index), None)
    fields.update(run_id=result.run_id, camera_id=result.camera_id, seq=result.seq,
                  chainage_start_m=start_m, chainage_end_m=end_m,
                  mask_png=_mask_crop_png(result.mask, record.bbox_px),
                  photo_jpeg=None if photo is None else photo.jpeg,
                  photo_box_px=None if photo is None else list(photo.box_px))
    return fields


def _mask_crop_png(mask: np.ndarray, bbox: tuple[int, int, int, int]) -> bytes | None:
    x, y, w, h = bbox
    crop = np.ascontiguousarray(mask[max(y, 0):y + h, max(x, 0):x + w])
    if crop.size == 0:
        return None
    ok, png = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 6])
    return png.tobytes() if ok else None


def end_stream(session: Session, msg: EndOfStreamMessage) -> bool:
    """Add one camera's end-of-stream counts to its run, once per camera; returns False when
    this camera's end was already recorded (nothing changes)."""
    run = _get_or_create_run(session, msg.run_id, msg.ended_at)
    if msg.camera_id in run.cameras_ended:
        return False
    if run.cameras and msg.camera_id not in run.cameras:
        log.warning("run %s: end for camera %r, which its run_start did not list %s",
                    msg.run_id, msg.camera_id, run.cameras)
    run.frames_read += msg.frames_read
    run.frames_sent += msg.frames_sent
    run.frames_dropped += msg.frames_dropped
    run.frames_bad += msg.frames_bad
    # A new dict, so the JSON column sees the change.
    run.cameras_ended = {**run.cameras_ended, msg.camera_id: {
        "ended_at": _iso(_utc(msg.ended_at)), "reason": msg.reason,
        "frames_read": msg.frames_read, "frames_sent": msg.frames_sent,
        "frames_dropped": msg.frames_dropped, "frames_bad": msg.frames_bad,
        "frames_recorded": msg.frames_recorded}}
    return True


def count_database_retries(session: Session, run_ids: set[str], retries: int) -> None:
    """Add ``retries`` to each run's ``database_retries`` (runs not in the database are skipped)."""
    for run_id in sorted(run_ids):
        run = session.get(Run, run_id)
        if run is not None:
            run.database_retries += retries


def count_malformed(session: Session, run_id: str) -> bool:
    """Count a malformed result against ``run_id`` if that run exists; returns whether it did."""
    run = session.get(Run, run_id)
    if run is None:
        return False
    run.frames_malformed += 1
    return True


def finish_run(session: Session, run_id: str, status: str,
               ended_at: datetime | None = None) -> Run:
    """Give the run its final ``status`` and ``ended_at`` (now, unless given)."""
    if status not in RUN_STATUSES:
        raise QueryError(f"bad run status {status!r}; expected one of {RUN_STATUSES}")
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    run.status = status
    run.ended_at = ended_at or datetime.now(timezone.utc)
    return run


def close_interrupted_run(session: Session, run_id: str) -> bool:
    """A run still ``running`` after its pipeline has ended (management died before it could
    finish it) is closed as ``interrupted``, and what it stored is merged into physical cracks;
    True when it was. A run that is already closed, or missing, is left as it is."""
    run = session.get(Run, run_id)
    if run is None or run.status != "running":
        return False
    finish_run(session, run_id, "interrupted")
    merge_run(session, run_id)
    return True


STALE_RUN_S = 300.0  # a running run not heard from for this long has lost its pipeline


def beat_run(session: Session, run_id: str) -> None:
    """The run's acquisition was heard from now (management writes this while the run runs)."""
    session.execute(update(Run).where(Run.id == run_id, Run.status == "running")
                    .values(heartbeat_at=datetime.now(timezone.utc)))


def close_stale_runs(session: Session, stale_after_s: float = STALE_RUN_S) -> list[str]:
    """Close as ``interrupted`` (and merge) every run still ``running`` whose heartbeat (for a
    run from before heartbeats: its start) is more than ``stale_after_s`` old: its pipeline died
    with nobody left to close it (a power cut). Returns their ids. A run closed this way whose
    pipeline was only cut off from the database for that long is finished again when its end
    arrives."""
    cutoff = datetime.now(timezone.utc) - timedelta(seconds=stale_after_s)
    stale = session.scalars(select(Run.id).where(
        Run.status == "running",
        func.coalesce(Run.heartbeat_at, Run.started_at) < cutoff)).all()
    for run_id in stale:
        close_interrupted_run(session, run_id)
        log.warning("run %s was running but not heard from for %.0f s: closed as interrupted "
                    "(crackscan run --resume %s completes a replay)", run_id, stale_after_s,
                    run_id)
    return list(stale)


def stored_frames(session: Session, run_id: str) -> list[tuple[str, int]]:
    """(camera, seq) of every frame ``run_id`` has stored."""
    return [(camera, seq) for camera, seq in session.execute(
        select(Frame.camera_id, Frame.seq).where(Frame.run_id == run_id))]


def reopen_run(session: Session, run_id: str, source: str) -> list[tuple[str, int]]:
    """Ready ``run_id`` to be completed by a second replay of its ``source`` (``crackscan run
    --resume``, after a power loss or a pipeline that died): returns the (camera, seq) of every
    frame it has stored, for acquisition to skip, and clears what the second pass counts again
    (its ends' counters: that pass reads the whole source; the status is ``running`` again).
    What it stored stays. Refused for an unknown run, another source, a live run (its frames
    are gone; replay its recording as a new run) and a complete one."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database to resume")
    if run.source != source:
        raise ResumeRefused(f"run {run_id} read {run.source!r}, not {source!r}: resume it on "
                            "the same source")
    if run.mode != "replay":
        raise ResumeRefused(f"run {run_id} is a {run.mode} run: only a replay can be resumed "
                            "(replay its recording as a new run)")
    if run.status == "complete":
        raise ResumeRefused(f"run {run_id} is complete: nothing to resume")
    stored = stored_frames(session, run_id)
    log.info("run %s (%s): %d frames stored; resuming", run_id, run.status, len(stored))
    run.status, run.ended_at = "running", None
    run.heartbeat_at = datetime.now(timezone.utc)
    run.cameras_ended = {}
    run.frames_read = run.frames_sent = run.frames_dropped = run.frames_bad = 0
    return stored


def merge_run(session: Session, run_id: str, link_mm: float = LINK_MM) -> int:
    """Replace the run's physical cracks by a fresh merge of its detections (numbered 1.. in
    order of chainage) and point each detection at its physical crack; returns their number."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    found = session.execute(_crack_statement(run=run_id)).all()
    detections = [_crack_dict(*row) for row in found]
    session.execute(update(Crack).where(Crack.run_id == run_id).values(physical_id=None))
    session.execute(delete(PhysicalCrack).where(PhysicalCrack.run_id == run_id))
    merged = merge(detections, link_mm)
    rows = [PhysicalCrack(run_id=run_id, number=number, **crack.to_dict())
            for number, crack in enumerate(merged, start=1)]
    session.add_all(rows)
    session.flush()
    for row, crack in zip(rows, merged, strict=True):
        ids = [found[i][0].id for i in crack.members]
        for start in range(0, len(ids), 500):
            session.execute(update(Crack).where(Crack.id.in_(ids[start:start + 500]))
                            .values(physical_id=row.id))
    run.merged_at = datetime.now(timezone.utc)
    return len(rows)


def import_physical_cracks(session: Session, run_id: str, cracks: list[dict[str, Any]]) -> int:
    """Add cracks merged elsewhere (another inspection system's records, a benchmark's tunnel)
    to a run as physical cracks without detections, numbered on after its last; each dict has
    the fields of :class:`management.models.PhysicalCrack` but ``run_id`` and ``number``.
    Marks the run merged; returns how many were added."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    last = session.scalar(select(func.max(PhysicalCrack.number))
                          .where(PhysicalCrack.run_id == run_id)) or 0
    rows = [{**crack, "run_id": run_id, "number": last + i}
            for i, crack in enumerate(cracks, start=1)]
    for start in range(0, len(rows), 5000):
        session.execute(PhysicalCrack.__table__.insert(), rows[start:start + 5000])
    run.merged_at = datetime.now(timezone.utc)
    return len(rows)


# --- readers -----------------------------------------------------------------------------------

def _stored_frames(session: Session, run_id: str) -> int:
    return session.scalar(select(func.count(Frame.id)).where(Frame.run_id == run_id)) or 0


def run_progress(session: Session, run_id: str) -> dict[str, Any]:
    """Where a run stands. ``expected`` is the sum of ``frames_sent`` over the cameras that
    ended, or None until every camera listed in run_start has ended (or before run_start).
    ``missing`` is expected - stored (None while expected is unknown)."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    stored = _stored_frames(session, run_id)
    all_ended = bool(run.cameras) and all(c in run.cameras_ended for c in run.cameras)
    expected = sum(end["frames_sent"] for end in run.cameras_ended.values()) if all_ended else None
    return {
        "run_id": run.id,
        "status": run.status,
        "cameras": list(run.cameras),
        "cameras_ended": sorted(run.cameras_ended),
        "end_reasons": sorted({end["reason"] for end in run.cameras_ended.values()}),
        "expected": expected,
        "stored": stored,
        "missing": None if expected is None else max(expected - stored, 0),
        "duplicates": run.frames_duplicate,
        "malformed": run.frames_malformed,
    }


def run_latency(session: Session, run_id: str) -> dict[str, float | None]:
    """Capture-to-stored latency of a run's frames in ms: p50, p99 and max (None without
    frames). Meaningful for live runs, whose capture times are the run's own clock."""
    rows = session.execute(select(Frame.capture_time, Frame.stored_at)
                           .where(Frame.run_id == run_id)).all()
    if not rows:
        return {"latency_ms_p50": None, "latency_ms_p99": None, "latency_ms_max": None}
    delays = sorted((stored - captured).total_seconds() * 1000 for captured, stored in rows)

    def percentile(q: float) -> float:
        return round(delays[min(len(delays) - 1, math.ceil(q * len(delays)) - 1)], 1)

    return {"latency_ms_p50": percentile(0.5), "latency_ms_p99": percentile(0.99),
            "latency_ms_max": round(delays[-1], 1)}


def run_config(session: Session, run_id: str) -> dict[str, Any]:
    """The configuration a run was started with (its run_start's), {} when it sent none."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    return dict(run.config or {})


def list_runs(session: Session, run_id: str | None = None) -> list[dict[str, Any]]:
    """Every run, oldest first, with its counters and what is stored for it; with ``run_id``
    only that run (empty when there is none), its counts read through the run's indexes rather
    than over every run's rows (:func:`run_summary`)."""

    def of_run(statement: Any, table: Any) -> Any:
        return statement if run_id is None else statement.where(table.run_id == run_id)

    frames = of_run(select(Frame.run_id, func.count(Frame.id).label("frames"),
                           func.min(Frame.chainage_m).label("chainage_start_m"),
                           func.max(Frame.chainage_m).label("chainage_end_m")),
                    Frame).group_by(Frame.run_id).subquery()
    # per camera: sequence numbers between its first and last stored frame that are not stored
    # (frames dropped live, lost, or still on their way)
    per_camera = of_run(select(Frame.run_id,
                               (func.max(Frame.seq) - func.min(Frame.seq) + 1
                                - func.count(Frame.id)).label("gaps")),
                        Frame).group_by(Frame.run_id, Frame.camera_id).subquery()
    gaps = (select(per_camera.c.run_id, func.sum(per_camera.c.gaps).label("gaps"))
            .group_by(per_camera.c.run_id).subquery())
    cracks = of_run(select(Crack.run_id, func.count(Crack.id).label("cracks")),
                    Crack).group_by(Crack.run_id).subquery()
    physical = of_run(select(PhysicalCrack.run_id, func.count(PhysicalCrack.id)
                             .label("physical")), PhysicalCrack).group_by(
        PhysicalCrack.run_id).subquery()
    statement = (select(Run, frames.c.frames, frames.c.chainage_start_m, frames.c.chainage_end_m,
                        cracks.c.cracks, physical.c.physical, gaps.c.gaps, Tunnel.name)
                 .outerjoin(Tunnel, Tunnel.id == Run.tunnel_id)
                 .outerjoin(frames, frames.c.run_id == Run.id)
                 .outerjoin(gaps, gaps.c.run_id == Run.id)
                 .outerjoin(cracks, cracks.c.run_id == Run.id)
                 .outerjoin(physical, physical.c.run_id == Run.id)
                 .order_by(Run.started_at, Run.id))
    rows = session.execute(statement if run_id is None
                           else statement.where(Run.id == run_id)).all()
    summaries = [{
        "id": run.id,
        "tunnel": tunnel,
        "vehicle": run.vehicle,
        "source": run.source,
        "mode": run.mode,
        "status": run.status,
        "model": run.model,
        "cameras": list(run.cameras),
        "frames": frame_count or 0,
        "frames_read": run.frames_read,
        "frames_sent": run.frames_sent,
        "frames_dropped": run.frames_dropped,
        "frames_bad": run.frames_bad,
        "frames_duplicate": run.frames_duplicate,
        "frames_malformed": run.frames_malformed,
        "seq_gaps": int(seq_gaps or 0),
        "database_retries": run.database_retries,
        "cracks": crack_count or 0,
        "physical_cracks": physical_count or 0,
        "started_at": _iso(run.started_at),
        "ended_at": _iso(run.ended_at),
        "chainage_start_m": chainage_start,
        "chainage_end_m": chainage_end,
        "frames_recorded": sum(end.get("frames_recorded", 0)
                               for end in run.cameras_ended.values()),
    } for run, frame_count, chainage_start, chainage_end, crack_count, physical_count, seq_gaps,
        tunnel in rows]
    for summary in summaries:  # a live run's latency: what bounded queues are for
        if summary["mode"] == "live":
            summary.update(run_latency(session, summary["id"]))
    return summaries


def run_summary(session: Session, run_id: str) -> dict[str, Any] | None:
    """One run as :func:`list_runs` gives it, None when there is no such run: the end of every
    ``crackscan run``, a report and the web application's run page ask for one run, and a
    database of years of runs must not be summed up whole for it."""
    found = list_runs(session, run_id)
    return found[0] if found else None


def parse_chainage(text: str) -> tuple[float, float]:
    """``"A:B"`` (metres) as (A, B); a ValueError says what is wrong and what would work."""
    parts = str(text).split(":")
    example = "expected START:END in metres, e.g. 1200:1500"
    if len(parts) != 2:
        raise QueryError(f"bad chainage range {text!r}: {example}")
    try:
        start, end = float(parts[0]), float(parts[1])
    except ValueError:
        raise QueryError(f"bad chainage range {text!r}: {example}") from None
    if not (math.isfinite(start) and math.isfinite(end)):
        raise QueryError(f"bad chainage range {text!r}: both ends must be finite numbers")
    if start > end:
        raise QueryError(f"bad chainage range {text!r}: start {start:g} m is after end {end:g} m")
    return start, end


def _check_minimum(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise QueryError(f"{name} must be a number >= 0, got {value!r}")


SORT_FIELDS = ("chainage_m", "length_mm", "width_max_mm", "width_mean_mm", "arc_mm")
FEATURE_SORT_FIELDS = ("chainage_m", "length_mm", "area_mm2", "arc_mm")


def _check_query(min_width_mm: float | None, min_length_mm: float | None, limit: int | None,
                 chainage: tuple[float, float] | None, sort: str,
                 sort_fields: tuple[str, ...] = SORT_FIELDS) -> tuple[str, bool]:
    """Raise a ValueError naming a bad argument; returns (sort field, descending)."""
    _check_minimum("min_width_mm", min_width_mm)
    _check_minimum("min_length_mm", min_length_mm)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise QueryError(f"limit must be an integer >= 0, got {limit!r}")
    if chainage is not None and chainage[0] > chainage[1]:
        raise QueryError(f"chainage range start {chainage[0]:g} m is after its end "
                         f"{chainage[1]:g} m")
    field = sort.removeprefix("-")
    if field not in sort_fields:
        raise QueryError(f"cannot sort by {sort!r}; sort by one of {', '.join(sort_fields)} "
                         "(a leading '-' sorts largest first)")
    return field, sort.startswith("-")


def query_cracks(session: Session, run: str | None = None, min_width_mm: float | None = None,
                 min_length_mm: float | None = None,
                 chainage: tuple[float, float] | None = None, crack_type: str | None = None,
                 severity: str | None = None, sort: str = "chainage_m",
                 limit: int | None = None, tunnel: str | None = None) -> list[dict[str, Any]]:
    """Per-frame crack records (detections), by default ordered by run, chainage, camera, seq
    and index.

    ``min_width_mm`` keeps cracks with ``width_max_mm >= min_width_mm``; ``min_length_mm``
    those with ``length_mm >= min_length_mm``; ``chainage=(a, b)`` those whose extent
    [chainage_start_m, chainage_end_m] overlaps [a, b] (a crack that crosses a bound counts);
    ``crack_type`` and ``severity`` match exactly; ``tunnel`` keeps the runs of that tunnel;
    ``sort`` is one of :data:`SORT_FIELDS`, with a leading ``-`` for largest first (across
    runs); ``limit`` caps the number of records."""
    field, descending = _check_query(min_width_mm, min_length_mm, limit, chainage, sort)
    statement = _crack_statement(run, min_width_mm, min_length_mm, chainage, crack_type, severity,
                                 field, descending)
    if tunnel is not None:
        statement = statement.where(Crack.run_id.in_(_runs_of_tunnel(tunnel)))
    if limit is not None:
        statement = statement.limit(limit)
    return [_crack_dict(*row) for row in session.execute(statement)]


def _runs_of_tunnel(tunnel: str) -> Any:
    return select(Run.id).join(Tunnel, Tunnel.id == Run.tunnel_id).where(Tunnel.name == tunnel)


def _crack_statement(run: str | None = None, min_width_mm: float | None = None,
                     min_length_mm: float | None = None,
                     chainage: tuple[float, float] | None = None, crack_type: str | None = None,
                     severity: str | None = None, field: str = "chainage_m",
                     descending: bool = False) -> Any:
    """Rows of (Crack, capture time, physical crack number or None) for :func:`query_cracks`."""
    statement = (select(Crack, Frame.capture_time, PhysicalCrack.number)
                 .join(Frame, Crack.frame_id == Frame.id)
                 .outerjoin(PhysicalCrack, Crack.physical_id == PhysicalCrack.id))
    if run is not None:
        statement = statement.where(Crack.run_id == run)
    if min_width_mm is not None:
        statement = statement.where(Crack.width_max_mm >= min_width_mm)
    if min_length_mm is not None:
        statement = statement.where(Crack.length_mm >= min_length_mm)
    if chainage is not None:
        start, end = chainage
        statement = statement.where(Crack.chainage_start_m <= end, Crack.chainage_end_m >= start)
    if crack_type is not None:
        statement = statement.where(Crack.type == crack_type)
    if severity is not None:
        statement = statement.where(Crack.severity == severity)
    order = [Crack.run_id, Crack.chainage_m, Crack.camera_id, Crack.seq, Crack.index]
    if field != "chainage_m" or descending:
        column = getattr(Crack, field)
        order = [column.desc() if descending else column.asc(), *order]
    return statement.order_by(*order)


def query_physical(session: Session, run: str | None = None,
                   min_width_mm: float | None = None, min_length_mm: float | None = None,
                   chainage: tuple[float, float] | None = None, crack_type: str | None = None,
                   severity: str | None = None, sort: str = "chainage_m",
                   limit: int | None = None, tunnel: str | None = None,
                   verdict: str | None = None) -> list[dict[str, Any]]:
    """Physical cracks, with the filters, sorting and limit of :func:`query_cracks` (a physical
    crack's ``width_max_mm`` and ``length_mm`` are its merged ones; its extent is over all its
    detections). Stored ones for runs that were merged; a run not merged yet (still running, or
    stored before merging existed) is merged in memory, so the answer is always complete; its
    records say ``"merged": false``.

    Each record carries its inspector's ``verdict`` (None: not reviewed) and ``verdict_reason``.
    ``verdict`` filters by it (one of :data:`VERDICT_FILTERS`); by default (None) cracks an
    inspector rejected are left out, as they are of every count and export."""
    field, descending = _check_query(min_width_mm, min_length_mm, limit, chainage, sort)
    _check_verdict(verdict)
    statement = select(Run.id, Run.merged_at).order_by(Run.started_at, Run.id)
    if run is not None:
        statement = statement.where(Run.id == run)
    if tunnel is not None:
        statement = statement.where(Run.id.in_(_runs_of_tunnel(tunnel)))
    runs = session.execute(statement).all()
    records: list[dict[str, Any]] = []
    for run_id, merged_at in runs:
        if merged_at is not None:
            statement = select(PhysicalCrack).where(PhysicalCrack.run_id == run_id)
            if chainage is not None:
                statement = statement.where(PhysicalCrack.chainage_start_m <= chainage[1],
                                            PhysicalCrack.chainage_end_m >= chainage[0])
            records += [_physical_dict(row, True) for row in session.scalars(statement)]
        else:
            cracks = merge(query_cracks(session, run=run_id))
            records += [{"run": run_id, "number": number, **crack.to_dict(), "merged": False}
                        for number, crack in enumerate(cracks, start=1)]

    def keep(record: dict[str, Any]) -> bool:
        return ((min_width_mm is None or record["width_max_mm"] >= min_width_mm)
                and (min_length_mm is None or record["length_mm"] >= min_length_mm)
                and (chainage is None or (record["chainage_start_m"] <= chainage[1]
                                          and record["chainage_end_m"] >= chainage[0]))
                and (crack_type is None or record["type"] == crack_type)
                and (severity is None or record["severity"] == severity))

    _attach_verdicts(session, records, [run_id for run_id, _ in runs])
    records = [record for record in records if keep(record) and _verdict_keeps(verdict, record)]
    records.sort(key=lambda r: (r["run"], r["chainage_m"], r["number"]))  # runs stay in order
    if field != "chainage_m" or descending:
        records.sort(key=lambda r: r[field], reverse=descending)  # stable: ties keep that order
    return records if limit is None else records[:limit]


def _physical_dict(row: Any, merged: bool) -> dict[str, Any]:
    """A physical crack's record, from its ORM object or a plain row of its table."""
    return {
        "run": row.run_id, "number": row.number,
        "chainage_m": row.chainage_m, "chainage_start_m": row.chainage_start_m,
        "chainage_end_m": row.chainage_end_m, "arc_mm": row.arc_mm,
        "arc_start_mm": row.arc_start_mm, "arc_end_mm": row.arc_end_mm,
        "length_mm": row.length_mm, "width_mean_mm": row.width_mean_mm,
        "width_max_mm": row.width_max_mm, "width_p95_mm": row.width_p95_mm,
        "orientation_deg": row.orientation_deg, "type": row.type, "severity": row.severity,
        "detections": row.detections, "frames": row.frames, "cameras": list(row.cameras),
        "seq_first": row.seq_first, "seq_last": row.seq_last,
        "polyline": [list(point) for point in row.polyline], "merged": merged,
    }


def feature_detections(session: Session, run_id: str, kind: str | None = None
                       ) -> list[dict[str, Any]]:
    """A run's per-frame lining feature records (of one ``kind``, or all), ordered by chainage,
    camera, seq and index."""
    statement = select(LiningFeature).where(LiningFeature.run_id == run_id)
    if kind is not None:
        statement = statement.where(LiningFeature.kind == kind)
    statement = statement.order_by(LiningFeature.chainage_m, LiningFeature.camera_id,
                                   LiningFeature.seq, LiningFeature.index)
    return [_feature_dict(row) for row in session.scalars(statement)]


def _feature_dict(row: LiningFeature) -> dict[str, Any]:
    return {
        "run": row.run_id, "camera": row.camera_id, "seq": row.seq, "index": row.index,
        "kind": row.kind, "chainage_m": row.chainage_m,
        "chainage_start_m": row.chainage_start_m, "chainage_end_m": row.chainage_end_m,
        "arc_mm": row.arc_mm, "arc_start_mm": row.arc_start_mm, "arc_end_mm": row.arc_end_mm,
        "length_mm": row.length_mm, "orientation_deg": row.orientation_deg,
        "area_mm2": row.area_mm2, "area_px": row.area_px, "bbox_px": list(row.bbox_px),
    }


def query_features(session: Session, run: str | None = None, kind: str | None = None,
                   min_length_mm: float | None = None,
                   chainage: tuple[float, float] | None = None, sort: str = "chainage_m",
                   limit: int | None = None, tunnel: str | None = None
                   ) -> list[dict[str, Any]]:
    """Physical lining features (never cracks), merged on query from each run's feature
    detections (:func:`management.features.merge_features`).

    ``number`` counts a run's physical features (all kinds) 1.. in order of chainage, whatever
    the filters, so it names the same feature in every answer. ``kind`` matches exactly;
    ``min_length_mm``, ``chainage`` (overlap of the extent), ``tunnel``, ``sort`` (one of
    :data:`FEATURE_SORT_FIELDS`, a leading ``-`` for largest first) and ``limit`` work as in
    :func:`query_cracks`. Runs without features (a binary model's) give none."""
    field, descending = _check_query(None, min_length_mm, limit, chainage, sort,
                                     FEATURE_SORT_FIELDS)
    if kind is not None and not (0 < len(kind) <= FEATURE_KIND_MAX and kind.isprintable()):
        raise QueryError(f"bad feature kind {kind[:40]!r}: a class name of the model, e.g. "
                         "joint, stain or hole")
    statement = (select(Run.id).where(Run.id.in_(select(LiningFeature.run_id)))
                 .order_by(Run.started_at, Run.id))
    if run is not None:
        statement = statement.where(Run.id == run)
    if tunnel is not None:
        statement = statement.where(Run.id.in_(_runs_of_tunnel(tunnel)))
    records: list[dict[str, Any]] = []
    for run_id in session.scalars(statement):
        merged = merge_features(feature_detections(session, run_id))
        records += [{"run": run_id, "number": number, **feature.to_dict()}
                    for number, feature in enumerate(merged, start=1)]

    def keep(record: dict[str, Any]) -> bool:
        return ((kind is None or record["kind"] == kind)
                and (min_length_mm is None or record["length_mm"] >= min_length_mm)
                and (chainage is None or (record["chainage_start_m"] <= chainage[1]
                                          and record["chainage_end_m"] >= chainage[0])))

    records = [record for record in records if keep(record)]
    if field != "chainage_m" or descending:
        records.sort(key=lambda r: r[field], reverse=descending)  # stable: ties keep that order
    return records if limit is None else records[:limit]


def crack_mask(session: Session, run_id: str, camera_id: str, seq: int, index: int
               ) -> np.ndarray | None:
    """The stored mask crop (uint8 0 / 255, the detection's bounding box) of one detection; None
    when the record has none (stored before crops were kept)."""
    png = session.scalar(select(Crack.mask_png).where(
        Crack.run_id == run_id, Crack.camera_id == camera_id, Crack.seq == seq,
        Crack.index == index))
    if png is None:
        return None
    return cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)


def _crack_dict(crack: Crack, capture_time: datetime, physical: int | None) -> dict[str, Any]:
    return {
        "run": crack.run_id,
        "camera": crack.camera_id,
        "seq": crack.seq,
        "index": crack.index,
        "chainage_m": crack.chainage_m,
        "chainage_start_m": crack.chainage_start_m,
        "chainage_end_m": crack.chainage_end_m,
        "arc_mm": crack.arc_mm,
        "length_mm": crack.length_mm,
        "length_px": crack.length_px,
        "width_mean_mm": crack.width_mean_mm,
        "width_max_mm": crack.width_max_mm,
        "width_p95_mm": crack.width_p95_mm,
        "width_max_px": crack.width_max_px,
        "orientation_deg": crack.orientation_deg,
        "type": crack.type,
        "severity": crack.severity,
        "area_mm2": crack.area_mm2,
        "area_px": crack.area_px,
        "score_mean": crack.score_mean,
        "bbox_px": list(crack.bbox_px),
        "polyline": [list(point) for point in crack.polyline],
        "polyline_px": [list(point) for point in crack.polyline_px],
        "capture_time": _iso(capture_time),
        "physical": physical,  # the number of its physical crack in the run; None until merged
    }



# --- reviews: an inspector's verdict on a physical crack ---------------------------------------

# what query_physical's ``verdict`` takes: a verdict, "unreviewed", "any"; None: not rejected
VERDICT_FILTERS = (*VERDICTS, "unreviewed", "any")
REVIEWER_MAX = 100
NOTE_MAX = 2000


def _check_verdict(verdict: str | None) -> None:
    if verdict is not None and verdict not in VERDICT_FILTERS:
        raise QueryError(f"bad verdict {str(verdict)[:40]!r}: one of {', '.join(VERDICT_FILTERS)}")


def _verdict_keeps(verdict: str | None, record: dict[str, Any]) -> bool:
    given = record.get("verdict")
    if verdict is None:
        return given != "rejected"
    if verdict == "any":
        return True
    if verdict == "unreviewed":
        return given is None
    return given == verdict


def latest_reviews(session: Session, run_ids: list[str]) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest review of every reviewed physical crack of these runs, by (run, number)."""
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    for start in range(0, len(run_ids), 500):
        rows = session.scalars(select(CrackReview)
                               .where(CrackReview.run_id.in_(run_ids[start:start + 500]))
                               .order_by(CrackReview.reviewed_at, CrackReview.id))
        latest.update(((row.run_id, row.number), _review_dict(row)) for row in rows)
    return latest


def _attach_verdicts(session: Session, records: list[dict[str, Any]], run_ids: list[str]) -> None:
    latest = latest_reviews(session, run_ids) if run_ids else {}
    for record in records:
        review = latest.get((record["run"], record["number"]))
        record["verdict"] = None if review is None else review["verdict"]
        record["verdict_reason"] = None if review is None else review["reason"]


def _review_dict(row: CrackReview) -> dict[str, Any]:
    return {"run": row.run_id, "number": row.number, "verdict": row.verdict,
            "reason": row.reason, "note": row.note, "reviewer": row.reviewer,
            "reviewed_at": _iso(row.reviewed_at), "chainage_m": row.chainage_m,
            "arc_mm": row.arc_mm}


def physical_crack(session: Session, run_id: str, number: int) -> dict[str, Any]:
    """One physical crack of a run, whatever its verdict; CrackNotFound names what is missing."""
    if session.get(Run, run_id) is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    for record in query_physical(session, run=run_id, verdict="any"):
        if record["number"] == number:
            return record
    raise CrackNotFound(f"run {run_id!r} has no physical crack {number}")


def add_review(session: Session, run_id: str, number: int, verdict: str,
               reason: str | None = None, note: str = "", reviewer: str = "") -> dict[str, Any]:
    """Store an inspector's verdict on physical crack ``number`` of ``run_id`` (kept beside the
    earlier ones; the latest counts). A rejection needs a reason (:data:`REJECT_REASONS`), the
    other verdicts take none; QueryError names a bad argument."""
    if verdict not in VERDICTS:
        raise QueryError(f"bad verdict {str(verdict)[:40]!r}: one of {', '.join(VERDICTS)}")
    if verdict == "rejected" and reason not in REJECT_REASONS:
        raise QueryError(f"a rejected crack needs a reason: one of {', '.join(REJECT_REASONS)}")
    if verdict != "rejected" and reason is not None:
        raise QueryError(f"only a rejection has a reason (verdict {verdict!r}, reason {reason!r})")
    reviewer = (reviewer or "").strip()
    if not (0 < len(reviewer) <= REVIEWER_MAX and reviewer.isprintable()):
        raise QueryError(f"a review names its reviewer (1 to {REVIEWER_MAX} printable "
                         "characters)")
    if len(note) > NOTE_MAX:
        raise QueryError(f"a review note has at most {NOTE_MAX} characters, got {len(note)}")
    crack = physical_crack(session, run_id, number)
    row = CrackReview(run_id=run_id, number=number, verdict=verdict, reason=reason, note=note,
                      reviewer=reviewer, reviewed_at=datetime.now(timezone.utc),
                      chainage_m=crack["chainage_m"], arc_mm=crack["arc_mm"])
    session.add(row)
    session.flush()
    return _review_dict(row)


def crack_reviews(session: Session, run_id: str, number: int) -> list[dict[str, Any]]:
    """Every review of one physical crack, oldest first."""
    rows = session.scalars(select(CrackReview).where(CrackReview.run_id == run_id,
                                                     CrackReview.number == number)
                           .order_by(CrackReview.reviewed_at, CrackReview.id))
    return [_review_dict(row) for row in rows]


# --- evidence: the detections of a physical crack, with their photos ---------------------------

def crack_detections(session: Session, run_id: str, number: int) -> list[dict[str, Any]]:
    """The per-frame detections of one physical crack (as :func:`query_cracks`), each with
    ``photo`` (whether a photo is stored); a run not merged yet is merged in memory."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    if run.merged_at is None:
        detections = query_cracks(session, run=run_id)
        merged = merge(detections)
        if not 0 < number <= len(merged):
            raise CrackNotFound(f"run {run_id!r} has no physical crack {number}")
        chosen = [detections[i] for i in merged[number - 1].members]
    else:
        physical_id = session.scalar(select(PhysicalCrack.id).where(
            PhysicalCrack.run_id == run_id, PhysicalCrack.number == number))
        if physical_id is None:
            raise CrackNotFound(f"run {run_id!r} has no physical crack {number}")
        rows = session.execute(_crack_statement(run=run_id)
                               .where(Crack.physical_id == physical_id)).all()
        chosen = [_crack_dict(*row) for row in rows]
    keys = [(d["camera"], d["seq"], d["index"]) for d in chosen]
    with_photo = set()
    for start in range(0, len(keys), 500):
        with_photo.update(session.execute(
            select(Crack.camera_id, Crack.seq, Crack.index)
            .where(Crack.run_id == run_id, Crack.photo_jpeg.is_not(None),
                   tuple_(Crack.camera_id, Crack.seq, Crack.index).in_(keys[start:start + 500]))
        ).all())
    for detection in chosen:
        detection["photo"] = (detection["camera"], detection["seq"], detection["index"]) in {
            tuple(key) for key in with_photo}
    return chosen


def detection_evidence(session: Session, run_id: str, camera_id: str, seq: int, index: int
                       ) -> dict[str, Any]:
    """What a detection's evidence is drawn from: ``photo_jpeg`` and ``photo_box_px`` (None when
    no photo was kept), ``mask_png`` and ``bbox_px``; CrackNotFound when there is no such
    detection."""
    row = session.execute(select(Crack.photo_jpeg, Crack.photo_box_px, Crack.mask_png,
                                 Crack.bbox_px).where(
        Crack.run_id == run_id, Crack.camera_id == camera_id, Crack.seq == seq,
        Crack.index == index)).first()
    if row is None:
        raise CrackNotFound(f"run {run_id!r} has no detection {index} in frame {seq} of camera "
                            f"{camera_id!r}")
    photo, box, mask, bbox = row
    return {"photo_jpeg": photo, "photo_box_px": None if box is None else list(box),
            "mask_png": mask, "bbox_px": list(bbox)}


# --- the lining map: a viewport's cracks, or their density where there are too many ------------

# what is worked out once per run and merge (a map's crack index, a run's ring joints): kept by
# (what, database, run, merged_at) while that merge stands, the oldest dropped beyond MERGE_KEEP
_PER_MERGE: dict[tuple[str, str, str, datetime], Any] = {}
MERGE_KEEP = 16


def per_merge(session: Session, run: Run, what: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` for a merged run, kept while the run's merge stands; a run not merged yet
    (its records still change) is computed afresh every time."""
    if run.merged_at is None:
        return compute()
    key = (what, str(session.get_bind().url), run.id, run.merged_at)
    if key not in _PER_MERGE:
        if len(_PER_MERGE) >= MERGE_KEEP:
            _PER_MERGE.pop(next(iter(_PER_MERGE)))
        _PER_MERGE[key] = compute()
    return _PER_MERGE[key]


class CrackIndex:
    """A merged run's physical cracks as columns in memory (extents, centre, width, length,
    type, severity): what a map viewport needs to count its cracks and bin their density
    without reading the table again. Built once per run and merge (one query, ``per_merge``);
    a 100,000-crack run takes about 6 MB. ``longest_m``, the longest chainage extent, bounds
    the index range a viewport query reads: a crack meeting it starts at most that far before
    it."""

    def __init__(self, rows: list[Any]) -> None:
        columns = list(zip(*rows, strict=True)) if rows else [()] * 10
        (self.chainage_start, self.chainage_end, self.arc_start, self.arc_end, self.chainage,
         self.arc, self.width, self.length) = (np.asarray(c, np.float64) for c in columns[:8])
        self.type = np.asarray(columns[8], dtype=object)
        self.severity = np.asarray(columns[9], dtype=object)
        self.longest_m = float((self.chainage_end - self.chainage_start).max(initial=0.0))

    def meets(self, chainage: tuple[float, float], arc: tuple[float, float],
              min_width_mm: float | None, min_length_mm: float | None,
              crack_type: str | None, severity: str | None) -> np.ndarray:
        """Which cracks meet the viewport and pass the filters (as the SQL statement)."""
        keep = ((self.chainage_start <= chainage[1]) & (self.chainage_end >= chainage[0])
                & (self.arc_start <= arc[1]) & (self.arc_end >= arc[0]))
        if min_width_mm is not None:
            keep &= self.width >= min_width_mm
        if min_length_mm is not None:
            keep &= self.length >= min_length_mm
        if crack_type is not None:
            keep &= self.type == crack_type
        if severity is not None:
            keep &= self.severity == severity
        return keep


def crack_index(session: Session, run: Run) -> CrackIndex:
    """The :class:`CrackIndex` of a merged run, built on first use."""
    c = PhysicalCrack
    return per_merge(session, run, "crack index", lambda: CrackIndex(session.execute(select(
        c.chainage_start_m, c.chainage_end_m, c.arc_start_mm, c.arc_end_mm, c.chainage_m,
        c.arc_mm, c.width_max_mm, c.length_mm, c.type, c.severity)
        .where(c.run_id == run.id)).all()))


def _viewport_statement(run_id: str, chainage: tuple[float, float], arc: tuple[float, float],
                        min_width_mm: float | None, min_length_mm: float | None,
                        crack_type: str | None, severity: str | None,
                        longest_m: float = math.inf) -> Any:
    # plain rows, not ORM objects: building thousands of those cost more than the query
    statement = select(*PhysicalCrack.__table__.columns).where(
        PhysicalCrack.run_id == run_id,
        PhysicalCrack.chainage_start_m <= chainage[1], PhysicalCrack.chainage_end_m >= chainage[0],
        PhysicalCrack.arc_start_mm <= arc[1], PhysicalCrack.arc_end_mm >= arc[0])
    if math.isfinite(longest_m):
        statement = statement.where(PhysicalCrack.chainage_start_m >= chainage[0] - longest_m)
    if min_width_mm is not None:
        statement = statement.where(PhysicalCrack.width_max_mm >= min_width_mm)
    if min_length_mm is not None:
        statement = statement.where(PhysicalCrack.length_mm >= min_length_mm)
    if crack_type is not None:
        statement = statement.where(PhysicalCrack.type == crack_type)
    if severity is not None:
        statement = statement.where(PhysicalCrack.severity == severity)
    return statement


def _check_range(name: str, value: tuple[float, float]) -> None:
    if not (len(value) == 2 and all(math.isfinite(v) for v in value) and value[0] <= value[1]):
        raise QueryError(f"bad {name} range {value!r}: two finite numbers, start <= end")


def viewport_cracks(session: Session, run_id: str, chainage: tuple[float, float],
                    arc: tuple[float, float], min_width_mm: float | None = None,
                    min_length_mm: float | None = None, crack_type: str | None = None,
                    severity: str | None = None, verdict: str | None = None,
                    limit: int = 5000) -> dict[str, Any]:
    """The physical cracks of a run whose extent meets the viewport (``chainage`` m x ``arc``
    mm), filtered as :func:`query_physical`: ``{"cracks": [...], "total": n}``, or, when more
    than ``limit`` meet it, ``{"cracks": None, "total": n}`` (ask :func:`viewport_density`).
    For a merged run the cracks are counted in its :class:`CrackIndex` and read with one
    query of the viewport's index range (the map's many small queries)."""
    _check_range("chainage", chainage)
    _check_range("arc", arc)
    _check_query(min_width_mm, min_length_mm, limit, None, "chainage_m")
    _check_verdict(verdict)
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    if run.merged_at is None:  # merged in memory: small (running) runs only
        records = [r for r in query_physical(
            session, run=run_id, min_width_mm=min_width_mm, min_length_mm=min_length_mm,
            chainage=chainage, crack_type=crack_type, severity=severity, verdict=verdict)
            if r["arc_start_mm"] <= arc[1] and r["arc_end_mm"] >= arc[0]]
        return {"total": len(records), "cracks": records if len(records) <= limit else None}
    index = crack_index(session, run)
    total = int(index.meets(chainage, arc, min_width_mm, min_length_mm, crack_type,
                            severity).sum())
    if total > limit:  # verdicts are few: the count before them is close enough to decide
        return {"total": total, "cracks": None}
    statement = _viewport_statement(run_id, chainage, arc, min_width_mm, min_length_mm,
                                    crack_type, severity, index.longest_m)
    records = [_physical_dict(row, True) for row in session.execute(
        statement.order_by(PhysicalCrack.chainage_m, PhysicalCrack.number))]
    _attach_verdicts(session, records, [run_id])
    records = [r for r in records if _verdict_keeps(verdict, r)]
    return {"total": len(records), "cracks": records}


def viewport_density(session: Session, run_id: str, chainage: tuple[float, float],
                     arc: tuple[float, float], cells: tuple[int, int] = (200, 50),
                     min_width_mm: float | None = None, min_length_mm: float | None = None,
                     crack_type: str | None = None, severity: str | None = None
                     ) -> dict[str, Any]:
    """The viewport cut into ``cells`` (along, across) cells, each cell with cracks (by their
    centre) as ``[i, j, count, widest width_max_mm]``, with the cell size; the map draws these
    where a viewport holds too many cracks to draw. A merged run is binned in its
    :class:`CrackIndex`. Rejected cracks are counted too (verdicts are applied to drawn cracks
    only)."""
    _check_range("chainage", chainage)
    _check_range("arc", arc)
    along, across = cells
    if not (0 < along <= 2000 and 0 < across <= 500):
        raise QueryError(f"bad density cells {cells!r}: 1..2000 along, 1..500 across")
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    cell_m = max((chainage[1] - chainage[0]) / along, 1e-3)
    cell_mm = max((arc[1] - arc[0]) / across, 1e-3)
    if run.merged_at is None:
        records = viewport_cracks(session, run_id, chainage, arc, min_width_mm, min_length_mm,
                                  crack_type, severity, "any", limit=10 ** 9)["cracks"]
        bins: dict[tuple[int, int], list[float]] = {}
        for r in records:
            key = (int((r["chainage_m"] - chainage[0]) // cell_m),
                   int((r["arc_mm"] - arc[0]) // cell_mm))
            count, widest = bins.get(key, (0, 0.0))
            bins[key] = [count + 1, max(widest, r["width_max_mm"])]
        found = [[i, j, int(c), w] for (i, j), (c, w) in sorted(bins.items())]
    else:  # binned in the run's index: one pass of numpy, not a table scan per view
        index = crack_index(session, run)
        keep = index.meets(chainage, arc, min_width_mm, min_length_mm, crack_type, severity)
        keep &= (index.chainage >= chainage[0]) & (index.arc >= arc[0])
        i = ((index.chainage[keep] - chainage[0]) // cell_m).astype(np.int64)
        j = ((index.arc[keep] - arc[0]) // cell_mm).astype(np.int64)
        inside = (i < along) & (j < across)
        i, j, width = i[inside], j[inside], index.width[keep][inside]
        flat = i * across + j
        counts = np.bincount(flat, minlength=along * across)
        widest = np.zeros(along * across)
        np.maximum.at(widest, flat, width)
        found = [[int(k // across), int(k % across), int(counts[k]), float(widest[k])]
                 for k in np.flatnonzero(counts)]
    return {"cell_m": cell_m, "cell_mm": cell_mm, "cells": [c for c in found
                                                            if c[0] < along and c[1] < across]}


VIEWPORT_MARGIN_M = 5.0  # feature detections this far beyond a viewport join the merge there


def viewport_features(session: Session, run_id: str, chainage: tuple[float, float],
                      limit: int = 5000) -> list[dict[str, Any]]:
    """The lining features of a run that meet a chainage window, merged from the detections
    within it and VIEWPORT_MARGIN_M either side only (the map's layer: cheap on a long run). A
    feature reaching beyond that margin is drawn as far as it; ``number`` is None (the run-wide
    numbers are :func:`query_features`')."""
    _check_range("chainage", chainage)
    if session.get(Run, run_id) is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    lo, hi = chainage[0] - VIEWPORT_MARGIN_M, chainage[1] + VIEWPORT_MARGIN_M
    longest = session.scalar(select(func.max(LiningFeature.chainage_end_m
                                             - LiningFeature.chainage_start_m))
                             .where(LiningFeature.run_id == run_id)) or 0.0
    rows = session.scalars(select(LiningFeature).where(
        LiningFeature.run_id == run_id, LiningFeature.chainage_start_m <= hi,
        LiningFeature.chainage_start_m >= lo - longest, LiningFeature.chainage_end_m >= lo)
        .order_by(LiningFeature.chainage_m, LiningFeature.camera_id, LiningFeature.seq,
                  LiningFeature.index))
    merged = merge_features([_feature_dict(row) for row in rows])
    found = [{"run": run_id, "number": None, **feature.to_dict()} for feature in merged
             if feature.chainage_start_m <= chainage[1] and feature.chainage_end_m >= chainage[0]]
    return found[:limit]


def run_severity_counts(session: Session, run_ids: list[str]) -> dict[str, dict[str, int]]:
    """Physical cracks per severity of each run, rejected ones left out (counted by the
    database for merged runs)."""
    counts: dict[str, dict[str, int]] = {run_id: {} for run_id in run_ids}
    merged = set(session.scalars(select(Run.id).where(Run.merged_at.is_not(None))))
    for run_id in run_ids:
        if run_id not in merged:
            for crack in query_physical(session, run=run_id):
                counts[run_id][crack["severity"]] = counts[run_id].get(crack["severity"], 0) + 1
            continue
        rows = session.execute(select(PhysicalCrack.severity, func.count())
                               .where(PhysicalCrack.run_id == run_id)
                               .group_by(PhysicalCrack.severity)).all()
        counts[run_id] = {severity: int(n) for severity, n in rows}
        rejected = [number for (_, number), review in latest_reviews(session, [run_id]).items()
                    if review["verdict"] == "rejected"]
        for start in range(0, len(rejected), 500):
            for severity, n in session.execute(
                    select(PhysicalCrack.severity, func.count())
                    .where(PhysicalCrack.run_id == run_id,
                           PhysicalCrack.number.in_(rejected[start:start + 500]))
                    .group_by(PhysicalCrack.severity)).all():
                counts[run_id][severity] -= int(n)
        counts[run_id] = {k: v for k, v in counts[run_id].items() if v}
    return counts


def run_extent(session: Session, run_id: str) -> dict[str, list[float]]:
    """Where a run's frames and physical cracks lie: ``chainage_m`` [start, end] and
    ``arc_mm`` [start, end] (0..1000 mm round the ring when it has no crack)."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    frames = session.execute(select(func.min(Frame.chainage_m), func.max(Frame.chainage_m))
                             .where(Frame.run_id == run_id)).one()
    if run.merged_at is not None:
        cracks = session.execute(select(
            func.min(PhysicalCrack.chainage_start_m), func.max(PhysicalCrack.chainage_end_m),
            func.min(PhysicalCrack.arc_start_mm), func.max(PhysicalCrack.arc_end_mm))
            .where(PhysicalCrack.run_id == run_id)).one()
    else:
        found = query_physical(session, run=run_id, verdict="any")
        cracks = ((min((c["chainage_start_m"] for c in found), default=None),
                   max((c["chainage_end_m"] for c in found), default=None),
                   min((c["arc_start_mm"] for c in found), default=None),
                   max((c["arc_end_mm"] for c in found), default=None)))
    starts = [v for v in (frames[0], cracks[0]) if v is not None]
    ends = [v for v in (frames[1], cracks[1]) if v is not None]
    return {"chainage_m": [min(starts, default=0.0), max(ends, default=0.0)],
            "arc_mm": [0.0 if cracks[2] is None else cracks[2],
                       1000.0 if cracks[3] is None else cracks[3]]}
