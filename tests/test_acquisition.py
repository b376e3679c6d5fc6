"""Acquisition: frame sources on real files, and the service over real ZeroMQ sockets."""

from __future__ import annotations

import re
import statistics
import threading
import time

import cv2
import numpy as np
import pytest
import zmq
from prometheus_client import REGISTRY
from support import Consumer, frame_image, index_of, run_in_thread, write_video

from acquisition.dispatch import MAX_SENDS
from acquisition.frames import SourceError, SourceFrame
from acquisition.service import STOPPED_DRAIN_S, new_run_id, run_acquisition
from acquisition.sources import open_source
from crackscan.config import AcquisitionConfig, PipelineConfig
from crackscan.wire import FrameMessage

CONFIG = PipelineConfig()


def avi_frame_chunks(data: bytes) -> list[tuple[int, int]]:
    """(offset, size) of each frame chunk's data in an AVI file's 'movi' list."""
    position = data.index(b"movi") + 4
    chunks = []
    while position + 8 <= len(data):
        kind, size = data[position:position + 4], int.from_bytes(data[position + 4:position + 8],
                                                                  "little")
        if kind == b"idx1":
            break
        if kind.endswith(b"dc"):
            chunks.append((position + 8, size))
        position += 8 + size + (size & 1)
    return chunks


def read_all(spec: str, config: PipelineConfig = CONFIG) -> list[SourceFrame]:
    with open_source(spec, config) as source:
        return list(source)


# --- sources ------------------------------------------------------------------------------------

def test_video_source_reads_every_frame_in_order(tmp_path):
    path = write_video(tmp_path / "drive.mp4", 15, fps=12.5)
    with open_source(str(path), CONFIG) as source:
        assert source.fps == pytest.approx(12.5)
        assert "drive.mp4" in source.description
        frames = list(source)
    assert [f.index for f in frames] == list(range(15))
    assert [f.offset_s for f in frames] == pytest.approx([i / 12.5 for i in range(15)])
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [index_of(f.image) for f in frames] == list(range(15))


def test_video_source_counts_a_corrupt_frame_and_goes_on(tmp_path):
    path = write_video(tmp_path / "drive.avi", 12, fourcc="MJPG", fps=10.0)
    data = bytearray(path.read_bytes())
    offset, size = avi_frame_chunks(bytes(data))[5]
    data[offset:offset + size] = bytes(size)  # frame 5 is no longer a JPEG
    path.write_bytes(bytes(data))

    frames = read_all(str(path))
    assert [f.index for f in frames] == list(range(12))
    assert frames[5].image is None
    good = [f for f in frames if f.image is not None]
    assert [index_of(f.image) for f in good] == [f.index for f in good]  # no shift after it
    assert frames[6].offset_s == pytest.approx(0.6)


def test_video_source_counts_a_truncated_tail_as_bad_frames(tmp_path):
    path = write_video(tmp_path / "drive.avi", 12, fourcc="MJPG", fps=10.0)
    data = path.read_bytes()
    offset, _ = avi_frame_chunks(data)[8]
    path.write_bytes(data[:offset - 8])  # cut before frame 8: the header still says 12 frames

    frames = read_all(str(path))
    assert [f.index for f in frames] == list(range(12))
    assert [f.image is None for f in frames] == [False] * 8 + [True] * 4
    assert [index_of(f.image) for f in frames[:8]] == list(range(8))


