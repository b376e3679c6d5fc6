"""The synthetic drive: a real mp4 OpenCV reads back, and a truth that matches the pixels."""

from __future__ import annotations

import json
import math

import cv2
import numpy as np
import pytest

from acquisition.synth import SyntheticDrive, synthesize_drive, synthetic_frames
from crackscan.config import AcquisitionConfig, CameraConfig, PipelineConfig

CRACK_KEYS = {"id", "chainage_start_m", "chainage_end_m", "chainage_m", "arc_start_mm",
              "arc_end_mm", "length_mm", "width_mm", "width_max_mm", "orientation_deg", "type",
              "polyline"}
TRUTH_KEYS = {"video", "fps", "seconds", "frames", "width", "height", "speed_kmh",
              "start_chainage_m", "mm_per_px_along", "mm_per_px_across", "seed", "cracks",
              "ring_joints_m"}


def _grey(image: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)


def test_synthesize_drive_writes_an_mp4_that_opencv_reads_back(tmp_path):
    out, truth_path = tmp_path / "drive.mp4", tmp_path / "truth.json"
    truth = synthesize_drive(out, seconds=1.2, seed=3, fps=10.0, width=320, height=180,
                             truth=truth_path)

    capture = cv2.VideoCapture(str(out))
    assert capture.get(cv2.CAP_PROP_FPS) == pytest.approx(10.0)
    decoded = []
    while True:
        ok, image = capture.read()
        if not ok:
            break
        decoded.append(image)
    capture.release()
    assert len(decoded) == truth["frames"] == 12
    assert all(image.shape == (180, 320, 3) for image in decoded)

    assert json.loads(truth_path.read_text()) == truth
    assert TRUTH_KEYS <= set(truth)
    assert truth["cracks"], "a 3 m drive holds at least one crack"
    for crack in truth["cracks"]:
        assert CRACK_KEYS <= set(crack)

    # the video is the rendered drive, up to compression
    rendered = list(synthetic_frames(seconds=1.2, seed=3, fps=10.0, width=320, height=180))
    assert len(rendered) == 12
    mse = np.mean((decoded[5].astype(np.float64) - rendered[5]) ** 2)
    assert 10 * math.log10(255**2 / mse) > 30


def test_same_seed_same_drive_other_seed_other_drive():
    first, again = SyntheticDrive(10.0, seed=7), SyntheticDrive(10.0, seed=7)
    assert first.truth() == again.truth()
    assert np.array_equal(first.frame(40), again.frame(40))
    other = SyntheticDrive(10.0, seed=8)
    assert other.truth()["cracks"] != first.truth()["cracks"]
    assert not np.array_equal(other.frame(40), first.frame(40))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_truth_cracks_lie_in_the_drive_and_measure_sanely(seed):
    config = PipelineConfig(acquisition=AcquisitionConfig(speed_kmh=18.0, start_chainage_m=1200.0),
                            camera=CameraConfig(arc_offset_mm=3000.0))
    drive = SyntheticDrive(20.0, seed=seed, config=config)
    truth = drive.truth()
    half_frame_m = (640 - 1) / 2 * 0.5 / 1000
    end_m = 1200.0 + 18.0 / 3.6 * (truth["frames"] - 1) / 25.0
    lo, hi = truth["chainage_range_m"]
    assert lo == pytest.approx(1200.0 - half_frame_m, abs=0.001)
    assert hi == pytest.approx(end_m + half_frame_m, abs=0.001)
    drive_m = hi - lo
    assert drive_m / 3.0 - 1 <= len(truth["cracks"]) <= drive_m / 1.5 + 1

    types = set()
    for crack in truth["cracks"]:
        types.add(crack["type"])
        assert lo <= crack["chainage_start_m"] <= crack["chainage_m"] <= crack["chainage_end_m"]
        assert crack["chainage_end_m"] <= hi
        assert 3000.0 <= crack["arc_start_mm"] <= crack["arc_end_mm"] <= 3000.0 + 359 * 0.5
        points = np.array(crack["polyline"])
        steps = np.hypot(np.diff(points[:, 0]) * 1000.0, np.diff(points[:, 1]))
        assert steps.sum() == pytest.approx(crack["length_mm"], rel=1e-3)
        assert 20.0 <= crack["length_mm"] <= 600.0 + 1e-6
        chord = math.hypot((points[-1, 0] - points[0, 0]) * 1000.0, points[-1, 1] - points[0, 1])
        assert chord <= crack["length_mm"]
        assert 1.0 <= crack["width_mm"] <= crack["width_max_mm"] <= 4.0
        off_axis = min(crack["orientation_deg"], 180.0 - crack["orientation_deg"])
        expected = ("longitudinal" if off_axis <= 30 else
                    "circumferential" if off_axis >= 60 else "diagonal")
        assert crack["type"] == expected
        for joint in truth["ring_joints_m"]:  # cracks keep clear of the ring joints
            assert not crack["chainage_start_m"] - 0.02 < joint < crack["chainage_end_m"] + 0.02
    assert len(types) >= 2
    joints = np.diff(truth["ring_joints_m"])
    assert np.all((joints > 1.15) & (joints < 1.55))


