"""Live capture sources: spec parsing, real OpenCV captures of a video file standing in for a
camera, and the reconnect logic against captures that fail and recover (fake clock and sleep)."""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from acquisition.cameras import (
    CaptureSettings,
    CaptureSource,
    gstreamer_available,
    is_capture_spec,
    open_capture,
    redact,
)
from acquisition.frames import SourceError

VIDEO_FPS = 20.0


def grey_level(index: int) -> int:
    """The grey level of test frame ``index``: distinct, and far apart enough to survive mp4v."""
    return 20 + 10 * index


def write_video(path: Path, count: int, size: tuple[int, int] = (64, 48)) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, size)
    assert writer.isOpened()
    for index in range(count):
        writer.write(np.full((size[1], size[0], 3), grey_level(index), np.uint8))
    writer.release()
    return path


def frame_number(image: np.ndarray) -> int:
    """Which test frame an image is, from its grey level."""
    return round((float(image.mean()) - 20) / 10)


class FakeTime:
    """A monotonic clock that only moves when slept on; records every sleep."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def scripted_opener(video: Path, missing: Path, plan: list[bool]):
    """An opener whose n-th open replays ``video`` (its end looks like a lost stream) if
    ``plan[n]``, else fails like a camera that is gone (a capture that is not opened); opens past
    the plan fail."""
    opens = iter(plan)

    def opener() -> cv2.VideoCapture:
        return cv2.VideoCapture(str(video if next(opens, False) else missing))

    return opener


@pytest.fixture(scope="module")
def short_video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("cameras") / "short.mp4", 5)


@pytest.fixture(scope="module")
def video(tmp_path_factory) -> Path:
    return write_video(tmp_path_factory.mktemp("cameras") / "drive.mp4", 20)


# --- specs --------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec", ["camera:0", "camera:12", " CAMERA:1", "/dev/video0",
                                  "/dev/v4l/by-id/usb-cam-video-index0", "rtsp://10.0.0.5/live",
                                  "rtsps://user:pw@cam.local:322/s1", "RTSP://cam/x",
                                  "gst:videotestsrc ! appsink"])
def test_capture_specs(spec: str) -> None:
    assert is_capture_spec(spec)


@pytest.mark.parametrize("spec", ["drive.mp4", "frames/", "/data/run1/drive.mp4", "synthetic",
                                  "synthetic:30", "http://cam/x.mjpg", "/dev/null", "camera.mp4"])
def test_non_capture_specs(spec: str) -> None:
    assert not is_capture_spec(spec)


@pytest.mark.parametrize(("spec", "message"), [("camera:x", "camera:N"), ("camera:", "camera:N"),
                                               ("gst:", "gst:PIPELINE"),
                                               ("drive.mp4", "not a camera or stream")])
def test_bad_specs(spec: str, message: str) -> None:
    with pytest.raises(SourceError, match=message):
        open_capture(spec, CaptureSettings(open_timeout_s=0.5))


def test_redact_hides_rtsp_password() -> None:
    assert redact("rtsp://admin:s3cret@10.0.0.5:554/live") == "rtsp://admin:***@10.0.0.5:554/live"
    assert redact("rtsp://10.0.0.5/live") == "rtsp://10.0.0.5/live"
    assert redact("camera:0") == "camera:0"


# --- opening ------------------------------------------------------------------------------------

def test_missing_camera_is_a_clear_error() -> None:
    started = time.monotonic()
    with pytest.raises(SourceError, match=r"camera:97 did not open: .*v4l2-ctl --list-devices"):
        open_capture("camera:97", CaptureSettings(open_timeout_s=0.5))
    assert time.monotonic() - started < 5


def test_missing_device_path_is_a_clear_error() -> None:
    with pytest.raises(SourceError, match=r"/dev/video97 did not open: no such device"):
        open_capture("/dev/video97", CaptureSettings(open_timeout_s=0.5))


def test_unreachable_rtsp_stream_is_a_clear_error_without_the_password() -> None:
    with socket.socket() as probe:  # a local port nothing listens on: refused at once
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    spec = f"rtsp://admin:s3cret@127.0.0.1:{port}/live"
    with pytest.raises(SourceError, match=r"did not open: check the URL") as caught:
        open_capture(spec, CaptureSettings(open_timeout_s=1.0))
    assert f"rtsp://admin:***@127.0.0.1:{port}/live" in str(caught.value)
    assert "s3cret" not in str(caught.value)


def test_no_first_frame_in_time_is_an_error(video: Path) -> None:
    def exhausted() -> cv2.VideoCapture:  # opens, but has no frame left to give
        capture = cv2.VideoCapture(str(video))
        while capture.read()[0]:
            pass
        return capture

    fake = FakeTime()
    with pytest.raises(SourceError, match=r"camera:5 opened but gave no frame within 0.5s"):
        CaptureSource("camera:5", CaptureSettings(open_timeout_s=0.5), opener=exhausted,
                      clock=fake.clock, sleep=fake.sleep)
    assert 0.5 <= fake.now - 100.0 < 0.6


@pytest.mark.skipif(gstreamer_available(), reason="this OpenCV has GStreamer")
def test_gst_without_gstreamer_says_so() -> None:
    with pytest.raises(SourceError, match=r"no GStreamer .*rtsp://"):
        open_capture("gst:videotestsrc ! videoconvert ! appsink", CaptureSettings())


@pytest.mark.skipif(not gstreamer_available(), reason="this OpenCV has no GStreamer")
def test_gst_pipeline_yields_frames() -> None:
    spec = ("gst:videotestsrc num-buffers=10 ! video/x-raw,width=64,height=48 ! videoconvert "
            "! appsink")
    with open_capture(spec, CaptureSettings(reconnect_timeout_s=0.5)) as source:
        frames = list(itertools.islice(source, 5))
    assert [frame.index for frame in frames] == [0, 1, 2, 3, 4]
    assert frames[0].image.shape == (48, 64, 3)


# --- reading ------------------------------------------------------------------------------------

def test_real_capture_yields_frames_in_order(video: Path) -> None:
    source = CaptureSource("rtsp://camera.test/live", CaptureSettings(),
                           opener=lambda: cv2.VideoCapture(str(video)))
    with source:
        assert source.fps == VIDEO_FPS
        assert source.description == "capture rtsp://camera.test/live (64x48)"
        frames = list(itertools.islice(source, 20))
    assert next(iter(source), None) is None  # closed: the source ends
    assert [frame.index for frame in frames] == list(range(20))
    assert [frame_number(frame.image) for frame in frames] == list(range(20))
    assert all(frame.image.shape == (48, 64, 3) and frame.image.dtype == np.uint8
               for frame in frames)
    offsets = [frame.offset_s for frame in frames]
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and offsets[-1] > 0
    assert all(abs(frame.capture_time - time.time()) < 5 for frame in frames)
    assert source.gaps == [] and source.reconnects == 0


def test_reconnect_backs_off_leaves_a_gap_and_gives_up(short_video: Path, tmp_path: Path,
                                                        caplog) -> None:
    caplog.set_level(logging.WARNING, logger="acquisition.cameras")
    fake = FakeTime()
    # open 1 plays 5 frames, opens 2-3 fail, open 4 plays 5 frames again, then all fail
    opener = scripted_opener(short_video, tmp_path / "gone.mp4", [True, False, False, True])
    settings = CaptureSettings(reconnect_initial_s=0.5, reconnect_max_s=4.0,
                               reconnect_timeout_s=20.0)
    with CaptureSource("camera:0", settings, opener=opener, clock=fake.clock,
                       sleep=fake.sleep) as source:
        frames = list(source)

    # lost after frame 4 at t=0: waits 0.5, 1, 2 and is back at 3.5 s = 70 frame periods later
    assert [frame.index for frame in frames] == [0, 1, 2, 3, 4, 74, 75, 76, 77, 78]
    assert [frame_number(frame.image) for frame in frames] == [0, 1, 2, 3, 4] * 2
    assert [frame.offset_s for frame in frames] == [0.0] * 5 + [3.5] * 5
    assert source.gaps == [(5, 69)]
    assert source.reconnects == 1
    # lost again: doubling up to 4 s, the last wait cut to the 20 s without a frame
    assert fake.sleeps == [0.5, 1.0, 2.0, 0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 0.5]
    assert fake.now == 100.0 + 3.5 + 20.0
    assert "reconnected after 3.5s" in caplog.text
    assert "frames 5..73 missing" in caplog.text
    errors = [record for record in caplog.records if record.levelno == logging.ERROR]
    assert len(errors) == 1 and "giving up" in errors[0].getMessage()


def test_close_from_another_thread_ends_a_back_off(short_video: Path, tmp_path: Path) -> None:
    opener = scripted_opener(short_video, tmp_path / "gone.mp4", [True])
    source = CaptureSource("camera:0", CaptureSettings(reconnect_initial_s=30.0), opener=opener)
    closer = threading.Timer(0.3, source.close)
    started = time.monotonic()
    closer.start()
    try:
        frames = list(source)  # 5 frames, then waits 30 s to reconnect until closed
    finally:
        closer.cancel()
    assert len(frames) == 5
    assert time.monotonic() - started < 5


def test_settings_are_requested_and_what_the_driver_gives_is_logged(video: Path, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="acquisition.cameras")
    settings = CaptureSettings(width=1280, height=720, fps=30.0)
    with CaptureSource("camera:0", settings, opener=lambda: cv2.VideoCapture(str(video))) as source:
        frame = next(iter(source))
    assert frame.image.shape == (48, 64, 3)
    assert source.fps == VIDEO_FPS  # what the driver reports, not what was asked
    assert "camera:0: asked for width 1280, the driver gives 64" in caplog.text
    assert "camera:0: asked for height 720, the driver gives 48" in caplog.text
    assert "camera:0: asked for fps 30, the driver gives 20" in caplog.text
