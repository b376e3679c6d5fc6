"""Lining features (joints, stains... of a multi-class model; never cracks): the 0002 -> 0003
migration on a database with data, storing them exactly once with their frame, merging them into
physical features and ring joints, ``crackscan query --features`` through the real command, and
the report's section and map layer. Database tests run on SQLite and Postgres (``db_url``)."""

from __future__ import annotations

import dataclasses
import json
from datetime import datetime

import numpy as np
import pytest
from alembic import command
from sqlalchemy import MetaData, func, inspect, select
from sqlalchemy.orm import Session
from support import (
    Page,
    colours_in,
    crack_record,
    crackscan,
    decode_png,
    plot_area,
    result_message,
    run_start_message,
)

from crackscan.errors import EXIT_USER_ERROR
from crackscan.wire import FeatureRecord, ResultMessage
from management import schema, store
from management.db import make_engine, session_factory
from management.features import GAP_MM, merge_features, ring_joints, union_area
from management.models import Frame, LiningFeature
from management.report import FEATURE_RGB, build_report

RUN = "20261205-100000-feat"
BINARY_RUN = "20261205-110000-bnry"


def feature_record(index: int, kind: str, chainage_m: tuple[float, float],
                   arc_mm: tuple[float, float], orientation_deg: float = 90.0,
                   area_mm2: float | None = None) -> FeatureRecord:
    """A region whose box spans ``chainage_m`` (m) and ``arc_mm``; by default it fills its box."""
    (c0, c1), (a0, a1) = chainage_m, arc_mm
    extent_c, extent_a = (c1 - c0) * 1000.0, a1 - a0
    return FeatureRecord(
        index=index, kind=kind, area_px=int(extent_c * extent_a / 0.25),
        area_mm2=extent_c * extent_a if area_mm2 is None else area_mm2,
        bbox_px=(0, 0, 40, 200), chainage_m=(c0 + c1) / 2, chainage_start_m=c0,
        chainage_end_m=c1, arc_mm=(a0 + a1) / 2, arc_start_mm=a0, arc_end_mm=a1,
        length_mm=max(extent_c, extent_a), orientation_deg=orientation_deg)


def with_features(result: ResultMessage, *features: FeatureRecord) -> ResultMessage:
    return dataclasses.replace(result, features=features)


def detection(kind: str, chainage_m: tuple[float, float], arc_mm: tuple[float, float],
              camera: str = "cam0", seq: int = 0, orientation_deg: float = 90.0) -> dict:
    """A feature detection as :func:`management.store.feature_detections` returns it."""
    record = feature_record(0, kind, chainage_m, arc_mm, orientation_deg)
    return {"camera": camera, "seq": seq, **record.to_dict()}


JOINT_1 = (100.24, 100.26)  # a ring joint 20 mm wide ...
JOINT_2 = (101.74, 101.76)  # ... and the next one, a ring (1.5 m) later
CAM0_ARC, CAM1_ARC = (0.0, 3000.0), (3010.0, 6000.0)  # two cameras, 10 mm apart round the ring


def feature_run_results() -> list[ResultMessage]:
    """Run RUN: cam0 frames 0..2 at 100.0, 100.2, 100.4 m all see joint 1 (and frame 0 a crack);
    frames 0 and 1 a stain; cam1 frame 0 sees joint 1 on its arc; cam0 frames 3, 4 (101.6, 101.8
    m) see joint 2. So 8 detections (4 + 2 joints, 2 stains): joint 1, joint 2 and one stain."""
    stain = ((100.10, 100.15), (1000.0, 1200.0))
    results = [
        with_features(result_message(RUN, 0, (crack_record(0, 100.0, 0.3, 80.0),),
                                     chainage_m=100.0),
                      feature_record(0, "joint", JOINT_1, CAM0_ARC),
                      feature_record(1, "stain", *stain)),
        with_features(result_message(RUN, 1, chainage_m=100.2),
                      feature_record(0, "stain", *stain),
                      feature_record(1, "joint", JOINT_1, CAM0_ARC)),
        with_features(result_message(RUN, 2, chainage_m=100.4),
                      feature_record(0, "joint", JOINT_1, CAM0_ARC)),
        with_features(result_message(RUN, 0, camera="cam1", chainage_m=100.0),
                      feature_record(0, "joint", JOINT_1, CAM1_ARC)),
        with_features(result_message(RUN, 3, chainage_m=101.6),
                      feature_record(0, "joint", JOINT_2, CAM0_ARC)),
        with_features(result_message(RUN, 4, chainage_m=101.8),
                      feature_record(0, "joint", JOINT_2, CAM0_ARC)),
    ]
    return results