def test_cracks_are_darker_where_the_truth_says_and_as_wide():
    drive = SyntheticDrive(10.0, seed=0)
    truth = drive.truth()
    mm, width = truth["mm_per_px_along"], truth["width"]
    checked = 0
    for crack in truth["cracks"]:
        first, last = crack["frame_range"]
        index = (first + last) // 2
        grey = _grey(drive.frame(index))
        centre_m = truth["start_chainage_m"] + truth["speed_kmh"] / 3.6 * index / truth["fps"]
        points = np.array(crack["polyline"])
        xs = (width - 1) / 2 + (points[:, 0] - centre_m) * 1000.0 / mm
        ys = (points[:, 1] - truth["arc_offset_mm"]) / truth["mm_per_px_across"]
        inside = (xs > 15) & (xs < width - 16) & (ys > 15) & (ys < grey.shape[0] - 16)
        if inside.sum() < 10:
            continue
        background = cv2.medianBlur(grey.astype(np.uint8), 31).astype(np.float32)
        on_crack = grey[np.round(ys[inside]).astype(int), np.round(xs[inside]).astype(int)]
        ratio = on_crack / background[np.round(ys[inside]).astype(int),
                                      np.round(xs[inside]).astype(int)]
        assert np.mean(ratio < 0.75) > 0.9, f"crack {crack['id']} is not dark on its polyline"

        # dark pixels near the polyline: their area / length is the drawn width
        near = np.zeros(grey.shape, np.uint8)
        cv2.polylines(near, [np.round(np.stack([xs, ys], 1) * 16).astype(np.int32)], False, 255,
                      thickness=int(4 * crack["width_max_mm"] / mm) + 7, shift=4)
        full = (xs > 0) & (xs < width - 1)
        if not full.all():
            continue  # the crack runs out of this frame: its area is not all here
        dark = (grey < 0.72 * background) & (near > 0)
        drawn_mm = dark.sum() * mm * mm / crack["length_mm"]
        assert drawn_mm == pytest.approx(crack["width_mm"], rel=0.2), crack["id"]
        checked += 1
    assert checked >= 3


def test_frames_follow_the_camera_axis_and_direction():
    x_axis = SyntheticDrive(0.4, seed=5, width=96, height=64)
    flipped = SyntheticDrive(0.4, seed=5, width=96, height=64,
                             config=PipelineConfig(camera=CameraConfig(direction=-1)))
    rows = SyntheticDrive(0.4, seed=5, width=64, height=96,
                          config=PipelineConfig(camera=CameraConfig(along_axis="y")))
    image = x_axis.frame(3)
    assert np.array_equal(flipped.frame(3), image[:, ::-1])
    assert rows.frame(3).shape == (96, 64, 3)
    assert np.array_equal(rows.frame(3), image.transpose(1, 0, 2))


def test_bad_drive_parameters_are_refused():
    with pytest.raises(ValueError, match="seconds"):
        SyntheticDrive(0.0)
    with pytest.raises(ValueError, match="fps"):
        SyntheticDrive(1.0, fps=0.0)
