"""Two inspections of one tunnel side by side: the physical cracks of an earlier and a later run
compared (:mod:`management.compare`) after aligning the later run's chainage on the ring joints
both runs saw (:mod:`management.landmarks`), or by a constant offset; and one crack's history
over every inspection of its tunnel. Used by ``crackscan compare`` and the web application."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from sqlalchemy.orm import Session

from management.compare import TOLERANCE_MM, compare_runs
from management.errors import AlignmentError, RunNotFound
from management.features import JOINT_KIND, ring_joints
from management.landmarks import MIN_JOINTS, JointAlignment, align_on_joints
from management.models import Run
from management.store import (
    list_runs,
    per_merge,
    physical_crack,
    query_features,
    query_physical,
)

log = logging.getLogger(__name__)

ALIGNMENTS = ("joints", "offset")


HISTORY_MARGIN_M = 5.0  # a crack's history compares the cracks this far around it (after alignment)


def run_ring_joints(session: Session, run_id: str) -> list[float]:
    """The chainages of a run's ring joints (:func:`management.features.ring_joints`), kept
    while the run's merge stands (merging its lining features is the costly part)."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in the database")
    return per_merge(session, run, "ring joints", lambda: ring_joints(
        query_features(session, run=run_id, kind=JOINT_KIND)))


def _alignment(session: Session, run_a: str, run_b: str, align: str | None, offset_m: float
               ) -> JointAlignment | None:
    """RUN_B's chainage mapped into RUN_A's by their ring joints, or None (constant offset)."""
    joints_a, joints_b = run_ring_joints(session, run_a), run_ring_joints(session, run_b)
    chosen = align or ("joints" if min(len(joints_a), len(joints_b)) >= MIN_JOINTS else "offset")
    if chosen == "joints":
        try:
            return align_on_joints(joints_a, joints_b, offset_hint_m=offset_m,
                                   labels=(run_a, run_b))
        except AlignmentError as exc:
            if align == "joints":
                raise
            log.warning("%s; comparing with --offset-m %g instead", exc, offset_m)
    elif align is None:
        log.info("ring joints stored: %d of %s, %d of %s (at least %d each to align on them): "
                 "comparing with --offset-m %g", len(joints_a), run_a, len(joints_b), run_b,
                 MIN_JOINTS, offset_m)
    return None


def compare_inspections(session: Session, run_a: str, run_b: str,
                        tolerance_mm: float = TOLERANCE_MM, align: str | None = None,
                        offset_m: float = 0.0, runs: dict[str, dict] | None = None,
                        windows: tuple[tuple[float, float], tuple[float, float]] | None = None
                        ) -> dict[str, Any]:
    """:func:`management.compare.compare_runs` of ``run_a`` (earlier) and ``run_b`` (later),
    with ``before_run`` and ``after_run``. ``align`` "joints" maps RUN_B's chainage between the
    ring joints both runs saw (``offset_m`` a hint) and raises AlignmentError when it cannot;
    "offset" shifts by ``offset_m``; None (the default) aligns on joints where both runs have
    enough and falls back to the offset, with a warning, where they do not line up. Rejected
    cracks take no part. ``runs`` (from list_runs) saves listing them again; ``windows``
    (chainage ranges of RUN_A and RUN_B, each in its own run's chainage) compares only the
    cracks there."""
    if align is not None and align not in ALIGNMENTS:
        raise ValueError(f"align must be one of {ALIGNMENTS}, got {align!r}")
    known = runs if runs is not None else {run["id"]: run for run in list_runs(session)}
    for run_id in (run_a, run_b):
        if run_id not in known:
            raise RunNotFound(f"no run {run_id!r} in the database (`crackscan runs` lists them)")
    tunnels = [known[run_a]["tunnel"], known[run_b]["tunnel"]]
    if None not in tunnels and tunnels[0] != tunnels[1]:
        log.warning("comparing runs of different tunnels: %s is of %s, %s of %s",
                    run_a, tunnels[0], run_b, tunnels[1])
    alignment = _alignment(session, run_a, run_b, align, offset_m)
    before = query_physical(session, run=run_a, chainage=windows and windows[0])
    after = query_physical(session, run=run_b, chainage=windows and windows[1])
    report = compare_runs(before, after, tolerance_mm=tolerance_mm,
                          offset_m=offset_m if alignment is None else 0.0,
                          chainage_map=alignment)
    if alignment is not None:
        log.info("%s aligned on %s by %d ring joints (%d and %d stored): scale %.5f, rms %.3f m",
                 run_b, run_a, len(alignment.pairs), alignment.joints_a, alignment.joints_b,
                 alignment.scale, alignment.rms_m)
    return {"before_run": run_a, "after_run": run_b, **report}


