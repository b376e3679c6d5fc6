"""The web application's JSON API (``crackscan serve``), on SQLite and Postgres: a known run
stored through the store's writers (photos included), every route read back against it, reviews
stored and applied to counts and exports, the map's viewport and density answers, tokens, bad
input and a failing database answered with one JSON error, never a trace."""

from __future__ import annotations

import csv
import io
import json

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient
from support import (
    crack_record,
    crackscan,
    end_message,
    result_message,
    run_start_message,
)

from crackscan.wire import CrackPhoto
from management import store
from management.db import make_engine, session_factory
from management.web.app import Tokens, create_app, read_token_file

RUN = "20261121-100000-aaaa"
LATER = "20261221-100000-bbbb"
READ = "read-token-0123456789"
REVIEW = "review-token-0123456789"


def photo_of(record, frame: np.ndarray) -> CrackPhoto:
    """The worker's photo of ``record``: its box plus 8 px, at full size."""
    x, y, w, h = record.bbox_px
    x0, y0 = max(0, x - 8), max(0, y - 8)
    x1, y1 = min(frame.shape[1], x + w + 8), min(frame.shape[0], y + h + 8)
    ok, jpeg = cv2.imencode(".jpg", frame[y0:y1, x0:x1])
    return CrackPhoto(crack=record.index, box_px=(x0, y0, x1 - x0, y1 - y0), jpeg=jpeg.tobytes())


