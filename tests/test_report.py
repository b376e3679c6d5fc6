"""The HTML inspection report of one run (``crackscan report``), on SQLite and Postgres: a known
run stored through the store's writers, the report parsed back (well-formed, escaped), its map
and crops decoded, its section table and largest-cracks list checked against the data."""

from __future__ import annotations

import html
import math

import cv2
import numpy as np
import pytest
from support import (
    SEVERITY,
    Page,
    colours_in,
    crack_record,
    crackscan,
    decode_png,
    end_message,
    plot_area,
    result_message,
    run_start_message,
)

from crackscan.wire import CrackRecord, ResultMessage
from management import store
from management.db import make_engine, session_factory
from management.report import build_report, class_colours

RUN = "20261121-100000-aaaa"
OTHER = "20261121-110000-bbbb"
SOURCE = '<script>alert("x")</script> & co.mp4'
COLOURS = dict(zip(SEVERITY.names, class_colours(len(SEVERITY.names)), strict=True))  # RGB


def bgr(name: str) -> tuple[int, int, int]:
    r, g, b = COLOURS[name]
    return b, g, r


def result_with_mask(run_id: str, seq: int, chainage_m: float,
                     cracks: tuple[CrackRecord, ...] = ()) -> ResultMessage:
    """A frame whose mask has a 3 px line of crack pixels across each crack's bounding box."""
    mask = np.zeros((64, 256), np.uint8)
    for record in cracks:
        x, y, w, h = record.bbox_px
        cv2.line(mask, (x, y + h // 2), (x + w - 1, y + h // 2), 255, 3)
    return result_message(run_id, seq, cracks, chainage_m=chainage_m, model="model@1234",
                          mask=mask)


# The known run: 8 detections, 7 physical cracks (F is seen by frames 2 and 3, its longer view
# in frame 3), frames from 101 to 135 m, so sections 100, 110, 120 and 130 (empty).
FRAMES = [
    (0, 101.0, (crack_record(0, 101.0, 0.1, 200.0, arc_mm=1000.0,                      # A 1
                             bbox_px=(0, 0, 40, 10)),
                crack_record(1, 102.0, 0.25, 400.0, "circumferential", arc_mm=2000.0,  # B 2
                             bbox_px=(50, 0, 40, 12)))),
    (1, 112.0, (crack_record(0, 112.0, 1.0, 900.0, "diagonal", arc_mm=1000.0,          # C 3
                             bbox_px=(0, 0, 60, 14)),
                crack_record(1, 113.0, 2.0, 400.0, arc_mm=3000.0,                      # G 4
                             bbox_px=(70, 0, 30, 16)))),
    (2, 123.0, (crack_record(0, 123.5, 4.0, 1500.0, "network", arc_mm=1500.0,          # D 5
                             bbox_px=(0, 0, 80, 20)),
                crack_record(1, 125.0, 6.0, 300.0, arc_mm=2500.0,                      # E 6
                             bbox_px=(90, 0, 20, 8)),
                crack_record(2, 127.0, 0.5, 500.0, arc_mm=4000.0,                      # F 7
                             bbox_px=(120, 0, 40, 10)))),
    (3, 128.0, (crack_record(0, 127.0, 0.6, 700.0, arc_mm=4000.0,                      # F 7
                             bbox_px=(0, 20, 64, 18)),)),
    (4, 135.0, ()),
]


def store_run(session, run_id: str, frames, merged: bool = True, source: str = SOURCE) -> None:
    store.start_run(session, run_start_message(run_id, source=source,
                                               config={"severity": SEVERITY.model_dump()}))
    store.store_results(session, [result_with_mask(run_id, seq, chainage, cracks)
                                  for seq, chainage, cracks in frames])
    if merged:
        store.end_stream(session, end_message(run_id, frames_sent=len(frames), frames_bad=0))
        store.finish_run(session, run_id, "complete")
        store.merge_run(session, run_id)
    session.commit()


def test_report_of_a_known_run(session, tmp_path):
    store_run(session, RUN, FRAMES)
    out = tmp_path / "report.html"
    summary = build_report(session, RUN, out, section_m=10.0, largest=5)
    assert summary == {"run": RUN, "path": str(out), "cracks": 7, "detections": 8,
                       "sections": 4, "strips": 1, "largest": 5}
    text = out.read_text(encoding="utf-8")
    page = Page(text)

    # escaped: the source's markup is text, never a tag
    assert "<script" not in text.lower() and "script" not in page.tags
    assert html.escape(SOURCE) in text
    facts = page.facts()
    assert facts["source"] == SOURCE
    assert (facts["run"], facts["mode"], facts["status"], facts["model"]) == (
        RUN, "replay", "complete", "model@1234")
    assert (facts["frames"], facts["detections"], facts["physical cracks"]) == ("5", "8", "7")
    assert facts["chainage"] == "101.000 .. 135.000 m"
    assert facts["per severity"] == "hairline 1, fine 1, medium 3, wide 1, severe 1"
    assert facts["per type"] == "longitudinal 4, circumferential 1, diagonal 1, network 1"

    # the map: one strip, every width class present in its colour
    [strip] = [i for i in page.images if i.get("class") == "map"]
    image = decode_png(strip["src"])
    assert image.shape[1] <= 2000 and image.shape[0] > 100
    assert all(bgr(name) in colours_in(plot_area(image)) for name in SEVERITY.names)

    # sections: counts, total lengths, max widths and severities of the known data
    physical = {c["number"]: c for c in store.query_physical(session, run=RUN)}
    length_f = physical[7]["length_mm"]
    assert length_f >= 700.0
    header, *rows, total = page.tables["sections"]
    assert header == ["chainage (m)", "cracks", "total length (m)", "max width (mm)",
                      *SEVERITY.names]
    assert rows == [
        ["100 .. 110", "2", "0.60", "0.25", "1", "1", "0", "0", "0"],
        ["110 .. 120", "2", "1.30", "2.00", "0", "0", "2", "0", "0"],
        ["120 .. 130", "3", f"{(1800.0 + length_f) / 1000:.2f}", "6.00", "0", "0", "1", "1", "1"],
        ["130 .. 140", "0", "0.00", "-", "0", "0", "0", "0", "0"],
    ]
    assert total[:2] == ["all", "7"]

    # the largest five: by length, ties (G and B, 400 mm) by width; each with its crop
    header, *rows = page.tables["largest"]
    assert [row[1] for row in rows] == ["5", "3", "7", "4", "2"]
    assert [row[4] for row in rows] == ["1500", "900", f"{length_f:.0f}", "400", "400"]
    assert rows[0][8] == "wide" and rows[0][7] == "network"
    crops = [i for i in page.images if i.get("class") == "crop"]
    assert len(crops) == 5
    for crop, row in zip(crops, rows, strict=True):
        image = decode_png(crop["src"])
        assert max(image.shape[:2]) >= 96
        assert bgr(row[8]) in colours_in(image)  # crack pixels in the class colour
    # F's crop is that of its longer detection (frame 3, 18 x 64 px), scaled up 6 times
    assert "frame 3" in rows[2][10]
    assert decode_png(crops[2]["src"]).shape[:2] == (18 * 6, 64 * 6)


def test_a_run_not_merged_yet_and_one_class_only(session, tmp_path):
    store_run(session, OTHER, [(0, 50.0, (crack_record(0, 50.0, 0.1, 120.0,
                                                       bbox_px=(0, 0, 30, 6)),)),
                               (1, 51.0, ())], merged=False, source="drive.mp4")
    out = tmp_path / "other.html"
    summary = build_report(session, OTHER, out, section_m=2.5)
    assert (summary["cracks"], summary["sections"], summary["largest"]) == (1, 1, 1)
    page = Page(out.read_text(encoding="utf-8"))
    [strip] = [i for i in page.images if i.get("class") == "map"]
    present = colours_in(plot_area(decode_png(strip["src"])))
    assert bgr("hairline") in present
    assert not any(bgr(name) in present for name in SEVERITY.names[1:])
    assert page.tables["sections"][1][:4] == ["50 .. 52.5", "1", "0.12", "0.10"]
    [crop] = [i for i in page.images if i.get("class") == "crop"]
    assert decode_png(crop["src"]).shape[:2] == (6 * 16, 30 * 16)


def test_an_empty_run_and_bad_arguments(session, tmp_path):
    store_run(session, RUN, [(0, 10.0, ()), (1, 12.0, ())])
    out = tmp_path / "empty.html"
    summary = build_report(session, RUN, out)
    assert (summary["cracks"], summary["strips"], summary["largest"]) == (0, 0, 0)
    page = Page(out.read_text(encoding="utf-8"))
    assert "No cracks were found in this run." in "".join(page.text)
    assert not page.images
    assert page.tables["sections"][1] == ["10 .. 20", "0", "0.00", "-", "0", "0", "0", "0", "0"]

    with pytest.raises(LookupError, match="no run 'nope'"):
        build_report(session, "nope", tmp_path / "nope.html")
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match="section length"):
            build_report(session, RUN, out, section_m=bad)
    with pytest.raises(ValueError, match="largest"):
        build_report(session, RUN, out, largest=-1)
    assert not (tmp_path / "nope.html").exists()


def test_a_long_run_is_drawn_in_strips(session, tmp_path):
    frames = [(seq, 1000.0 + 100.0 * seq,
               (crack_record(0, 1000.0 + 100.0 * seq, 0.35, 300.0, bbox_px=(0, 0, 20, 6)),))
              for seq in range(11)]  # 1000 .. 2000 m; the first crack reaches back to 999.95 m
    store_run(session, RUN, frames)
    out = tmp_path / "long.html"
    summary = build_report(session, RUN, out, section_m=20.0, largest=0)
    # 980 .. 2020 m in windows of 160 m (10 px/m)
    assert (summary["strips"], summary["sections"], summary["largest"]) == (7, 51, 0)
    page = Page(out.read_text(encoding="utf-8"))
    strips = [i for i in page.images if i.get("class") == "map"]
    assert [s["alt"] for s in strips[:2]] == ["crack map, chainage 980 to 1140 m",
                                             "crack map, chainage 1140 to 1300 m"]
    assert all(decode_png(s["src"]).shape[1] <= 2000 for s in strips)
    assert "largest" not in page.tables

    # 0 .. 5000 m would be 32 windows of 160 m: 12 strips of 420 m instead
    store_run(session, OTHER, [(0, 0.5, (crack_record(0, 0.5, 0.35, 300.0,
                                                      bbox_px=(0, 0, 20, 6)),)),
                               (1, 5000.0, ())])
    summary = build_report(session, OTHER, out)
    assert (summary["strips"], summary["sections"]) == (12, 501)


def test_cli_report(db_url, tmp_path):
    engine = make_engine(db_url)
    with session_factory(engine)() as session:
        store_run(session, RUN, FRAMES)
    engine.dispose()
    out = tmp_path / "cli.html"
    done = crackscan("report", "--run", RUN, "--out", str(out), "--db", db_url,
                     "--section-m", "20", "--largest", "3", check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines() == [
        f"report of run {RUN}: 7 physical cracks (from 8 detections) -> {out}"]
    page = Page(out.read_text(encoding="utf-8"))
    assert len([i for i in page.images if i.get("class") == "crop"]) == 3
    assert [row[0] for row in page.tables["sections"][1:-1]] == ["100 .. 120", "120 .. 140"]

    done = crackscan("report", "--run", "no-such-run", "--out", str(tmp_path / "x.html"),
                     "--db", db_url, check=False)
    assert done.returncode != 0 and done.stdout == ""
    [line] = done.stderr.strip().splitlines()
    assert "no-such-run" in line and "crackscan runs" in line
    assert not (tmp_path / "x.html").exists()