def store_feature_run(session: Session) -> None:
    store.start_run(session, run_start_message(RUN, cameras=("cam0", "cam1")))
    store.store_results(session, feature_run_results())
    store.start_run(session, run_start_message(BINARY_RUN))  # a binary model's: no features
    store.store_results(session, [result_message(BINARY_RUN, 0, (
        crack_record(0, 100.0, 0.3, 80.0),))])
    session.commit()


# --- migration -----------------------------------------------------------------------------------

def test_crackscan_db_upgrade_takes_a_0002_database_with_data_to_head(db_url):
    raw = make_engine(db_url, check_schema=False)
    try:
        with raw.begin() as connection:
            command.upgrade(schema.alembic_config(connection), "0002")
            tables = MetaData()
            tables.reflect(connection)
            connection.execute(tables.tables["runs"].insert(), {
                "id": RUN, "source": "old.mp4", "mode": "replay", "status": "complete",
                "started_at": datetime(2026, 11, 1, 12), "config": {}, "cameras": ["cam0"],
                "cameras_ended": {}, "frames_read": 1, "frames_sent": 1, "frames_dropped": 0,
                "frames_bad": 0, "frames_duplicate": 0, "frames_malformed": 0,
                "database_retries": 0})
            frame_id = connection.execute(tables.tables["frames"].insert().values(
                run_id=RUN, camera_id="cam0", seq=0, capture_time=datetime(2026, 11, 1),
                chainage_m=10.0, width=640, height=360, inference_ms=50.0, worker="w",
                crack_count=1, stored_at=datetime(2026, 11, 1))).inserted_primary_key[0]
            record = crack_record(0, 10.0, 0.3, 80.0).to_dict()
            connection.execute(tables.tables["cracks"].insert(), {
                **record, "frame_id": frame_id, "run_id": RUN, "camera_id": "cam0", "seq": 0})
        assert schema.current_revision(raw) == "0002"
    finally:
        raw.dispose()

    upgraded = crackscan("db", "upgrade", "--db", db_url)
    assert upgraded.stdout.endswith(f": schema {schema.HEAD} (was 0002)\n")
    engine = make_engine(db_url)  # at HEAD now: opens without a complaint
    try:
        indexes = {index["name"]: index["column_names"]
                   for index in inspect(engine).get_indexes("lining_features")}
        assert indexes["ix_features_run_chainage"] == ["run_id", "chainage_start_m"]
        assert indexes["ix_features_run_kind"] == ["run_id", "kind"]
        with session_factory(engine)() as session:
            assert [d["width_max_mm"] for d in store.query_cracks(session, run=RUN)] == [0.3]
            assert store.query_features(session) == []
            store.store_results(session, [with_features(
                result_message(RUN, 1, chainage_m=11.0),
                feature_record(0, "joint", (11.0, 11.02), CAM0_ARC))])
            session.commit()
            assert [f["kind"] for f in store.query_features(session, run=RUN)] == ["joint"]
    finally:
        engine.dispose()


# --- storing -------------------------------------------------------------------------------------

def test_features_are_stored_with_their_frame_exactly_once(session):
    store_feature_run(session)
    count = select(func.count(LiningFeature.id))
    assert session.scalar(count) == 8
    stored, duplicates = store.store_results(session, feature_run_results()[:2])
    session.commit()
    assert (stored, duplicates) == (0, 2)
    assert session.scalar(count) == 8  # nothing twice

    detections = store.feature_detections(session, RUN)
    first = next(d for d in detections if (d["camera"], d["seq"], d["index"]) == ("cam0", 0, 0))
    expected = feature_record(0, "joint", JOINT_1, CAM0_ARC).to_dict()
    assert {key: first[key] for key in expected} == expected
    assert [d["kind"] for d in store.feature_detections(session, RUN, kind="stain")] == [
        "stain", "stain"]

    # features are not cracks: the frames' crack counts and the run's cracks are the cracks
    runs = {run["id"]: run for run in store.list_runs(session)}
    assert (runs[RUN]["cracks"], runs[BINARY_RUN]["cracks"]) == (1, 1)
    assert session.scalar(select(func.sum(Frame.crack_count)).where(Frame.run_id == RUN)) == 1
    assert len(store.query_physical(session, run=RUN)) == 1
    assert store.feature_detections(session, BINARY_RUN) == []


# --- physical features ---------------------------------------------------------------------------

