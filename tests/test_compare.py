"""Comparing two inspections (``crackscan compare``): matching physical cracks in tunnel
coordinates, growth, new and gone cracks; on hand-made cracks, through the database (SQLite and
Postgres) and on a real pipeline run of a synthetic drive whose cracks then grew."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from support import (
    BINARY_MODEL,
    SEVERITY,
    T0,
    crackscan,
    crackscan_concurrently,
    result_message,
    run_start_message,
)

from crackscan.wire import CrackRecord, FeatureRecord, ResultMessage
from management import store
from management.compare import CHANGE_COLUMNS, change_rows, compare_runs
from management.db import make_engine, session_factory
from management.landmarks import align_on_joints

EARLIER = "20261121-100000-aaaa"
LATER = "20271121-100000-bbbb"


def physical(number: int, points: list[tuple[float, float]], width: float = 0.3,
             length_mm: float | None = None) -> dict:
    """A physical crack as query_physical returns it: ``points`` are (chainage m, arc mm)."""
    line = np.asarray(points, float)
    mm = np.stack([line[:, 0] * 1000, line[:, 1]], axis=1)
    length = float(np.hypot(*np.diff(mm, axis=0).T).sum())
    return {"run": "x", "number": number, "chainage_m": float(line[:, 0].mean()),
            "chainage_start_m": float(line[:, 0].min()),
            "chainage_end_m": float(line[:, 0].max()), "arc_mm": float(line[:, 1].mean()),
            "length_mm": length if length_mm is None else length_mm, "width_mean_mm": width / 2,
            "width_max_mm": width, "width_p95_mm": width * 0.9, "orientation_deg": 0.0,
            "type": "longitudinal", "severity": SEVERITY.classify(width), "detections": 1,
            "frames": 1, "cameras": ["cam0"], "seq_first": 0, "seq_last": 0,
            "polyline": [list(p) for p in points], "merged": True}


def shifted(crack: dict, metres: float) -> dict:
    """The same crack as a drive whose odometer reads ``metres`` more would place it."""
    moved = {**crack, "polyline": [[c + metres, a] for c, a in crack["polyline"]]}
    for key in ("chainage_m", "chainage_start_m", "chainage_end_m"):
        moved[key] = crack[key] + metres
    return moved


def read_long(chainage_m):
    """Where a later drive's odometer, 2 % long and 0.7 m ahead from chainage 1200 m, reads a
    chainage: 3.3 m ahead at the end of a 167 m section."""
    return 1200.0 + 1.02 * (np.asarray(chainage_m, np.float64) - 1200.0) + 0.7


def read_by(crack: dict, read) -> dict:
    """The same crack as a drive whose odometer reads ``read(chainage)`` places it: chainages
    moved, measures (taken in the image) the same."""
    moved = {**crack, "polyline": [[float(read(c)), a] for c, a in crack["polyline"]]}
    for key in ("chainage_m", "chainage_start_m", "chainage_end_m"):
        moved[key] = float(read(crack[key]))
    return moved


RING_JOINTS_M = 1200.0 + 1.5 * np.arange(112)  # a ring joint every 1.5 m over 167 m


def long_section() -> list[dict]:
    """40 cracks along the 167 m from chainage 1200 m, each 30 cm round the ring (so a crack
    5 cm off along the tunnel is another crack)."""
    rng = np.random.default_rng(5)
    starts = np.sort(1200.0 + rng.uniform(0.5, 166.0, 40))
    return [physical(n, [(c, a), (c + 0.02, a + 300.0)])
            for n, (c, a) in enumerate(zip(starts, rng.uniform(200, 8000, 40), strict=True), 1)]


def tunnel() -> list[dict]:
    """Four cracks along 10 m of tunnel, ordered by chainage."""
    return [physical(1, [(100.0, 1000.0), (100.3, 1010.0)]),
            physical(2, [(102.0, 2000.0), (102.01, 2200.0)], width=0.2),
            physical(3, [(104.0, 500.0), (104.2, 600.0), (104.4, 620.0)], width=1.2),
            physical(4, [(108.0, 3000.0), (108.5, 3000.0)])]


# --- compare_runs ------------------------------------------------------------------------------

def test_identical_runs_match_one_to_one_with_nothing_changed():
    report = compare_runs(tunnel(), tunnel())
    assert report["summary"] == {"before": 4, "after": 4, "matched": 4, "grown": 0,
                                 "unchanged": 4, "new": 0, "gone": 0}
    assert [(m["before"], m["after"]) for m in report["matched"]] == [([n], [n])
                                                                      for n in (1, 2, 3, 4)]
    assert all(m["length_growth_mm"] == 0 and m["width_growth_mm"] == 0
               for m in report["matched"])
    assert report["new"] == report["gone"] == [] and change_rows(report) == []
    json.dumps(report, allow_nan=False)  # JSON-ready


def test_a_longer_and_a_wider_crack_have_grown_by_the_right_amounts():
    before = tunnel()
    after = tunnel()
    after[0] = physical(1, [(100.0, 1000.0), (100.3, 1010.0), (100.45, 1015.0)])  # +150 mm
    after[1] = physical(2, [(102.0, 2000.0), (102.01, 2200.0)], width=0.45)  # 0.2 -> 0.45 mm
    after[3] = physical(4, [(108.0, 3000.0), (108.505, 3000.0)])  # +5 mm: within the scatter
    report = compare_runs(before, after)
    assert report["summary"]["grown"] == 2 and report["summary"]["unchanged"] == 2
    longer, wider, steady, small = report["matched"]
    assert longer["grown"] and longer["before"] == longer["after"] == [1]
    assert longer["length_growth_mm"] == pytest.approx(
        after[0]["length_mm"] - before[0]["length_mm"], abs=0.001)
    assert longer["length_growth_mm"] == pytest.approx(150.08, abs=0.01)
    assert longer["width_growth_mm"] == 0
    assert wider["grown"] and wider["width_growth_mm"] == pytest.approx(0.25)
    assert (wider["width_before_mm"], wider["width_after_mm"]) == (0.2, 0.45)
    assert wider["severity_after"] == SEVERITY.classify(0.45)
    assert wider["length_growth_mm"] == 0
    assert not steady["grown"]
    assert not small["grown"] and small["length_growth_mm"] == pytest.approx(5.0)
    rows = change_rows(report)
    assert [(r["change"], r["before"], r["after"]) for r in rows] == [("grown", "1", "1"),
                                                                       ("grown", "2", "2")]
    assert all(list(r) == CHANGE_COLUMNS for r in rows)


def test_the_growth_thresholds_are_parameters():
    before = [physical(1, [(100.0, 1000.0), (100.1, 1000.0)], width=0.2)]
    after = [physical(1, [(100.0, 1000.0), (100.108, 1000.0)], width=0.25)]  # +8 mm, +0.05 mm
    assert not compare_runs(before, after)["matched"][0]["grown"]
    assert compare_runs(before, after, grow_length_mm=5, grow_length_share=0)["matched"][0][
        "grown"]
    assert compare_runs(before, after, grow_width_mm=0.04)["matched"][0]["grown"]


def test_new_and_gone_cracks():
    before = tunnel()
    after = tunnel()[:2] + tunnel()[3:] + [physical(5, [(110.0, 700.0), (110.2, 750.0)])]
    report = compare_runs(before, after)
    assert report["summary"] == {"before": 4, "after": 4, "matched": 3, "grown": 0,
                                 "unchanged": 3, "new": 1, "gone": 1}
    [gone], [new] = report["gone"], report["new"]
    assert gone["number"] == 3 and gone["width_max_mm"] == 1.2
    assert gone["chainage_start_m"] == 104.0 and gone["chainage_end_m"] == 104.4
    assert new["number"] == 5 and new["chainage_m"] == pytest.approx(110.1)
    rows = change_rows(report)
    assert [(r["change"], r["before"], r["after"]) for r in rows] == [("gone", "3", None),
                                                                       ("new", None, "5")]
    assert rows[0]["length_before_mm"] == gone["length_mm"] and rows[0]["length_after_mm"] is None
    assert rows[1]["width_after_mm"] == new["width_max_mm"] and rows[1]["width_before_mm"] is None


def test_an_odometer_offset_is_undone_by_offset_m():
    before = tunnel()
    after = [shifted(c, -0.8) for c in tunnel()]  # the later drive's odometer reads 0.8 m less
    lost = compare_runs(before, after)
    assert lost["summary"]["matched"] == 0 and lost["summary"]["new"] == 4
    report = compare_runs(before, after, offset_m=0.8)
    assert report["summary"]["matched"] == 4 and report["summary"]["grown"] == 0
    assert [m["chainage_m"] for m in report["matched"]] == pytest.approx(
        [c["chainage_m"] for c in before])  # tunnel coordinates: the earlier run's


def test_ring_joints_undo_an_odometer_scale_that_a_constant_offset_cannot():
    """The later odometer reads 2 % long and 0.7 m ahead. Undoing the 0.7 m matches only the
    cracks of the first few metres; aligned on the ring joints both drives read, every crack
    matches itself at its earlier chainage, none is new or gone."""
    before = long_section()
    after = [read_by(c, read_long) for c in before]
    offset = compare_runs(before, after, offset_m=-0.7)
    assert offset["summary"]["matched"] <= 2 and offset["alignment"] == {"method": "offset",
                                                                         "offset_m": -0.7}
    alignment = align_on_joints(RING_JOINTS_M, read_long(RING_JOINTS_M))
    report = compare_runs(before, after, chainage_map=alignment)
    assert report["summary"] == {"before": 40, "after": 40, "matched": 40, "grown": 0,
                                 "unchanged": 40, "new": 0, "gone": 0}
    assert [(m["before"], m["after"]) for m in report["matched"]] == [([n], [n])
                                                                      for n in range(1, 41)]
    assert [m["chainage_m"] for m in report["matched"]] == pytest.approx(
        [c["chainage_m"] for c in before], abs=0.001)  # tunnel coordinates: the earlier run's
    assert report["alignment"]["method"] == "joints"
    assert report["alignment"]["joints_matched"] == 112
    assert report["alignment"]["scale"] == pytest.approx(1 / 1.02, abs=1e-6)
    assert report["parameters"]["offset_m"] is None
    json.dumps(report, allow_nan=False)
    with pytest.raises(ValueError, match="not both"):
        compare_runs(before, after, offset_m=0.7, chainage_map=alignment)


def test_a_crack_farther_than_the_tolerance_is_no_match():
    before = [physical(1, [(100.0, 1000.0), (100.3, 1000.0)])]
    after = [physical(1, [(100.0, 1200.0), (100.3, 1200.0)])]  # 200 mm round the ring
    report = compare_runs(before, after)
    assert report["summary"]["matched"] == 0
    assert (report["summary"]["new"], report["summary"]["gone"]) == (1, 1)
    assert compare_runs(before, after, tolerance_mm=250)["summary"]["matched"] == 1
    near = [physical(1, [(100.0, 1040.0), (100.3, 1040.0)])]  # 40 mm: within the default 50
    assert compare_runs(before, near)["summary"]["matched"] == 1


def test_two_cracks_that_grew_together_are_both_matched_to_the_joined_one():
    before = [physical(1, [(100.0, 1000.0), (100.2, 1000.0)]),
              physical(2, [(100.4, 1000.0), (100.6, 1000.0)], width=0.5)]
    after = [physical(1, [(100.0, 1000.0), (100.6, 1000.0)], width=0.5)]
    report = compare_runs(before, after)
    [joined] = report["matched"]
    assert (joined["before"], joined["after"]) == ([1, 2], [1])
    assert joined["length_before_mm"] == pytest.approx(400)
    assert joined["length_growth_mm"] == pytest.approx(200) and joined["grown"]
    assert joined["width_growth_mm"] == 0
    assert report["new"] == report["gone"] == []
    assert change_rows(report)[0]["before"] == "1+2"
    # ... and the other way round: one crack the later run saw as two pieces
    split = compare_runs(after, before)
    assert [(m["before"], m["after"]) for m in split["matched"]] == [([1], [1, 2])]
    assert not split["matched"][0]["grown"]


def test_a_repaired_crack_beside_a_hairline_one_is_gone_not_joined():
    long = physical(1, [(100.0, 1000.0), (100.5, 1000.0)], width=1.0)
    hairline = physical(2, [(100.2, 1020.0), (100.23, 1020.0)], width=0.1)
    report = compare_runs([long, hairline], [{**hairline, "number": 1}])
    assert [(m["before"], m["after"]) for m in report["matched"]] == [([2], [1])]
    assert [c["number"] for c in report["gone"]] == [1]


def test_parallel_cracks_match_their_own_counterparts():
    before = [physical(1, [(100.0, 1000.0), (100.3, 1000.0)]),
              physical(2, [(100.0, 1030.0), (100.3, 1030.0)])]
    after = [physical(1, [(100.0, 1002.0), (100.3, 1002.0)]),
             physical(2, [(100.0, 1031.0), (100.3, 1031.0)], width=0.6)]
    report = compare_runs(before, after)
    assert [(m["before"], m["after"], m["grown"]) for m in report["matched"]] == [
        ([1], [1], False), ([2], [2], True)]


def test_empty_runs_and_bad_parameters():
    assert compare_runs([], [])["summary"]["matched"] == 0
    assert compare_runs(tunnel(), [])["summary"]["gone"] == 4
    assert compare_runs([], tunnel())["summary"]["new"] == 4
    for kwargs in ({"tolerance_mm": 0}, {"tolerance_mm": float("nan")}, {"offset_m": float("inf")},
                   {"grow_width_mm": -1}, {"min_share": 0}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            compare_runs(tunnel(), tunnel(), **kwargs)


# --- through the database and the command --------------------------------------------------------

def record(index: int, start_m: float, end_m: float, arc_mm: float, width: float,
           length_mm: float | None = None) -> CrackRecord:
    """A straight detection from (start_m, arc_mm) to (end_m, arc_mm + 5)."""
    length = length_mm or float(np.hypot((end_m - start_m) * 1000, 5.0))
    middle = (start_m + end_m) / 2
    return CrackRecord(
        index=index, length_px=length / 0.5, length_mm=length,
        width_mean_mm=round(width * 0.6, 4), width_max_mm=width, width_p95_mm=width * 0.9,
        width_max_px=width / 0.5, orientation_deg=1.0, type="longitudinal",
        severity=SEVERITY.classify(width), area_px=int(length * 4), area_mm2=length * width,
        bbox_px=(10, 20, 200, 12), chainage_m=middle, chainage_start_m=start_m,
        chainage_end_m=end_m, arc_mm=arc_mm + 2.5, score_mean=0.8,
        polyline_px=((10.0, 25.0), (210.0, 26.0)),
        polyline=((start_m, arc_mm), (middle, arc_mm + 2.5), (end_m, arc_mm + 5.0)))


def store_run(url: str, run_id: str, started_at: float, frames: list[tuple[CrackRecord, ...]]
              ) -> None:
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            store.start_run(session, run_start_message(run_id, started_at))
            store.store_results(session, [result_message(run_id, seq, cracks,
                                                         chainage_m=100.0 + seq * 0.1)
                                          for seq, cracks in enumerate(frames)])
            store.merge_run(session, run_id)
    finally:
        engine.dispose()


def store_inspections(url: str) -> None:
    """The earlier inspection: a crack seen across two frames at 100 m, a fine one at 102 m and
    a wide one at 104 m. A year later: the first grew to 300 mm across three frames, the second
    is wider, the third is no longer seen (repaired) and a new one opened at 106 m."""
    store_run(url, EARLIER, T0, [
        (record(0, 99.95, 100.05, 1500.0, 0.3),),
        (record(0, 100.0, 100.10, 1502.5, 0.3), record(1, 102.0, 102.1, 800.0, 0.2)),
        (record(0, 104.0, 104.1, 2000.0, 1.5),),
    ])
    store_run(url, LATER, T0 + 365 * 86400, [
        (record(0, 99.95, 100.05, 1500.0, 0.3),),
        (record(0, 100.0, 100.10, 1502.5, 0.3), record(1, 102.0, 102.1, 800.0, 0.5)),
        (record(0, 100.05, 100.25, 1505.0, 0.35),),
        (record(0, 106.0, 106.1, 1000.0, 0.2),),
    ])


def test_compare_two_stored_inspections(db_url):
    store_inspections(db_url)
    report = json.loads(crackscan("compare", EARLIER, LATER, "--db", db_url, "--format",
                                  "json").stdout)
    assert report["before_run"] == EARLIER and report["after_run"] == LATER
    assert report["summary"] == {"before": 3, "after": 3, "matched": 2, "grown": 2,
                                 "unchanged": 0, "new": 1, "gone": 1}
    longer, wider = report["matched"]
    assert (longer["before"], longer["after"]) == ([1], [1])
    assert longer["length_before_mm"] == pytest.approx(150, abs=10)
    assert longer["length_after_mm"] == pytest.approx(300, abs=15)
    assert longer["width_growth_mm"] == pytest.approx(0.05)
    assert (wider["before"], wider["after"]) == ([2], [2])
    assert wider["width_growth_mm"] == pytest.approx(0.3) and wider["length_growth_mm"] == 0
    assert [c["number"] for c in report["gone"]] == [3] and report["gone"][0]["chainage_m"] \
        == pytest.approx(104.05)
    assert [c["number"] for c in report["new"]] == [3] and report["new"][0]["chainage_m"] \
        == pytest.approx(106.05)


def test_compare_table_csv_and_one_line_errors(tmp_path):
    db = f"sqlite:///{tmp_path / 'cracks.db'}"
    store_inspections(db)
    table, csv_lines = (done.stdout for done in crackscan_concurrently(
        ("compare", EARLIER, LATER, "--db", db),
        ("compare", EARLIER, LATER, "--db", db, "--format", "csv")))
    missing, bad = crackscan_concurrently(
        ("compare", EARLIER, "no-such-run", "--db", db),
        ("compare", EARLIER, LATER, "--db", db, "--tolerance-mm", "0"), check=False)
    assert "2 matched (2 grown), 1 new, 1 gone" in table
    assert [line.split()[0] for line in table.splitlines()[1:]] == ["change", "grown", "grown",
                                                                    "gone", "new"]
    csv_lines = csv_lines.splitlines()
    assert csv_lines[0] == ",".join(CHANGE_COLUMNS) and len(csv_lines) == 5
    assert csv_lines[1].startswith("grown,1,1,")

    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "no-such-run" in missing.stderr and len(missing.stderr.strip().splitlines()) == 1
    assert bad.returncode == 2 and "--tolerance-mm must be" in bad.stderr


# --- two synthetic drives where cracks grew -------------------------------------------------------

def later_drive(cracks: list[dict], run_id: str, offset_m: float, grow: set[int]
                ) -> ResultMessage:
    """A later drive of the tunnel of the physical cracks ``cracks``, on an odometer reading
    ``offset_m`` less: the cracks numbered in ``grow`` are 100 mm longer past their last point
    and 0.2 mm wider, the others unchanged. All in one frame, so that merging joins none."""
    records = []
    for index, crack in enumerate(cracks):
        line = np.asarray(crack["polyline"], float)
        length, width = crack["length_mm"], crack["width_max_mm"]
        if crack["number"] in grow:
            direction = (line[-1] - line[-2]) * [1000, 1]  # mm
            line = np.vstack([line, line[-1] + direction / np.hypot(*direction) * 100 / [1000, 1]])
            length, width = length + 100.0, width + 0.2
        line[:, 0] -= offset_m
        records.append(CrackRecord(
            index=index, length_px=length, length_mm=length, width_mean_mm=width * 0.6,
            width_max_mm=width, width_p95_mm=width * 0.9, width_max_px=width,
            orientation_deg=crack["orientation_deg"], type=crack["type"],
            severity=SEVERITY.classify(width), area_px=10, area_mm2=length * width,
            bbox_px=(0, 0, 8, 8), chainage_m=float(line[:, 0].mean()),
            chainage_start_m=float(line[:, 0].min()), chainage_end_m=float(line[:, 0].max()),
            arc_mm=crack["arc_mm"], score_mean=0.8, polyline_px=((0.0, 0.0), (7.0, 7.0)),
            polyline=tuple((float(c), float(a)) for c, a in line)))
    return ResultMessage(run_id=run_id, camera_id="cam0", seq=0, capture_time=T0,
                         chainage_m=0.0, inference_ms=10.0, model="m@1", worker="w",
                         mask=np.zeros((8, 8), np.uint8), cracks=tuple(records))


@pytest.mark.slow
def test_two_synthetic_drives_where_cracks_grew(tmp_path):
    """The real pipeline on a short synthetic drive, then a later drive of it built from the
    stored physical cracks on an odometer 0.25 m short: the longest crack was repaired, every
    other one of the rest grew, the others stayed, and a new crack opened. ``compare`` finds
    exactly that."""
    video, db = tmp_path / "drive.mp4", f"sqlite:///{tmp_path / 'cracks.db'}"
    crackscan("synth", "--out", str(video), "--seconds", "0.5", "--seed", "8")
    # the binary model: half a second of drive holds no true crack, but the joints and stains
    # that model stores as cracks are cracks enough to compare
    first = json.loads(crackscan("run", "--source", str(video), "--db", db, "--model",
                                 BINARY_MODEL, "--format", "json").stdout)["id"]
    engine = make_engine(db)
    try:
        with session_factory(engine).begin() as session:
            cracks = store.query_physical(session, run=first)
            repaired = max(cracks, key=lambda c: c["length_mm"])
            kept = [c for c in cracks if c is not repaired]
            assert len(kept) >= 2, "the synthetic drive gave too few cracks to compare"
            grow = {c["number"] for c in kept[::2]}
            opened = physical(0, [(0.5, 1500.0), (0.6, 1520.0)], width=0.2)
            store.start_run(session, run_start_message(LATER, T0 + 365 * 86400))
            store.store_results(session, [later_drive(kept + [opened], LATER, 0.25, grow)])
            store.merge_run(session, LATER)
    finally:
        engine.dispose()
    report = json.loads(crackscan("compare", first, LATER, "--db", db, "--offset-m", "0.25",
                                  "--format", "json").stdout)
    assert [c["number"] for c in report["gone"]] == [repaired["number"]]
    assert [(c["chainage_m"], c["arc_mm"]) for c in report["new"]] == [
        pytest.approx((0.55, 1510.0))]
    assert all(len(m["before"]) == len(m["after"]) == 1 for m in report["matched"])
    assert sorted(m["before"][0] for m in report["matched"]) == sorted(c["number"] for c in kept)
    for match in report["matched"]:
        growing = match["before"][0] in grow
        assert match["grown"] == growing, match
        assert match["length_growth_mm"] == pytest.approx(100.0 if growing else 0.0)
        assert match["width_growth_mm"] == pytest.approx(0.2 if growing else 0.0)
    assert report["summary"]["grown"] == len(grow)


# --- aligned on the ring joints stored with the runs ---------------------------------------------

LATEST = "20281121-100000-cccc"


def joint_record(index: int, chainage_m: float) -> FeatureRecord:
    """A ring joint as a multi-class model reports it in one frame: a 20 mm band round the ring."""
    return FeatureRecord(index=index, kind="joint", area_px=4000, area_mm2=180_000.0,
                         bbox_px=(0, 0, 10, 400), chainage_m=chainage_m,
                         chainage_start_m=chainage_m - 0.01, chainage_end_m=chainage_m + 0.01,
                         arc_mm=4500.0, arc_start_mm=0.0, arc_end_mm=9000.0, length_mm=9000.0,
                         orientation_deg=90.0)


def store_drive(url: str, run_id: str, started_at: float, cracks: list[dict],
                joints_m: np.ndarray) -> None:
    """A run of the physical cracks ``cracks`` (one frame, as :func:`later_drive`) with a ring
    joint at each of ``joints_m``."""
    frame = dataclasses.replace(later_drive(cracks, run_id, 0.0, set()),
                                features=tuple(joint_record(i, float(c))
                                               for i, c in enumerate(joints_m)))
    engine = make_engine(url)
    try:
        with session_factory(engine).begin() as session:
            store.start_run(session, run_start_message(run_id, started_at))
            store.store_results(session, [frame])
            store.merge_run(session, run_id)
    finally:
        engine.dispose()


def test_compare_aligns_on_the_stored_ring_joints(db_url):
    """Two runs with their ring joints stored: by default ``compare`` aligns on them (every
    crack matched, the summary says so); ``--align offset`` does not; a run without joints falls
    back to --offset-m by default and is exit 2 with ``--align joints``."""
    db = db_url
    before = long_section()
    store_drive(db, EARLIER, T0, before, RING_JOINTS_M)
    store_drive(db, LATER, T0 + 365 * 86400, [read_by(c, read_long) for c in before],
                read_long(RING_JOINTS_M))
    store_drive(db, LATEST, T0 + 730 * 86400, before, np.array([]))
    joints, offset, table, fallback, refused = crackscan_concurrently(
        ("compare", EARLIER, LATER, "--db", db, "--format", "json"),
        ("compare", EARLIER, LATER, "--db", db, "--align", "offset", "--offset-m", "-0.7",
         "--format", "json"),
        ("compare", EARLIER, LATER, "--db", db),
        ("compare", EARLIER, LATEST, "--db", db, "--format", "json"),
        ("compare", EARLIER, LATEST, "--db", db, "--align", "joints"), check=False)
    report = json.loads(joints.stdout)
    assert report["summary"]["matched"] == 40 and report["summary"]["new"] == 0
    assert report["alignment"]["method"] == "joints"
    assert report["alignment"]["joints_matched"] == 112
    assert json.loads(offset.stdout)["summary"]["matched"] <= 2
    assert json.loads(offset.stdout)["alignment"] == {"method": "offset", "offset_m": -0.7}
    assert "40 matched (0 grown), 0 new, 0 gone (tolerance 50 mm, aligned on 112 ring joints, " \
        "scale 0.9804" in table.stdout
    assert json.loads(fallback.stdout)["alignment"] == {"method": "offset", "offset_m": 0.0}
    assert "ring joints stored: 112 of" in fallback.stderr and "0 of" in fallback.stderr
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "112 in 20261121" in refused.stderr and "0 in 20281121" in refused.stderr
    assert "--offset-m" in refused.stderr