def store_run(session, run_id: str, tunnel: str = "T1", started: float = 0.0,
              photos: bool = True) -> None:
    """Three frames, four cracks (one seen twice): physical cracks 1 (frames 0 and 1, widest
    0.4 mm), 2 (1.5 mm), 3 (6 mm, severe) at chainage 101-130 m; photos of frame 0's cracks."""
    config = {"camera": {"mm_per_px_along": 0.5}, "acquisition": {"tunnel": tunnel}}
    store.start_run(session, run_start_message(run_id, started_at=1_795_000_000.0 + started,
                                               config=config))
    frames = []
    for seq, chainage, cracks in (
            (0, 101.0, (crack_record(0, 101.0, 0.4, 300.0, bbox_px=(4, 4, 40, 10)),
                        crack_record(1, 102.0, 1.5, 500.0, arc_mm=2500.0,
                                     bbox_px=(60, 10, 40, 12)))),
            (1, 101.02, (crack_record(0, 101.02, 0.3, 280.0, bbox_px=(6, 4, 40, 10)),)),
            (2, 130.0, (crack_record(0, 130.0, 6.0, 900.0, "diagonal", arc_mm=3000.0,
                                     bbox_px=(10, 20, 60, 10)),))):
        mask = np.zeros((64, 128), np.uint8)
        image = np.full((64, 128, 3), 140, np.uint8)
        for record in cracks:
            x, y, w, h = record.bbox_px
            cv2.line(mask, (x, y + h // 2), (x + w - 1, y + h // 2), 255, 3)
            cv2.line(image, (x, y + h // 2), (x + w - 1, y + h // 2), (30, 30, 30), 3)
        message = result_message(run_id, seq, cracks, chainage_m=chainage, mask=mask)
        if photos and seq == 0:
            message = type(message)(**{**message.__dict__,
                                       "photos": tuple(photo_of(r, image) for r in cracks)})
        frames.append(message)
    store.store_results(session, frames)
    store.end_stream(session, end_message(run_id, frames_sent=3, frames_bad=0))
    store.finish_run(session, run_id, "complete")
    store.merge_run(session, run_id)
    session.commit()


@pytest.fixture
def client(engine):
    with session_factory(engine)() as session:
        store_run(session, RUN)
    with TestClient(create_app(engine)) as client:
        yield client


def test_runs_tunnels_and_a_run(client):
    tunnels = client.get("/api/tunnels").json()
    assert [t["tunnel"] for t in tunnels] == ["T1"]
    run = tunnels[0]["runs"][0]
    assert run["id"] == RUN and run["frames"] == 3
    assert run["physical_by_severity"] == {"medium": 2, "severe": 1}
    summary = client.get(f"/api/runs/{RUN}").json()
    assert summary["extent"]["chainage_m"][0] == pytest.approx(100.95)
    assert summary["extent"]["chainage_m"][1] == pytest.approx(130.05)
    assert [c["name"] for c in summary["severity_classes"]][-1] == "severe"
    assert summary["severity_classes"][-1]["colour"].startswith("#")
    assert client.get("/api/runs").json()[0]["id"] == RUN
    missing = client.get("/api/runs/nope")
    assert missing.status_code == 404 and "no run 'nope'" in missing.json()["error"]


def test_the_map_draws_a_viewport_or_its_density(client):
    url = f"/api/runs/{RUN}/cracks"
    everything = client.get(url, params={"chainage": "0:1000", "arc": "0:5000"}).json()
    assert everything["total"] == 3 and [c["number"] for c in everything["cracks"]] == [1, 2, 3]
    assert everything["cracks"][0]["polyline"] and everything["cracks"][0]["verdict"] is None
    # a viewport holds what meets it: chainage 129-131 m, any arc; arc 2400-2600 mm only
    assert [c["number"] for c in client.get(url, params={"chainage": "129:131",
                                                          "arc": "0:5000"}).json()["cracks"]] \
        == [3]
    assert [c["number"] for c in client.get(url, params={"chainage": "0:1000",
                                                          "arc": "2400:2600"}).json()["cracks"]] \
        == [2]
    filtered = client.get(url, params={"chainage": "0:1000", "arc": "0:5000",
                                       "min_width_mm": 1, "type": "diagonal"}).json()
    assert [c["number"] for c in filtered["cracks"]] == [3]
    # more than the limit: their density, counted per cell by the database
    dense = client.get(url, params={"chainage": "100:140", "arc": "0:4000", "limit": 2,
                                    "cells_along": 4, "cells_across": 2}).json()
    assert dense["cracks"] is None and dense["total"] == 3
    cells = {(i, j): (n, widest) for i, j, n, widest in dense["density"]["cells"]}
    assert dense["density"]["cell_m"] == pytest.approx(10.0)
    widths = [c["width_max_mm"] for c in everything["cracks"]]
    assert cells == {(0, 0): (1, widths[0]), (0, 1): (1, widths[1]), (3, 1): (1, widths[2])}


def test_a_crack_its_evidence_and_its_history(client, engine):
    crack = client.get(f"/api/runs/{RUN}/cracks/1").json()
    assert crack["number"] == 1 and crack["detections"] == 2 and crack["reviews"] == []
    records = crack["detection_records"]
    assert [(d["seq"], d["photo"]) for d in records] == [(0, True), (1, False)]
    assert crack["history"] == [{"run": RUN, "started_at": crack["history"][0]["started_at"],
                                 "change": "this", "cracks": [1],
                                 "length_mm": crack["length_mm"],
                                 "width_max_mm": crack["width_max_mm"]}]
    photo = client.get(f"/api/runs/{RUN}/detections/cam0/0/0/photo")
    assert photo.status_code == 200 and photo.headers["content-type"] == "image/png"
    drawn = cv2.imdecode(np.frombuffer(photo.content, np.uint8), cv2.IMREAD_COLOR)
    plain = cv2.imdecode(np.frombuffer(client.get(
        f"/api/runs/{RUN}/detections/cam0/0/0/photo?overlay=false").content, np.uint8),
        cv2.IMREAD_COLOR)
    # the box (4, 4, 40, 10) plus 8 px, clipped to the frame
    assert drawn.shape == plain.shape == (22, 52, 3)
    # the mask is drawn red over the crack's own line (row 4 + 5 of the frame), nowhere else
    red = (drawn[:, :, 2].astype(int) - drawn[:, :, 1]) > 60
    rows = np.flatnonzero(red.any(axis=1))
    assert 6 <= rows.min() and rows.max() <= 12 and red[9, 5:43].mean() > 0.9
    assert not ((plain[:, :, 2].astype(int) - plain[:, :, 1]) > 60).any()
    assert client.get(f"/api/runs/{RUN}/detections/cam0/1/0/photo").status_code == 404
    mask = client.get(f"/api/runs/{RUN}/detections/cam0/1/0/mask")
    assert cv2.imdecode(np.frombuffer(mask.content, np.uint8), cv2.IMREAD_GRAYSCALE).max() == 255
    assert client.get(f"/api/runs/{RUN}/cracks/9").status_code == 404
    # a later inspection of the same tunnel: the crack's history across both
    with session_factory(engine)() as session:
        store_run(session, LATER, started=86400.0 * 30, photos=False)
    history = client.get(f"/api/runs/{RUN}/cracks/3").json()["history"]
    assert [(h["run"], h["change"], h["cracks"]) for h in history] == [
        (RUN, "this", [3]), (LATER, "unchanged", [3])]


def test_reviews_are_kept_and_leave_rejected_cracks_out(client):
    post = client.post(f"/api/runs/{RUN}/cracks/3/review",
                       json={"verdict": "rejected", "reason": "joint", "note": "ring joint",
                             "reviewer": "A. Inspector"})
    assert post.status_code == 201 and post.json()["verdict"] == "rejected"
    client.post(f"/api/runs/{RUN}/cracks/1/review",
                json={"verdict": "confirmed", "reviewer": "A. Inspector"})
    crack = client.get(f"/api/runs/{RUN}/cracks/3").json()
    assert (crack["verdict"], crack["verdict_reason"]) == ("rejected", "joint")
    assert crack["reviews"][0]["reviewer"] == "A. Inspector"
    assert client.get("/api/tunnels").json()[0]["runs"][0]["physical_by_severity"] == \
        {"medium": 2}
    exported = client.get(f"/api/runs/{RUN}/export", params={"format": "csv"})
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert [row["number"] for row in rows] == ["1", "2"]
    assert "attachment" in exported.headers["content-disposition"]
    rejected = client.get(f"/api/runs/{RUN}/export",
                          params={"format": "geojson", "verdict": "rejected"}).json()
    assert [f["properties"]["number"] for f in rejected["features"]] == [3]
    labels = client.get("/api/reviews").json()
    assert [(r["number"], r["verdict"]) for r in labels] == [(1, "confirmed"), (3, "rejected")]
    # a verdict changed later: the latest counts, both are kept
    client.post(f"/api/runs/{RUN}/cracks/3/review",
                json={"verdict": "site_visit", "reviewer": "B. Engineer", "note": "look again"})
    crack = client.get(f"/api/runs/{RUN}/cracks/3").json()
    assert crack["verdict"] == "site_visit" and len(crack["reviews"]) == 2
    # what a review refuses
    for body, status in (({"verdict": "rejected", "reviewer": "A"}, 400),  # no reason
                         ({"verdict": "confirmed", "reason": "joint", "reviewer": "A"}, 400),
                         ({"verdict": "maybe", "reviewer": "A"}, 400),
                         ({"verdict": "confirmed", "reviewer": ""}, 422),
                         ({"verdict": "confirmed", "reviewer": "A", "extra": 1}, 422),
                         ({"verdict": "confirmed", "reviewer": "A", "note": "x" * 2001}, 422)):
        answer = client.post(f"/api/runs/{RUN}/cracks/3/review", json=body)
        assert answer.status_code == status and answer.json()["error"], body
    assert client.post(f"/api/runs/{RUN}/cracks/99/review",
                       json={"verdict": "confirmed", "reviewer": "A"}).status_code == 404
    assert len(client.get(f"/api/runs/{RUN}/cracks/3").json()["reviews"]) == 2


def test_cli_query_by_verdict(client, db_url):
    client.post(f"/api/runs/{RUN}/cracks/2/review",
                json={"verdict": "rejected", "reason": "stain", "reviewer": "A"})
    numbers = {verdict: [r["number"] for r in json.loads(crackscan(
        "query", "--db", db_url, "--format", "json", *(["--verdict", verdict] if verdict
                                                      else [])).stdout)]
        for verdict in (None, "rejected", "unreviewed", "any")}
    assert numbers == {None: [1, 3], "rejected": [2], "unreviewed": [1, 3], "any": [1, 2, 3]}
    refused = crackscan("query", "--db", db_url, "--detections", "--verdict", "any",
                        check=False)
    assert refused.returncode == 2 and "--verdict" in refused.stderr


def test_compare_report_health_and_metrics(client, engine):
    with session_factory(engine)() as session:
        store_run(session, LATER, started=86400.0, photos=False)
    report = client.get("/api/compare", params={"before": RUN, "after": LATER}).json()
    assert report["summary"]["matched"] == 3 and report["before_run"] == RUN
    assert client.get("/api/compare", params={"before": RUN, "after": "x"}).status_code == 404
    page = client.get(f"/api/runs/{RUN}/report")
    assert page.status_code == 200 and f"run {RUN}" in page.text
    assert client.get("/healthz").json() == {"status": "ok"}
    for path in ("/", f"/runs/{RUN}", f"/runs/{RUN}/cracks/1", "/compare"):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.text.startswith("<!DOCTYPE html>")
    assert client.get("/static/leaflet/leaflet.js").status_code == 200
    assert "/api/runs/{run_id}/cracks" in client.get("/openapi.json").json()["paths"]
    metrics = client.get("/metrics").text
    assert 'crackscan_web_requests_total{method="GET",route="/api/compare",status="200"} 1.0' \
        in metrics
    assert 'route="/api/runs/{run_id}/report"' in metrics


@pytest.mark.parametrize("path", [
    "/api/runs/{RUN}/cracks?chainage=5:1&arc=0:1",        # start after end
    "/api/runs/{RUN}/cracks?chainage=a:b&arc=0:1",        # not numbers
    "/api/runs/{RUN}/cracks?chainage=0:1&arc=0:nan",      # not finite
    "/api/runs/{RUN}/cracks?chainage=0:1&arc=0:1&limit=0",
    "/api/runs/{RUN}/cracks?chainage=0:1&arc=0:1&type=zigzag",
    "/api/runs/{RUN}/cracks?chainage=0:1&arc=0:1&verdict=maybe",
    "/api/runs/{RUN}/cracks?chainage=0:1",                 # arc missing
    "/api/runs/{RUN}/cracks/x",
    "/api/runs/{RUN}/export?format=exe",
    "/api/runs/..%2F..%2Fetc/cracks/1",
    "/api/runs/{RUN}/detections/..%2Fcam/0/0/photo",
    "/api/compare?before=a%00&after=b",
])
def test_bad_input_is_one_json_error(client, path):
    answer = client.get(path.replace("{RUN}", RUN))
    assert 400 <= answer.status_code < 500
    assert set(answer.json()) == {"error"} and "Traceback" not in answer.text


def test_no_path_traversal_through_static_files(client):
    for path in ("/static/../app.py", "/static/..%2Fapp.py", "/static/%2e%2e/app.py",
                 "/static/leaflet/../../app.py"):
        answer = client.get(path)
        assert answer.status_code == 404 or "create_app" not in answer.text, path


def test_tokens_read_and_review(engine, tmp_path):
    with session_factory(engine)() as session:
        store_run(session, RUN)
    tokens = tmp_path / "tokens"
    tokens.write_text(f"# who may do what\nread {READ}\nreview {REVIEW}\n")
    app = create_app(engine, read_token_file(tokens))
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 200  # probes need no token
        assert client.get("/api/runs").status_code == 401
        assert client.get("/api/runs", headers={"Authorization": "Bearer wrong"}
                          ).status_code == 401
        assert client.get("/api/runs", headers={"Authorization": f"Bearer {READ}"}
                          ).status_code == 200
        body = {"verdict": "confirmed", "reviewer": "A"}
        assert client.post(f"/api/runs/{RUN}/cracks/1/review", json=body,
                           headers={"Authorization": f"Bearer {READ}"}).status_code == 403
        assert client.post(f"/api/runs/{RUN}/cracks/1/review", json=body,
                           headers={"Authorization": f"Bearer {REVIEW}"}).status_code == 201
        # a page opened with ?token=: a cookie, and the token is dropped from the address
        opened = client.get(f"/runs/{RUN}?token={READ}&c=10", follow_redirects=False)
        assert opened.status_code == 303 and opened.headers["location"] == f"/runs/{RUN}?c=10"
        assert client.get("/api/runs").status_code == 200  # the cookie now
    for text in ("", "read short\n", "admin 0123456789abcdef\n"):
        tokens.write_text(text)
        with pytest.raises(Exception, match="token"):
            read_token_file(tokens)


def test_a_failing_database_is_a_json_error(tmp_path):
    url = f"sqlite:///{tmp_path / 'gone.db'}"
    engine = make_engine(url)
    with session_factory(engine)() as session:
        store_run(session, RUN)
    with engine.begin() as connection:  # the table goes away under the running server
        connection.exec_driver_sql("DROP TABLE crack_reviews")
    with TestClient(create_app(engine), raise_server_exceptions=False) as client:
        answer = client.get(f"/api/runs/{RUN}/cracks/1")
        assert answer.status_code == 503
        assert answer.json()["error"].startswith("the database failed")
        assert "Traceback" not in answer.text
    engine.dispose()


def test_serve_refuses_an_open_public_address(tmp_path):
    db = f"sqlite:///{tmp_path / 'x.db'}"
    make_engine(db).dispose()
    refused = crackscan("serve", "--db", db, "--host", "0.0.0.0", check=False)
    assert refused.returncode == 2
    assert "--token-file" in refused.stderr and len(refused.stderr.strip().splitlines()) == 1
    bad = tmp_path / "tokens"
    bad.write_text("read x\n")
    refused = crackscan("serve", "--db", db, "--token-file", str(bad), check=False)
    assert refused.returncode == 2 and "tokens:1" in refused.stderr


def test_tokens_compare_in_constant_time_and_roles():
    tokens = Tokens(read={READ}, review={REVIEW})
    assert tokens.role(READ) == "read" and tokens.role(REVIEW) == "review"
    assert tokens.role(None) is None and tokens.role(READ + "x") is None


def test_the_cli_offers_the_store_s_verdict_filters():
    from crackscan.cli.records import VERDICT_FILTERS

    assert VERDICT_FILTERS == store.VERDICT_FILTERS


def test_the_map_s_lining_features_are_merged_within_the_viewport(engine):
    import dataclasses

    from crackscan.wire import FeatureRecord

    def joint(chainage: float, arc: float) -> FeatureRecord:  # one frame's piece of a ring joint
        return FeatureRecord(index=0, kind="joint", area_px=768, area_mm2=3072.0,
                             bbox_px=(0, 0, 8, 96), chainage_m=chainage,
                             chainage_start_m=chainage - 0.005, chainage_end_m=chainage + 0.005,
                             arc_mm=arc + 1000.0, arc_start_mm=arc, arc_end_mm=arc + 2000.0,
                             length_mm=2000.0, orientation_deg=90.0)

    with session_factory(engine)() as session:
        store.start_run(session, run_start_message(RUN))
        results = [dataclasses.replace(result_message(RUN, seq, chainage_m=chainage),
                                       features=(joint(chainage, arc),))
                   for seq, (chainage, arc) in enumerate(((110.0, 0.0), (110.0, 2000.0),
                                                          (150.0, 0.0), (300.0, 0.0)))]
        store.store_results(session, results)
        session.commit()
    with TestClient(create_app(engine)) as client:
        window = client.get(f"/api/runs/{RUN}/features", params={"chainage": "100:160"}).json()
        assert [(f["kind"], f["chainage_m"], f["arc_start_mm"], f["arc_end_mm"])
                for f in window] == [("joint", 110.0, 0.0, 4000.0), ("joint", 150.0, 0.0, 2000.0)]
        assert {f["number"] for f in window} == {None}
        numbered = client.get(f"/api/runs/{RUN}/features").json()
        assert [f["number"] for f in numbered] == [1, 2, 3]
        assert client.get(f"/api/runs/{RUN}/features", params={"chainage": "9:1"}
                          ).status_code == 400


def test_a_crack_s_history_is_found_through_the_joints_of_a_drifting_odometer(engine):
    """Two inspections of one tunnel whose odometers disagree by 2 %: the crack at 150 m of the
    first is the one at 153 m of the second, found through the ring joints, comparing only the
    cracks around it."""
    import dataclasses

    from crackscan.wire import FeatureRecord
    from management.inspections import crack_history

    def joint(chainage: float) -> FeatureRecord:
        return FeatureRecord(index=0, kind="joint", area_px=768, area_mm2=3072.0,
                             bbox_px=(0, 0, 8, 96), chainage_m=chainage,
                             chainage_start_m=chainage - 0.005, chainage_end_m=chainage + 0.005,
                             arc_mm=1000.0, arc_start_mm=0.0, arc_end_mm=2000.0,
                             length_mm=2000.0, orientation_deg=90.0)

    rings = np.arange(1.0, 200.0, 1.5) + np.random.default_rng(1).uniform(-0.2, 0.2, 133)
    cracks_at = [20.0, 75.0, 150.0, 150.3, 190.0]
    with session_factory(engine)() as session:
        for run_id, scale, started in ((RUN, 1.0, 0.0), (LATER, 1.02, 86400.0)):
            config = {"camera": {"mm_per_px_along": 0.5}, "acquisition": {"tunnel": "T"}}
            store.start_run(session, run_start_message(
                run_id, started_at=1_795_000_000.0 + started, config=config))
            results = [dataclasses.replace(result_message(run_id, seq, chainage_m=ring * scale),
                                           features=(joint(ring * scale),))
                       for seq, ring in enumerate(rings)]
            results += [result_message(run_id, 1000 + i, (crack_record(
                0, at * scale, 0.5 + i, 300.0 + 10 * i),), chainage_m=at * scale)
                for i, at in enumerate(cracks_at)]
            store.store_results(session, results)
            store.finish_run(session, run_id, "complete")
            store.merge_run(session, run_id)
        session.commit()
        history = crack_history(session, RUN, 3)  # the crack at 150 m
        backwards = crack_history(session, LATER, 3)  # ... seen from the later inspection
    assert [(h["run"], h["change"], h["cracks"]) for h in history] == [
        (RUN, "this", [3]), (LATER, "unchanged", [3])]
    assert history[1]["width_max_mm"] == 2.5
    assert [(h["run"], h["change"], h["cracks"]) for h in backwards] == [
        (RUN, "unchanged", [3]), (LATER, "this", [3])]
