"""Physical cracks: per-frame detections merged in tunnel coordinates (``management.merge``), stored
by ``store.merge_run`` on SQLite and Postgres, and scored against a truth (``management.truth``).

The synthetic frames here are windows of a known crack polyline in (chainage, arc): each frame's
detection is the part of the polyline its window shows, measured as inference would report it
(length = that part's length), so the merged length has an exact answer."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sqlalchemy import Engine

from crackscan.config import SeverityConfig
from crackscan.wire import CrackRecord, ResultMessage, RunStartMessage
from management import store
from management.db import session_factory
from management.merge import merge
from management.truth import score_against_truth

SEVERITY = SeverityConfig()
T0 = 1_795_000_000.0


def crack_line(start_m: float, length_mm: float, angle_deg: float = 0.0, arc_mm: float = 1500.0,
               wiggle_mm: float = 0.0, step_mm: float = 3.0) -> np.ndarray:
    """Nx2 (chainage m, arc mm): a straight (or gently waving) crack."""
    s = np.arange(0.0, length_mm + step_mm / 2, step_mm)
    along = s * math.cos(math.radians(angle_deg))
    across = s * math.sin(math.radians(angle_deg)) + wiggle_mm * np.sin(s / 40.0)
    return np.stack([start_m + along / 1000.0, arc_mm + across], axis=1)


def length_of(line: np.ndarray) -> float:
    mm = np.stack([line[:, 0] * 1000.0, line[:, 1]], axis=1)
    return float(np.hypot(*np.diff(mm, axis=0).T).sum())


def detection(line: np.ndarray, camera: str = "cam0", seq: int = 0, index: int = 0,
              width_max_mm: float = 2.0, width_mean_mm: float = 1.5) -> dict:
    """A per-frame record as ``store.query_cracks`` returns it (the fields merging reads)."""
    return {
        "run": "r", "camera": camera, "seq": seq, "index": index,
        "chainage_m": float(line[:, 0].mean()), "arc_mm": float(line[:, 1].mean()),
        "chainage_start_m": float(line[:, 0].min()), "chainage_end_m": float(line[:, 0].max()),
        "length_mm": length_of(line), "width_mean_mm": width_mean_mm,
        "width_max_mm": width_max_mm, "width_p95_mm": width_max_mm * 0.9,
        "orientation_deg": 0.0, "type": "longitudinal",
        "severity": SEVERITY.classify(width_max_mm),
        "polyline": [[float(c), float(a)] for c, a in line],
    }


def frames_of(line: np.ndarray, window_m: float, step_m: float, camera: str = "cam0",
              first_seq: int = 0) -> list[dict]:
    """The detections of ``line`` in frames ``window_m`` long, one every ``step_m``."""
    start, end = line[:, 0].min(), line[:, 0].max()
    out = []
    left, seq = start - window_m + step_m / 2, first_seq
    while left < end:
        inside = line[(line[:, 0] >= left) & (line[:, 0] <= left + window_m)]
        if len(inside) >= 2:
            out.append(detection(inside, camera=camera, seq=seq))
        left += step_m
        seq += 1
    return out


def test_a_crack_longer_than_a_frame_is_merged_whole_with_its_length():
    line = crack_line(100.0, 600.0, angle_deg=8.0, wiggle_mm=6.0)
    parts = frames_of(line, window_m=0.32, step_m=0.1)
    assert len(parts) >= 8 and max(p["length_mm"] for p in parts) < 350
    cracks = merge(parts)
    assert len(cracks) == 1
    crack = cracks[0]
    assert crack.detections == len(parts) and crack.frames == len(parts)
    assert crack.length_mm == pytest.approx(length_of(line), rel=0.03)
    assert crack.chainage_start_m == pytest.approx(line[:, 0].min())
    assert crack.chainage_end_m == pytest.approx(line[:, 0].max())
    assert crack.type == "longitudinal" and crack.orientation_deg == pytest.approx(8.0, abs=3.0)
    assert length_of(np.array(crack.polyline)) == pytest.approx(length_of(line), rel=0.05)


def test_widths_are_the_largest_and_the_length_weighted_mean():
    line = crack_line(10.0, 300.0)
    a, b = detection(line[:60], seq=0), detection(line[40:], seq=1)
    a.update(width_max_mm=3.2, width_mean_mm=2.0, severity=SEVERITY.classify(3.2))
    b.update(width_max_mm=1.1, width_mean_mm=1.0)
    (crack,) = merge([a, b])
    assert crack.width_max_mm == 3.2 and crack.severity == SEVERITY.classify(3.2) == "wide"
    expected = (2.0 * a["length_mm"] + 1.0 * b["length_mm"]) / (a["length_mm"] + b["length_mm"])
    assert crack.width_mean_mm == pytest.approx(expected, abs=1e-4)


def test_cracks_further_apart_than_the_link_distance_stay_apart():
    near = crack_line(50.0, 200.0, arc_mm=1000.0)
    far = crack_line(50.0, 200.0, arc_mm=1030.0)  # a parallel crack 30 mm round the ring
    parts = frames_of(near, 0.32, 0.1) + frames_of(far, 0.32, 0.1, first_seq=0)
    assert len(merge(parts, link_mm=10.0)) == 2
    assert len(merge(parts, link_mm=40.0)) == 1  # the distance is the user's to choose


def test_two_detections_of_one_frame_join_only_through_another_frame():
    line = crack_line(20.0, 200.0)
    left, right = line[:30], line[33:]  # a 9 mm gap inside one frame: inference split them
    split = [detection(left, seq=5, index=0), detection(right, seq=5, index=1)]
    assert len(merge(split)) == 2
    whole = detection(line, seq=6)  # the next frame sees it whole
    assert len(merge([*split, whole])) == 1


def test_adjacent_cameras_seeing_one_crack_give_one_physical_crack():
    line = crack_line(30.0, 400.0, angle_deg=90.0, arc_mm=800.0)  # round the ring
    top = detection(line[line[:, 1] <= 1050.0], camera="cam0", seq=3)
    bottom = detection(line[line[:, 1] >= 1000.0], camera="cam1", seq=3)  # 50 mm overlap
    (crack,) = merge([top, bottom])
    assert crack.cameras == ["cam0", "cam1"] and crack.frames == 2
    assert crack.type == "circumferential"
    assert crack.length_mm == pytest.approx(length_of(line), rel=0.03)
    assert (crack.arc_start_mm, crack.arc_end_mm) == pytest.approx(
        (line[:, 1].min(), line[:, 1].max()), abs=0.01)


def test_a_single_detection_keeps_its_own_measures():
    record = detection(crack_line(5.0, 120.0, angle_deg=40.0))
    record.update(type="diagonal", orientation_deg=40.0)
    (crack,) = merge([record])
    assert (crack.length_mm, crack.type, crack.orientation_deg) == (
        record["length_mm"], "diagonal", 40.0)
    assert crack.polyline == record["polyline"]


def test_merging_is_deterministic_and_ordered_by_chainage():
    parts = (frames_of(crack_line(70.0, 300.0), 0.32, 0.1)
             + frames_of(crack_line(60.0, 300.0, arc_mm=500.0), 0.32, 0.1, first_seq=100))
    first, second = merge(parts), merge(list(reversed(parts)))
    assert [c.chainage_start_m for c in first] == sorted(c.chainage_start_m for c in first)
    assert [(c.length_mm, c.detections) for c in first] == [
        (c.length_mm, c.detections) for c in second]
    assert merge([]) == []
    with pytest.raises(ValueError, match="> 0"):
        merge(parts, link_mm=0)


def test_truth_scoring_counts_duplicates_and_errors():
    line = crack_line(10.0, 200.0)
    truth = [{"id": 0, "type": "longitudinal", "length_mm": length_of(line), "width_mm": 1.5,
              "polyline": line.tolist()}]
    (whole,) = merge(frames_of(line, 0.32, 0.1))
    score = score_against_truth(truth, [whole.to_dict()])
    assert (score["found"], score["physical_per_found_crack"]) == (1, 1.0)
    assert abs(score["median_length_error"]) < 0.03 and score["median_width_error"] == 0.0
    halves = [detection(line[:30], seq=1).copy(), detection(line[36:], seq=9)]
    halves[0]["number"] = 1
    score = score_against_truth(truth, halves + [detection(crack_line(40.0, 100.0), seq=50)])
    assert (score["found"], score["physical_per_found_crack"]) == (1, 2.0)
    assert score["other_physical_cracks"] == 1
    assert score_against_truth(truth, [])["found"] == 0


# --- stored: merge_run and query_physical on SQLite and Postgres ---------------------------------

def record_of(part: dict, index: int = 0) -> CrackRecord:
    line = np.array(part["polyline"])
    return CrackRecord(
        index=index, length_px=part["length_mm"] * 2, length_mm=round(part["length_mm"], 3),
        width_mean_mm=part["width_mean_mm"], width_max_mm=part["width_max_mm"],
        width_p95_mm=part["width_p95_mm"], width_max_px=part["width_max_mm"] * 2,
        orientation_deg=0.0, type="longitudinal", severity=part["severity"], area_px=100,
        area_mm2=25.0, bbox_px=(4, 2, 20, 6), chainage_m=round(part["chainage_m"], 4),
        chainage_start_m=round(part["chainage_start_m"], 4),
        chainage_end_m=round(part["chainage_end_m"], 4), arc_mm=round(part["arc_mm"], 2),
        score_mean=0.9, polyline_px=((4.0, 4.0), (23.0, 5.0)),
        polyline=tuple((round(c, 4), round(a, 2)) for c, a in line))


def store_drive(engine: Engine, run_id: str, parts: list[dict]) -> None:
    mask = np.zeros((16, 32), np.uint8)
    mask[4:6, 4:24] = 255
    by_frame: dict[tuple[str, int], list[dict]] = {}
    for part in parts:
        by_frame.setdefault((part["camera"], part["seq"]), []).append(part)
    results = [ResultMessage(run_id=run_id, camera_id=camera, seq=seq, capture_time=T0 + seq,
                             chainage_m=group[0]["chainage_m"], inference_ms=10.0, model="m@1",
                             worker="w", mask=mask,
                             cracks=tuple(record_of(p, i) for i, p in enumerate(group)))
               for (camera, seq), group in sorted(by_frame.items())]
    with session_factory(engine).begin() as session:
        store.start_run(session, RunStartMessage(run_id=run_id, source="drive", mode="replay",
                                                 started_at=T0, cameras=("cam0",), config={}))
        store.store_results(session, results)


def test_merge_run_stores_physical_cracks_and_links_detections(engine):
    long_line, short_line = crack_line(100.0, 500.0), crack_line(103.0, 120.0, arc_mm=400.0)
    store_drive(engine, "run-1", frames_of(long_line, 0.32, 0.1)
                + frames_of(short_line, 0.32, 0.1, first_seq=40))
    sessions = session_factory(engine)
    with sessions() as session:  # not merged yet: merged in memory, nothing written
        live = store.query_physical(session, run="run-1")
        assert [c["merged"] for c in live] == [False, False]
        assert {c["physical"] for c in store.query_cracks(session, run="run-1")} == {None}
    with sessions.begin() as session:
        assert store.merge_run(session, "run-1") == 2
    with sessions() as session:
        stored = store.query_physical(session, run="run-1")
        detections = store.query_cracks(session, run="run-1")
        runs = store.list_runs(session)
    assert [c["merged"] for c in stored] == [True, True]
    strip = [{k: v for k, v in c.items() if k != "merged"} for c in stored]
    assert strip == [{k: v for k, v in c.items() if k != "merged"} for c in live]
    assert [c["number"] for c in stored] == [1, 2]
    longest = next(c for c in stored if c["detections"] > 3)
    assert longest["length_mm"] == pytest.approx(500.0, rel=0.03)
    assert sorted({d["physical"] for d in detections}) == [1, 2]
    assert runs[0]["physical_cracks"] == 2
    with sessions.begin() as session:  # merging again replaces, same answer
        assert store.merge_run(session, "run-1", link_mm=10.0) == 2
    with sessions() as session:
        again = store.query_physical(session, run="run-1")
        assert [c["length_mm"] for c in again] == [c["length_mm"] for c in stored]
        assert store.query_physical(session, run="run-1", min_length_mm=300) == [longest]
        assert store.query_physical(session, run="run-1", sort="-length_mm")[0] == longest
        assert store.query_physical(session, chainage=(103.05, 103.06)) == [
            c for c in stored if c["chainage_start_m"] <= 103.06 and c["chainage_end_m"] >= 103.05]
        crop = store.crack_mask(session, "run-1", "cam0", 0, 0)
    assert crop is not None and crop.shape == (6, 20) and crop.max() == 255
    with sessions.begin() as session, pytest.raises(LookupError, match="no run"):
        store.merge_run(session, "nope")


def test_bad_query_arguments_name_what_is_wrong(engine):
    with session_factory(engine)() as session:
        with pytest.raises(ValueError, match="cannot sort by"):
            store.query_physical(session, sort="colour")
        with pytest.raises(ValueError, match="limit"):
            store.query_physical(session, limit=-1)
        with pytest.raises(ValueError, match="after its end"):
            store.query_cracks(session, chainage=(5.0, 1.0))


def test_a_crack_seen_whole_takes_the_median_maximum_width_of_its_full_views():
    """Each full view measured the same maximum width; the largest of them is biased upwards,
    so the merged crack takes the median view (an actual detection, with its severity)."""
    line = crack_line(10.0, 300.0)
    views = [detection(line, seq=seq) for seq in range(3)]
    for view, width in zip(views, (2.6, 2.0, 2.2), strict=True):
        view.update(width_max_mm=width, width_p95_mm=width - 0.2,
                    severity=SEVERITY.classify(width))
    part = detection(line[:30], seq=3)  # a partial view at the frame's edge
    part.update(width_max_mm=3.5, severity=SEVERITY.classify(3.5))
    (crack,) = merge(views + [part])
    assert crack.width_max_mm == 2.2 and crack.severity == SEVERITY.classify(2.2)
    assert crack.width_p95_mm == 2.0


def test_linking_in_chunks_of_points_gives_the_groups_of_all_points_at_once(monkeypatch):
    """The neighbours of the resampled points are found a chunk at a time (memory): with chunks
    of 50 points the groups are those of one chunk holding every point."""
    from management import merge as merging

    parts = []
    for n, (start_m, angle) in enumerate([(100.0, 10.0), (100.9, 80.0), (102.0, 45.0),
                                          (105.0, 0.0)]):
        parts += frames_of(crack_line(start_m, 900.0, angle, 1500.0 + 300 * n, wiggle_mm=4.0),
                           window_m=0.3, step_m=0.2)
    whole = merging.link_groups(parts)
    monkeypatch.setattr(merging, "LINK_CHUNK_POINTS", 50)
    assert merging.link_groups(parts) == whole
    assert 1 < len(whole) < len(parts)