def test_a_ring_joint_seen_in_three_overlapping_frames_is_one_feature():
    frames = [detection("joint", JOINT_1, CAM0_ARC, seq=seq) for seq in range(3)]
    [joint] = merge_features(frames)
    assert (joint.kind, joint.detections, joint.frames, joint.cameras) == ("joint", 3, 3,
                                                                           ("cam0",))
    assert (joint.chainage_start_m, joint.chainage_end_m) == JOINT_1
    assert joint.chainage_m == pytest.approx(100.25)
    assert (joint.arc_start_mm, joint.arc_end_mm) == CAM0_ARC
    # the same 20 x 3000 mm seen three times is its area once, not three times
    assert joint.area_mm2 == pytest.approx(60_000.0)
    assert joint.length_mm == pytest.approx(3000.0)


def test_two_joints_a_ring_apart_are_two_features_and_kinds_never_merge():
    detections = [detection("joint", JOINT_1, CAM0_ARC, seq=0),
                  detection("joint", JOINT_2, CAM0_ARC, seq=1),
                  detection("stain", JOINT_1, CAM0_ARC, seq=0)]  # same box, another kind
    merged = merge_features(detections)
    assert [(f.kind, f.chainage_m) for f in merged] == [
        ("joint", pytest.approx(100.25)), ("stain", pytest.approx(100.25)),
        ("joint", pytest.approx(101.75))]
    assert sorted(len(f.members) for f in merged) == [1, 1, 1]


def test_boxes_within_the_gap_merge_and_farther_ones_do_not():
    stain = detection("stain", (10.0, 10.1), (500.0, 600.0))
    near = detection("stain", (10.1 + (GAP_MM - 10) / 1000, 10.3), (500.0, 600.0), seq=1)
    far = detection("stain", (10.0, 10.1), (600.0 + GAP_MM + 10, 800.0), seq=1)
    assert len(merge_features([stain, near])) == 1
    assert len(merge_features([stain, far])) == 2
    # disjoint views add up; a lone view keeps its area exactly
    assert union_area([stain, far]) == pytest.approx(stain["area_mm2"] + far["area_mm2"])
    assert union_area([near]) == near["area_mm2"]


def test_one_joint_seen_by_two_cameras_is_one_feature_on_both():
    [joint] = merge_features([detection("joint", JOINT_1, CAM0_ARC, "cam0"),
                              detection("joint", JOINT_1, CAM1_ARC, "cam1")])
    assert joint.cameras == ("cam0", "cam1") and joint.frames == 2
    assert (joint.arc_start_mm, joint.arc_end_mm) == (0.0, 6000.0)


def test_ring_joints_one_chainage_per_joint_round_the_ring_only():
    features = merge_features([
        detection("joint", JOINT_1, CAM0_ARC, "cam0"),
        # the same joint on another camera, too far round the ring to merge as a feature
        detection("joint", (100.25, 100.27), (3500.0, 6000.0), "cam1"),
        detection("joint", JOINT_2, CAM0_ARC, "cam0", seq=5),
        # a joint along the tunnel (between segments of one ring) and a stain: not ring joints
        detection("joint", (100.4, 101.6), (2990.0, 3010.0), orientation_deg=0.0),
        detection("stain", (102.0, 102.02), CAM0_ARC),
        # a wide, short blob of joint with an unreliable axis: its extent says round the ring
        detection("joint", (103.24, 103.30), (0.0, 600.0), orientation_deg=10.0),
    ])
    assert len([f for f in features if f.kind == "joint"]) == 5
    joints = ring_joints(features)
    assert joints == [pytest.approx(100.255), pytest.approx(101.75), pytest.approx(103.27)]
    assert ring_joints([f.to_dict() for f in features]) == joints  # dicts as query gives them
    assert ring_joints([]) == []


# --- crackscan query --features ------------------------------------------------------------------

