"""Recording a run (``--record DIR``) and replaying it, on real files."""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from acquisition.recording import Recorder, RecordingError, RecordingSource, is_recording

CAMERAS = ("cam0", "cam1")
T0 = 1_700_000_000.123456


def random_image(seed: int, size: tuple[int, int] = (48, 64)) -> np.ndarray:
    """A distinct random BGR image (size = (height, width))."""
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def smooth_image(seed: int) -> np.ndarray:
    """A distinct image that JPEG keeps close: a gradient with a seed-dependent offset."""
    ramp = np.linspace(0, 150, 64, dtype=np.float32)[None, :, None]
    return np.broadcast_to(ramp + seed * 7, (48, 64, 3)).astype(np.uint8).copy()


def two_camera_frames(count: int = 12, image=random_image) -> list[tuple]:
    """(camera, seq, capture_time, chainage_m, image) for two cameras with interleaved times;
    listed camera by camera, so that replay must reorder them."""
    frames = []
    for camera_number, camera in enumerate(CAMERAS):
        for seq in range(count // 2):
            capture_time = T0 + seq / 25.0 + camera_number * 0.013
            frames.append((camera, seq, capture_time, 1234.5 + capture_time - T0,
                           image(camera_number * 100 + seq)))
    return frames


def record(directory: Path, frames: list[tuple], **options) -> Recorder:
    with Recorder(directory, source="test.mp4", run_id="run-1", fps=25.0, cameras=CAMERAS,
                  **options) as recorder:
        for frame in frames:
            recorder.write(*frame)
    return recorder


def manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


def test_round_trip_png_replays_in_capture_time_order(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    frames = two_camera_frames()
    recorder = record(directory, frames)
    assert recorder.frames_written == 12
    data = manifest(directory)
    assert data["format"] == "crackscan-recording" and data["version"] == 1
    assert data["complete"] is True and data["frames"] == 12
    assert data["cameras"] == list(CAMERAS) and data["encoding"] == "png"
    assert sorted(p.name for p in (directory / "cam1").iterdir()) == [
        f"{seq:08d}.png" for seq in range(6)]
    assert is_recording(directory)

    with RecordingSource(directory) as source:
        assert source.fps == 25.0 and source.cameras == CAMERAS
        assert "12 frames" in source.description and "cam0, cam1" in source.description
        replayed = list(source)
    expected = sorted(frames, key=lambda frame: frame[2])
    assert [(f.camera_id, f.index) for f in replayed] == [(e[0], e[1]) for e in expected]
    for got, (camera, seq, capture_time, chainage_m, image) in zip(replayed, expected,
                                                                   strict=True):
        assert (got.camera_id, got.index) == (camera, seq)
        assert got.capture_time == capture_time and got.chainage_m == chainage_m
        assert got.offset_s == capture_time - expected[0][2]
        assert np.array_equal(got.image, image)


def test_an_image_folder_is_not_a_recording(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "0001.png"), random_image(1))
    assert not is_recording(tmp_path)
    assert not is_recording(tmp_path / "0001.png")


def test_jpeg_recording_is_close_and_its_metadata_exact(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    frames = two_camera_frames(image=smooth_image)
    record(directory, frames, encoding="jpeg", jpeg_quality=90)
    assert manifest(directory)["encoding"] == "jpeg"
    assert {p.suffix for p in (directory / "cam0").iterdir()} == {".jpg"}
    replayed = {(f.camera_id, f.index): f for f in RecordingSource(directory)}
    for camera, seq, capture_time, chainage_m, image in frames:
        got = replayed[camera, seq]
        assert got.capture_time == capture_time and got.chainage_m == chainage_m
        assert np.abs(got.image.astype(int) - image).mean() < 3


def test_a_slow_disk_holds_capture_back_but_drops_nothing(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "rec"
    frames = [("cam0", seq, T0 + seq, float(seq), random_image(seq, (120, 160)))
              for seq in range(30)]
    with caplog.at_level(logging.WARNING, logger="acquisition.recording"):
        recorder = record(directory, frames, queue_frames=2, writers=1)
    assert recorder.frames_written == 30
    assert len(list((directory / "cam0").glob("*.png"))) == 30
    with open(directory / "frames.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert sorted(int(row["seq"]) for row in rows) == list(range(30))
    assert all((directory / row["file"]).is_file() for row in rows)
    assert sum("slower than the camera" in r.getMessage() for r in caplog.records) == 1


def test_refuses_a_directory_that_is_not_new(tmp_path: Path) -> None:
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(RecordingError, match="not empty; choose a new"):
        Recorder(tmp_path / "other", source="s", run_id="r", fps=25.0, cameras=CAMERAS)
    record(tmp_path / "rec", two_camera_frames(2))
    with pytest.raises(RecordingError, match="already holds a recording; choose a new DIR"):
        Recorder(tmp_path / "rec", source="s", run_id="r", fps=25.0, cameras=CAMERAS)
    (tmp_path / "empty").mkdir()
    record(tmp_path / "empty", two_camera_frames(2))  # an empty folder is fine
    assert is_recording(tmp_path / "empty")


def test_bad_frames_are_refused_at_write(tmp_path: Path) -> None:
    with Recorder(tmp_path / "rec", source="s", run_id="r", fps=25.0,
                  cameras=CAMERAS) as recorder:
        with pytest.raises(RecordingError, match="not one of"):
            recorder.write("cam9", 0, T0, 0.0, random_image(0))
        recorder.write("cam0", 5, T0, 0.0, random_image(0))
        with pytest.raises(RecordingError, match="seq must be"):
            recorder.write("cam0", 5, T0, 0.0, random_image(0))
        with pytest.raises(RecordingError, match="uint8 HxWx3"):
            recorder.write("cam0", 6, T0, 0.0, np.zeros((4, 4), np.uint8))


def test_a_write_error_surfaces_on_a_later_write_and_on_close(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    recorder = Recorder(directory, source="s", run_id="r", fps=25.0, cameras=CAMERAS)
    (directory / "cam1").rmdir()
    (directory / "cam1").write_text("a file where the camera's folder should be")
    recorder.write("cam1", 0, T0, 0.0, random_image(0))
    deadline = time.monotonic() + 5
    with pytest.raises(RecordingError, match="could not be written") as raised:
        for seq in range(1000):  # cam0 frames are fine; the cam1 error shows on a later write
            recorder.write("cam0", seq, T0 + seq, 0.0, random_image(seq))
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    assert "cam1/00000000.png" in str(raised.value)
    with pytest.raises(RecordingError, match="could not be written"):
        recorder.close()
    data = manifest(directory)
    assert data["complete"] is False and "cam1/00000000.png" in data["error"]


def test_an_incomplete_recording_replays_the_listed_frames(tmp_path: Path, caplog) -> None:
    directory = tmp_path / "rec"
    frames = two_camera_frames()
    record(directory, frames)
    data = manifest(directory)
    data.update(complete=False, frames=0)  # as written at the start: the PC lost power
    (directory / "manifest.json").write_text(json.dumps(data))
    with open(directory / "frames.csv", "a", newline="") as file:
        file.write("cam0,6,17000000")  # a row cut short by the power loss
    with caplog.at_level(logging.WARNING, logger="acquisition.recording"):
        replayed = list(RecordingSource(directory))
    assert len(replayed) == 12 and all(frame.image is not None for frame in replayed)
    messages = " ".join(record.getMessage() for record in caplog.records)
    assert "incomplete" in messages and "line 14 is cut short" in messages


def test_a_missing_image_is_a_bad_frame(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    record(directory, two_camera_frames())
    (directory / "cam0" / "00000002.png").unlink()
    (directory / "cam1" / "00000003.png").write_bytes(b"\x89PNG cut")
    replayed = {(f.camera_id, f.index): f for f in RecordingSource(directory)}
    assert len(replayed) == 12
    bad = {key for key, frame in replayed.items() if frame.image is None}
    assert bad == {("cam0", 2), ("cam1", 3)}
    assert replayed["cam0", 2].capture_time is not None


def test_a_damaged_frame_list_or_manifest_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "rec"
    record(directory, two_camera_frames())
    csv_path = directory / "frames.csv"
    lines = csv_path.read_text().splitlines(keepends=True)
    fields = lines[2].rstrip("\r\n").split(",")
    fields[1] = "x"  # the second frame's seq
    lines[2] = ",".join(fields) + "\r\n"
    csv_path.write_text("".join(lines))
    with pytest.raises(RecordingError, match=r"frames\.csv line 3: seq 'x'"):
        RecordingSource(directory)

    csv_path.unlink()
    with pytest.raises(RecordingError, match=r"frames\.csv not found"):
        RecordingSource(directory)

    (directory / "manifest.json").write_text("{not json")
    assert is_recording(directory) is False  # no frames.csv either: not a recording
    (directory / "frames.csv").write_text("camera,seq,capture_time,chainage_m,file\n")
    assert is_recording(directory)  # damaged manifest next to a frame list: say so on open
    with pytest.raises(RecordingError, match=r"manifest\.json cannot be read"):
        RecordingSource(directory)
