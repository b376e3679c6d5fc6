"""``crackscan select``: frames chosen by the model's doubt and spread along the tunnel (or at
random), written with pre-labels that pycocotools and the LabelMe reader load and that
``labels import`` turns back into the same masks."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO
from support import crackscan

from training.labels import import_labels
from training.select import Candidate, choose, score_frame


def drive_folder(folder: Path, count: int = 12) -> Path:
    """An image folder of ``count`` 160 x 120 frames of concrete, some with a dark crack of
    falling contrast (bold, faint, none), read at 10 frames/s: 0.28 m apart at 10 km/h."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(4)
    for i in range(count):
        image = np.clip(rng.normal(150, 12, (120, 160, 3)), 0, 255).astype(np.uint8)
        image = cv2.GaussianBlur(image, (3, 3), 0)
        contrast = [110, 40, 20, 0][i % 4]
        if contrast:
            points = np.column_stack([np.linspace(5, 155, 12),
                                      60 + np.cumsum(rng.integers(-5, 6, 12))])
            cv2.polylines(image, [points.astype(np.int32)], False,
                          (150 - contrast,) * 3, 3)
        cv2.imwrite(str(folder / f"frame_{i:03d}.png"), image)
    return folder


def test_active_selection_writes_pre_labels_that_round_trip(tmp_path):
    source = drive_folder(tmp_path / "drive")
    out = tmp_path / "selected"
    summary = json.loads(crackscan("select", "--source", source, "--budget", 4, "--out", out,
                                   "--format", "json").stdout)
    assert summary["frames_scored"] == 12 and summary["selected"] == 4
    ids = [f["id"] for f in summary["frames"]]
    assert len(set(ids)) == 4
    # spread: no two chosen frames closer than the span over twice the budget (0.38 m here)
    chainages = sorted(f["chainage_m"] for f in summary["frames"])
    assert min(np.diff(chainages)) >= (max(chainages) - min(chainages)) / 8 - 1e-9
    # COCO, as the format's reference reader loads it
    coco = COCO(str(out / "annotations.json"))
    names = sorted(image["file_name"] for image in coco.loadImgs(coco.getImgIds()))
    assert names == sorted(f"{i}.png" for i in ids)
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} >= {"crack"}
    # LabelMe: one file beside each image, naming it
    for frame_id in ids:
        doc = json.loads((out / "images" / f"{frame_id}.json").read_text())
        assert doc["imagePath"] == f"{frame_id}.png" and (out / "images" /
                                                          doc["imagePath"]).is_file()
    classes = summary["classes"]
    import_labels(out / "annotations.json", tmp_path / "from_coco", classes)
    import_labels(out / "images", tmp_path / "from_labelme", classes)
    crack = classes.index("crack")
    cracked = 0
    for frame_id in ids:
        a = cv2.imread(str(tmp_path / "from_coco" / "masks" / f"{frame_id}.png"),
                       cv2.IMREAD_UNCHANGED)
        b = cv2.imread(str(tmp_path / "from_labelme" / "masks" / f"{frame_id}.png"),
                       cv2.IMREAD_UNCHANGED)
        assert np.array_equal(a, b), frame_id
        cracked += int((a == crack).any())
    assert cracked >= 1  # the model pre-labelled the bold cracks


def test_random_selection_and_refusals(tmp_path):
    source = drive_folder(tmp_path / "drive")
    picks = [json.loads(crackscan("select", "--source", source, "--budget", 3, "--out",
                                  tmp_path / name, "--strategy", "random", "--seed", seed,
                                  "--format", "json").stdout)
             for name, seed in (("a", 1), ("b", 1))]
    assert [f["id"] for f in picks[0]["frames"]] == [f["id"] for f in picks[1]["frames"]]
    assert len({f["id"] for f in picks[0]["frames"]}) == 3
    again = crackscan("select", "--source", source, "--budget", 3, "--out", tmp_path / "a",
                      check=False)
    assert again.returncode == 2 and "exists" in again.stderr
    missing = crackscan("select", "--source", tmp_path / "nothing.mp4", "--budget", 3,
                        "--out", tmp_path / "c", check=False)
    assert missing.returncode == 2 and not (tmp_path / "c").exists()
    unknown = crackscan("select", "--source", "run:nope", "--budget", 3, "--out",
                        tmp_path / "d", "--db", f"sqlite:///{tmp_path / 'x.db'}", check=False)
    assert unknown.returncode == 2


def test_doubt_ranks_and_rejected_frames_come_first():
    sure = np.zeros((100, 100), np.float32)
    sure[40:45, :] = 0.99  # a bold crack: the model is sure
    doubtful = np.zeros((100, 100), np.float32)
    doubtful[40:45, :] = 0.5  # a faint line: it is not
    assert score_frame(doubtful) > 10 * score_frame(sure) and score_frame(sure * 0) == 0
    candidates = [Candidate("cam0", i, float(i), u, rejected=(i == 5))
                  for i, u in enumerate([1.0, 9.0, 8.0, 7.0, 0.5, 0.1])]
    features = np.eye(6, dtype=np.float32)
    chosen = choose(candidates, features, 3, "active")
    assert chosen[0] == 5 and 1 in chosen  # the rejected frame, then the most doubtful
    assert choose(candidates, features, 10, "active") == list(range(6))  # fewer than budget
    with pytest.raises(Exception, match="strategy"):
        choose(candidates, features, 3, "greedy")


@pytest.mark.slow
def test_a_stored_run_s_rejected_cracks_are_chosen_first(tmp_path):
    """select from a run the pipeline stored: its source is read again, and the frames of the
    crack an inspector rejected come first."""
    from management import store
    from management.db import make_engine, session_factory

    source = drive_folder(tmp_path / "drive")
    db = f"sqlite:///{tmp_path / 'crackscan.db'}"
    run_id = json.loads(crackscan("run", "--source", source, "--db", db, "--workers", 1,
                                  "--format", "json").stdout)["id"]
    engine = make_engine(db)
    with session_factory(engine)() as session:
        cracks = store.query_physical(session, run=run_id)
        assert cracks, "the bold cracks were found"
        rejected = cracks[-1]
        store.add_review(session, run_id, rejected["number"], "rejected", "joint", "",
                         "A. Inspector")
        session.commit()
        seen = {(d["camera"], d["seq"]) for d in store.crack_detections(
            session, run_id, rejected["number"])}
    engine.dispose()
    summary = json.loads(crackscan("select", "--source", f"run:{run_id}", "--db", db,
                                   "--budget", 3, "--out", tmp_path / "out", "--format",
                                   "json").stdout)
    chosen = {(f["camera"], f["seq"]) for f in summary["frames"]}
    assert seen & chosen and all(f["rejected"] == ((f["camera"], f["seq"]) in seen)
                                 for f in summary["frames"])