def test_query_features_through_the_command(db_url, engine):
    with session_factory(engine)() as session:
        store_feature_run(session)

    done = crackscan("query", "--features", "--db", db_url, "--format", "json")
    records = json.loads(done.stdout)
    assert [(r["run"], r["number"], r["kind"], r["detections"], r["cameras"])
            for r in records] == [(RUN, 1, "stain", 2, ["cam0"]),
                                  (RUN, 2, "joint", 4, ["cam0", "cam1"]),
                                  (RUN, 3, "joint", 2, ["cam0"])]
    joint = records[1]
    assert (joint["chainage_start_m"], joint["chainage_end_m"]) == JOINT_1
    assert (joint["arc_start_mm"], joint["arc_end_mm"]) == (0.0, 6000.0)
    assert joint["area_mm2"] == pytest.approx(20 * 3000 + 20 * 2990)

    # --kind and --chainage filter; numbers stay those of the whole run
    done = crackscan("query", "--features", "--kind", "joint", "--chainage", "101:102",
                     "--run", RUN, "--db", db_url, "--format", "json")
    assert [(r["number"], r["kind"]) for r in json.loads(done.stdout)] == [(3, "joint")]
    table = crackscan("query", "--features", "--db", db_url).stdout.strip().splitlines()
    assert table[0].split()[:3] == ["run", "kind", "number"] and len(table) == 4
    assert "width_max_mm" not in table[0]

    for args, says in [(("--min-width-mm", "0"), "--features cannot be combined with "
                                                 "--min-width-mm"),
                       (("--detections", "--type", "network"), "--detections, --type"),
                       (("--sort", "width_max_mm"), "sort by one of chainage_m, length_mm"),
                       (("--kind", ""), "bad feature kind")]:
        bad = crackscan("query", "--features", *args, "--db", db_url, check=False)
        assert bad.returncode == EXIT_USER_ERROR and bad.stdout == ""
        [line] = bad.stderr.strip().splitlines()
        assert says in line, line
    bad = crackscan("query", "--kind", "joint", "--db", db_url, check=False)
    assert bad.returncode == EXIT_USER_ERROR
    assert bad.stderr.strip() == "crackscan: error: --kind filters lining features: add --features"


def test_features_as_geojson_are_polygons_of_their_extent(session):
    from management.formats import render

    store_feature_run(session)
    collection = json.loads(render(store.query_features(session, kind="stain"), "geojson"))
    [feature] = collection["features"]
    assert feature["geometry"] == {"type": "Polygon", "coordinates": [[
        [100.1, 1000.0], [100.15, 1000.0], [100.15, 1200.0], [100.1, 1200.0], [100.1, 1000.0]]]}
    assert feature["properties"]["kind"] == "stain"


# --- the report ----------------------------------------------------------------------------------

def test_report_lists_features_apart_from_cracks(session, tmp_path):
    store_feature_run(session)
    out = tmp_path / "report.html"
    summary = build_report(session, RUN, out)
    assert (summary["cracks"], summary["detections"]) == (1, 1)  # features are no cracks
    page = Page(out.read_text(encoding="utf-8"))
    facts = page.facts()
    assert (facts["physical cracks"], facts["detections"]) == ("1", "1")
    assert facts["lining features"] == "joint 2, stain 1"
    assert page.tables["sections"][-1][:2] == ["all", "1"]

    header, *kinds = page.tables["feature-kinds"]
    assert [row[:3] for row in kinds] == [["joint", "2", "6"], ["stain", "1", "2"]]
    header, *rows = page.tables["features"]
    assert [row[:2] for row in rows] == [["1", "stain"], ["2", "joint"], ["3", "joint"]]
    assert rows[1][7] == "cam0, cam1"
    assert "2 ring joint(s), median spacing 1.50 m." in "".join(page.text)

    [strip] = [i for i in page.images if i.get("class") == "map"]
    r, g, b = FEATURE_RGB
    assert (b, g, r) in colours_in(plot_area(decode_png(strip["src"])))


def test_report_of_a_run_without_features_says_so(session, tmp_path):
    store_feature_run(session)
    out = tmp_path / "binary.html"
    build_report(session, BINARY_RUN, out)
    page = Page(out.read_text(encoding="utf-8"))
    assert page.facts()["lining features"] == "none"
    assert "No lining features were found in this run" in "".join(page.text)
    assert "features" not in page.tables
    [strip] = [i for i in page.images if i.get("class") == "map"]
    r, g, b = FEATURE_RGB
    assert (b, g, r) not in colours_in(decode_png(strip["src"]))  # no layer, no legend entry


def test_report_of_features_without_cracks_still_draws_the_map(session, tmp_path):
    store.start_run(session, run_start_message(RUN))
    store.store_results(session, [with_features(result_message(RUN, 0, chainage_m=50.0),
                                                feature_record(0, "hole", (50.0, 50.05),
                                                               (900.0, 950.0)))])
    session.commit()
    out = tmp_path / "holes.html"
    assert build_report(session, RUN, out)["cracks"] == 0
    page = Page(out.read_text(encoding="utf-8"))
    assert "No cracks were found in this run." in "".join(page.text)
    assert len([i for i in page.images if i.get("class") == "map"]) == 1
    assert page.tables["feature-kinds"][1][:3] == ["hole", "1", "1"]
    assert not np.any([row[1] != "0" for row in page.tables["sections"][1:]])