def _in_other_run(alignment: JointAlignment | None, span: tuple[float, float], to_a: bool
                  ) -> tuple[float, float]:
    """A chainage span of one run in the other's chainage: through the joints (B to A: the
    map; A to B: its inverse, by the matched pairs, extended at the ends by the fitted scale),
    or unchanged (a constant offset 0)."""
    if alignment is None:
        return span
    if to_a:
        mapped = alignment(np.asarray(span))
    else:
        pairs = np.asarray(sorted(alignment.pairs))
        a, b = pairs[:, 0], pairs[:, 1]
        values = np.asarray(span, np.float64)
        mapped = np.interp(values, a, b)
        mapped = np.where(values < a[0], b[0] + (values - a[0]) / alignment.scale, mapped)
        mapped = np.where(values > a[-1], b[-1] + (values - a[-1]) / alignment.scale, mapped)
    return float(min(mapped)), float(max(mapped))


def crack_history(session: Session, run_id: str, number: int) -> list[dict[str, Any]]:
    """Physical crack ``number`` of ``run_id`` in every inspection of its tunnel, oldest first:
    one item per run, ``{"run", "started_at", "change", "cracks": [numbers], "length_mm",
    "width_max_mm"}``, where ``change`` is "this" (the crack's own run), "unchanged" / "grown"
    (matched, judged from the earlier of the two runs), "not found" (no match in that run).
    Measurements are the matched cracks' (longest length, widest width) in that run."""
    crack = physical_crack(session, run_id, number)
    runs = {run["id"]: run for run in list_runs(session)}
    tunnel = runs[run_id]["tunnel"]
    history = [{"run": run_id, "started_at": runs[run_id]["started_at"], "change": "this",
                "cracks": [number], "length_mm": crack["length_mm"],
                "width_max_mm": crack["width_max_mm"]}]
    if tunnel is None:
        return history
    others = [run for run in runs.values() if run["tunnel"] == tunnel and run["id"] != run_id]
    span = (crack["chainage_start_m"] - HISTORY_MARGIN_M, crack["chainage_end_m"]
            + HISTORY_MARGIN_M)
    for other in others:
        earlier = other["started_at"] <= runs[run_id]["started_at"]
        pair = (other["id"], run_id) if earlier else (run_id, other["id"])
        # only the cracks around this one, in each run's own chainage
        alignment = _alignment(session, *pair, None, 0.0)
        theirs_span = _in_other_run(alignment, span, to_a=earlier)
        windows = (theirs_span, span) if earlier else (span, theirs_span)
        report = compare_inspections(session, *pair, runs=runs, windows=windows)
        mine, theirs = ("after", "before") if earlier else ("before", "after")
        found = next((m for m in report["matched"] if number in m[mine]), None)
        if found is None:
            history.append({"run": other["id"], "started_at": other["started_at"],
                            "change": "not found", "cracks": [], "length_mm": None,
                            "width_max_mm": None})
            continue
        history.append({"run": other["id"], "started_at": other["started_at"],
                        "change": "grown" if found["grown"] else "unchanged",
                        "cracks": list(found[theirs]),
                        "length_mm": found[f"length_{theirs}_mm"],
                        "width_max_mm": found[f"width_{theirs}_mm"]})
    history.sort(key=lambda item: (item["started_at"] or "", item["run"]))
    return history