def test_undecodable_or_cut_short_video_is_a_source_error(tmp_path):
    garbage = tmp_path / "garbage.mp4"
    garbage.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(str(garbage), CONFIG)
    whole = write_video(tmp_path / "whole.mp4", 10).read_bytes()
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(whole[:len(whole) // 2])  # OpenCV writes the mp4 index last
    with pytest.raises(SourceError, match="cannot open video"):
        open_source(str(cut), CONFIG)


def test_folder_source_sorts_by_name_and_counts_unreadable_images(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    names = ["f03.png", "f01.jpg", "f10.bmp", "f02.png", "f04.tif"]
    for name in names:
        assert cv2.imwrite(str(folder / name), frame_image(int(name[1:3])))
    grey = frame_image(5)[:, :, 0]
    assert cv2.imwrite(str(folder / "f05.png"), grey)
    (folder / "f06.jpg").write_bytes(b"\xff\xd8\xff garbage, not a JPEG")
    (folder / "notes.txt").write_text("not an image")

    config = PipelineConfig(acquisition=AcquisitionConfig(folder_fps=4.0))
    with open_source(str(folder), config) as source:
        assert source.fps == 4.0
        frames = list(source)
    assert [f.index for f in frames] == list(range(7))
    assert [f.offset_s for f in frames] == pytest.approx([i / 4.0 for i in range(7)])
    assert frames[5].image is None  # f06.jpg, sorted after f05.png
    decoded = [index_of(f.image) for f in frames if f.image is not None]
    assert decoded == [1, 2, 3, 4, 5, 10]
    assert all(f.image.shape == (48, 64, 3) for f in frames if f.image is not None)
    single = read_all(str(folder / "f10.bmp"), config)  # one image file is a one-frame source
    assert len(single) == 1 and index_of(single[0].image) == 10


def test_empty_folder_and_missing_path_are_source_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no frames here")
    with pytest.raises(SourceError, match="no images"):
        open_source(str(tmp_path / "empty"), CONFIG)
    with pytest.raises(SourceError, match="not found"):
        open_source(str(tmp_path / "nowhere.mp4"), CONFIG)


@pytest.mark.parametrize("spec,match", [
    ("camera:7", "camera:7 did not open"),  # no cameras on a test machine
    ("rtsp://127.0.0.1:9/stream", "rtsp://127.0.0.1:9/stream"),  # nothing listens on port 9
    ("http://example.invalid/video", "not supported"),
])
def test_a_camera_or_stream_that_is_not_there_is_a_clear_error(spec, match):
    quick = PipelineConfig(camera={"capture": {"open_timeout_s": 1.0}})
    with pytest.raises(SourceError, match=re.escape(match)):
        open_source(spec, quick)


def test_synthetic_source(tmp_path):
    frames = read_all("synthetic:0.2")
    assert [f.index for f in frames] == list(range(5))
    assert [f.offset_s for f in frames] == pytest.approx([0, 0.04, 0.08, 0.12, 0.16])
    assert all(f.image.shape == (360, 640, 3) and f.image.dtype == np.uint8 for f in frames)
    with open_source("synthetic", CONFIG) as source:
        assert source.fps == 25.0 and "250 frames" in source.description
    for bad in ("synthetic:0", "synthetic:ten"):
        with pytest.raises(SourceError, match="synthetic:SECONDS"):
            open_source(bad, CONFIG)


# --- the service --------------------------------------------------------------------------------

def test_replay_sends_every_frame_once_in_order_to_a_slow_consumer(tmp_path):
    count, fps = 30, 25.0
    path = write_video(tmp_path / "drive.mp4", count, size=(320, 240), fps=fps)
    config = PipelineConfig(acquisition=AcquisitionConfig(speed_kmh=36.0, start_chainage_m=100.0))
    consumer = Consumer(tmp_path, delay_s=0.03)
    try:
        with open_source(str(path), config) as source:
            end = run_in_thread(consumer, source, "replay", config, source_label="drive.mp4")
    finally:
        consumer.close()

    start = consumer.start
    assert start.run_id == "run-1" and start.source == "drive.mp4" and start.mode == "replay"
    assert start.cameras == ("cam0",) and start.config == config.model_dump(mode="json")
    assert [m.seq for m in consumer.received] == list(range(count))
    for message in consumer.received:
        offset = message.seq / fps
        assert message.run_id == "run-1" and message.camera_id == "cam0"
        assert message.chainage_m == pytest.approx(100.0 + 10.0 * offset)
        assert message.capture_time == pytest.approx(start.started_at + offset)
        assert message.image.shape == (240, 320, 3) and index_of(message.image) == message.seq
    assert end == consumer.end
    assert (end.frames_read, end.frames_sent, end.frames_dropped, end.frames_bad) == (count, count,
                                                                                     0, 0)
    assert end.reason == "end_of_source"
    # the end is sent once every frame sent is stored
    assert consumer.received_before_end == count and consumer.stored == set(range(count))


def test_replay_sends_a_frame_no_further_than_the_workers_credit(tmp_path):
    """A worker that gives credit for two frames and takes none gets two, and the reader waits
    (replay never drops); a stop then ends the run with those two sent."""
    path = write_video(tmp_path / "drive.mp4", 30, size=(64, 48))
    consumer = Consumer(tmp_path, read_frames=False, capacity=2)
    stop = threading.Event()
    timer = threading.Timer(1.0, stop.set)
    timer.start()
    try:
        with open_source(str(path), CONFIG) as source:
            end = run_in_thread(consumer, source, "replay", CONFIG, stop, finish=stop)
    finally:
        timer.cancel()
        consumer.close()
    assert end.reason == "stopped" and end.frames_sent == 2 and end.frames_dropped == 1


@pytest.mark.parametrize("trouble", ["fail", "lose"])
def test_a_frame_failed_or_its_result_lost_is_sent_again_until_stored(tmp_path, trouble):
    """A worker that fails a frame (twice), or a management that loses a result (twice): the
    frame goes out again, first in line, and the run ends with every frame stored."""
    path = write_video(tmp_path / "drive.mp4", 12, size=(64, 48))
    config = PipelineConfig(acquisition=AcquisitionConfig(ack_timeout_s=0.3))
    consumer = Consumer(tmp_path, **{trouble: {4: 2}})
    def resent() -> float:
        return REGISTRY.get_sample_value("crackscan_acquisition_dispatch_total",
                                         {"event": "resent"}) or 0.0

    before = resent()
    try:
        with open_source(str(path), config) as source:
            end = run_in_thread(consumer, source, "replay", config)
    finally:
        consumer.close()
    seqs = [m.seq for m in consumer.received]
    assert seqs.count(4) == 3 and sorted(set(seqs)) == list(range(12))
    assert resent() - before == 2  # and the metric says so
    assert consumer.stored == set(range(12)) and end.frames_sent == 12
    assert end.reason == "end_of_source"


def test_a_frame_that_keeps_failing_is_given_up_after_max_sends(tmp_path, caplog):
    path = write_video(tmp_path / "drive.mp4", 6, size=(64, 48))
    consumer = Consumer(tmp_path, fail={2: 99})
    try:
        with open_source(str(path), CONFIG) as source:
            end = run_in_thread(consumer, source, "replay", CONFIG)
    finally:
        consumer.close()
    assert [m.seq for m in consumer.received].count(2) == MAX_SENDS
    assert consumer.stored == {0, 1, 3, 4, 5} and end.frames_sent == 6
    assert "frame cam0/2 given up after 3 send(s)" in caplog.text


def test_replay_of_a_folder_leaves_a_gap_for_a_bad_image(tmp_path):
    folder = tmp_path / "frames"
    folder.mkdir()
    images = {}
    for index in range(6):
        images[index] = np.random.default_rng(index).integers(0, 255, (24, 32, 3), np.uint8)
        cv2.imwrite(str(folder / f"{index:03d}.png"), images[index])
    (folder / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    config = PipelineConfig(acquisition=AcquisitionConfig(folder_fps=5.0, encoding="png",
                                                          speed_kmh=3.6))
    consumer = Consumer(tmp_path)
    try:
        with open_source(str(folder), config) as source:
            end = run_in_thread(consumer, source, "replay", config)
    finally:
        consumer.close()
    assert [m.seq for m in consumer.received] == [0, 1, 3, 4, 5]
    assert [m.chainage_m for m in consumer.received] == pytest.approx([0, 0.2, 0.6, 0.8, 1.0])
    for message in consumer.received:
        assert message.encoding == "png" and np.array_equal(message.image, images[message.seq])
    assert (end.frames_read, end.frames_sent, end.frames_dropped, end.frames_bad) == (6, 5, 0, 1)
    assert "image folder" in consumer.start.source


def test_live_mode_drops_frames_a_busy_consumer_cannot_take(tmp_path):
    count, fps = 40, 50.0
    path = write_video(tmp_path / "drive.mp4", count, size=(320, 240), fps=fps)
    config = PipelineConfig()
    consumer = Consumer(tmp_path, delay_s=0.1)
    try:
        with open_source(str(path), config) as source:
            began = time.monotonic()
            end = run_in_thread(consumer, source, "live", config)
            elapsed = time.monotonic() - began
    finally:
        consumer.close()
    assert end.reason == "end_of_source" and end.frames_read == count
    assert end.frames_dropped > 0 and end.frames_sent > 0
    assert end.frames_sent + end.frames_dropped + end.frames_bad == end.frames_read
    assert elapsed >= (count - 1) / fps * 0.9  # a recording played live keeps its frame rate
    # a frame goes only to a worker with nothing in hand: it never waits behind another
    assert end.frames_sent <= count * (1 / fps) / 0.1 + 2


def test_live_mode_gives_a_worker_that_frees_up_the_newest_frame_at_once(tmp_path):
    """A camera slower than one frame period per frame of work: the frame read while the worker
    was busy waits as the standby frame and goes out the moment the worker's slot frees, instead
    of the worker idling until the camera's next frame; an older standby is dropped."""
    count, fps, work_s = 16, 10.0, 0.15
    path = write_video(tmp_path / "drive.mp4", count, size=(320, 240), fps=fps)
    consumer = Consumer(tmp_path, delay_s=work_s)
    try:
        with open_source(str(path), PipelineConfig()) as source:
            end = run_in_thread(consumer, source, "live", PipelineConfig())
    finally:
        consumer.close()
    assert end.frames_sent + end.frames_dropped == count and end.frames_dropped > 0
    idle = [after - before for before, after
            in zip(consumer.done_at, consumer.received_at[1:], strict=False)]
    # waiting for the camera's next frame would idle 0.05 s a frame on average (0 to 0.1 s)
    assert statistics.median(idle) < 0.02, idle
    # what it is given is the newest frame: never one the camera has replaced since
    seqs = [m.seq for m in consumer.received]
    assert seqs == sorted(seqs) and all(later - earlier <= 2 for earlier, later
                                        in zip(seqs, seqs[1:], strict=False))


@pytest.mark.parametrize("finish_after_s", [1.0, pytest.param(None, marks=pytest.mark.slow)])
def test_stop_ends_a_blocked_replay_with_reason_stopped(tmp_path, finish_after_s):
    """A stop ends reading at once; the run waits for the frames already sent to be stored
    until ``finish`` (a second signal) or, without it, for at most STOPPED_DRAIN_S."""
    path = write_video(tmp_path / "drive.mp4", 40, size=(320, 240))
    config = PipelineConfig()
    consumer = Consumer(tmp_path, read_frames=False)
    stop, finish = threading.Event(), threading.Event()
    timers = [threading.Timer(0.5, stop.set)]
    if finish_after_s is not None:
        timers.append(threading.Timer(0.5 + finish_after_s, finish.set))
    try:
        with open_source(str(path), config) as source:
            for timer in timers:
                timer.start()
            began = time.monotonic()
            end = run_in_thread(consumer, source, "replay", config, stop, finish=finish)
            elapsed = time.monotonic() - began
    finally:
        for timer in timers:
            timer.cancel()
        consumer.close()
    assert end.reason == "stopped"
    assert 0 < end.frames_sent < 40
    assert end.frames_sent + end.frames_dropped + end.frames_bad == end.frames_read
    if finish_after_s is None:
        assert STOPPED_DRAIN_S <= elapsed < STOPPED_DRAIN_S + 4
    else:
        assert 1.4 <= elapsed < 4.0


class BrokenSource:
    """A source whose storage fails after three frames."""

    description, fps = "broken disk", 10.0

    def __iter__(self):
        for index in range(3):
            yield SourceFrame(index, index / self.fps, np.zeros((8, 8, 3), np.uint8))
        raise OSError("input/output error")

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_source_failing_mid_run_ends_it_with_counts(tmp_path):
    consumer = Consumer(tmp_path)
    try:
        end = run_in_thread(consumer, BrokenSource(), "replay", CONFIG)
    finally:
        consumer.close()
    assert end.reason == "source_error"
    assert (end.frames_read, end.frames_sent, end.frames_bad) == (3, 3, 0)
    assert [m.seq for m in consumer.received] == [0, 1, 2]


def test_run_ids_are_sortable_time_stamps_with_random_suffix():
    first, second = new_run_id(), new_run_id()
    assert re.fullmatch(r"\d{8}-\d{6}-[0-9a-f]{6}", first)
    assert first != second
    assert first[:15] <= second[:15]


def test_unknown_mode_is_refused(tmp_path):
    with pytest.raises(ValueError, match="mode"):
        run_acquisition(BrokenSource(), f"push+bind:ipc://{tmp_path}/f",
                        f"push+connect:ipc://{tmp_path}/c", "run-1", "fast", CONFIG,
                        threading.Event())


class OversizedSource(BrokenSource):
    """Two small frames around one of 10000 x 10000 pixels (a view: no 100 MB held)."""

    description = "line-scan camera"

    def __iter__(self):
        yield SourceFrame(0, 0.0, np.zeros((8, 8, 3), np.uint8))
        yield SourceFrame(1, 0.1, np.broadcast_to(np.uint8(0), (10_000, 10_000)))
        yield SourceFrame(2, 0.2, np.zeros((8, 8, 3), np.uint8))


def test_a_frame_no_worker_would_take_is_counted_bad_at_the_source(tmp_path, caplog):
    """Over the wire's pixel budget (or ZeroMQ's message limit) a frame would vanish downstream;
    acquisition counts it bad and says so, and the run goes on."""
    consumer = Consumer(tmp_path)
    try:
        end = run_in_thread(consumer, OversizedSource(), "replay", CONFIG)
    finally:
        consumer.close()
    assert [m.seq for m in consumer.received] == [0, 2]
    assert (end.frames_read, end.frames_sent, end.frames_bad) == (3, 2, 1)
    assert any("frame 1 cannot be sent: 10000 x 10000 pixels is over the wire's budget"
               in record.getMessage() for record in caplog.records)


def test_the_pixel_budget_is_a_config_key_the_workers_share(tmp_path, caplog):
    """``acquisition.max_frame_pixels`` lowered below a frame: acquisition counts it bad, and a
    worker with the same config refuses such a frame from its header (before decoding)."""
    from inference.worker import WorkerStats, _receive

    config = PipelineConfig(acquisition=AcquisitionConfig(max_frame_pixels=50))
    consumer = Consumer(tmp_path)
    try:
        end = run_in_thread(consumer, BrokenSource(), "replay", config)  # 8 x 8 frames
    finally:
        consumer.close()
    assert (end.frames_read, end.frames_sent, end.frames_bad) == (3, 0, 3)
    assert "over the wire's budget of 50 pixels" in caplog.text

    context = zmq.Context()
    sender, receiver = context.socket(zmq.PAIR), context.socket(zmq.PAIR)
    sender.bind(f"ipc://{tmp_path}/p")
    receiver.connect(f"ipc://{tmp_path}/p")
    frame = FrameMessage(run_id="r", camera_id="cam0", seq=0, capture_time=0.0, chainage_m=0.0,
                         image=np.zeros((8, 8), np.uint8), encoding="png")
    sender.send_multipart(frame.to_frames())
    stats = WorkerStats()
    assert _receive(receiver, stats, config.acquisition.max_frame_pixels) is None
    assert stats.malformed == 1
    sender.close(0)
    receiver.close(0)
    context.term()


def test_the_end_waits_for_slow_frames_past_the_drain_timeout(tmp_path):
    """A worker that takes 1 s a frame (an 8000 x 8000 line-scan frame takes far longer) holds
    the last frames well past ``drain_s``: the run waits while it works on them, and sends its
    end once every frame is stored."""
    path = write_video(tmp_path / "drive.mp4", 3, size=(64, 48))
    consumer = Consumer(tmp_path, delay_s=1.0)
    try:
        with open_source(str(path), CONFIG) as source:
            end = run_in_thread(consumer, source, "replay", CONFIG, drain_s=0.3)
    finally:
        consumer.close()
    assert end.reason == "end_of_source" and end.frames_sent == 3
    assert consumer.stored == {0, 1, 2} and consumer.received_before_end == 3
