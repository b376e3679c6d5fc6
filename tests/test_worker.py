"""The inference worker over real ZeroMQ sockets with the bundled model: micro-batches keep each
frame's identity and order, and give the same results as one frame at a time."""

from __future__ import annotations

import threading
import time

import cv2
import numpy as np
import pytest
import zmq
from support import crack_record

from crackscan.config import PipelineConfig
from crackscan.wire import (
    HEARTBEAT_S,
    CreditMessage,
    FrameMessage,
    HeartbeatMessage,
    ResultMessage,
    decode,
)
from inference.backends import open_segmenter
from inference.worker import crack_photos, process_frame, run_worker


def frames_of_two_sizes(count: int = 10) -> list[FrameMessage]:
    rng = np.random.default_rng(0)
    frames = []
    for seq in range(count):
        shape = (96, 128, 3) if seq % 3 else (64, 160, 3)
        image = rng.integers(90, 200, shape, dtype=np.uint8)
        image[:, 40 + seq:43 + seq] = 30  # a dark crack-like stroke that moves with seq
        frames.append(FrameMessage(run_id="run-b", camera_id="cam0", seq=seq,
                                   capture_time=1.7e9 + seq, chainage_m=seq * 0.1, image=image,
                                   encoding="raw"))
    return frames


def serve_frames(tmp_path, frames: list[FrameMessage], segmenter, config, worker: str = "w1"
                 ) -> tuple[list[ResultMessage], list[CreditMessage], int]:
    """``run_worker`` in a thread, and this test as acquisition (the frame link's binding side:
    frames go out only against the worker's credit) and management (results arrive). Returns
    the results, the worker's credit messages and how many heartbeats came."""
    context = zmq.Context()
    acquisition, management = context.socket(zmq.ROUTER), context.socket(zmq.ROUTER)
    acquisition.bind(f"ipc://{tmp_path}/frames")
    management.bind(f"ipc://{tmp_path}/results")
    stop = threading.Event()
    thread = threading.Thread(target=run_worker, args=(
        f"pull+connect:ipc://{tmp_path}/frames", f"push+connect:ipc://{tmp_path}/results",
        segmenter, config, stop, worker))
    results, credits, beats = [], [], 0
    held, queue = 0, list(frames)
    try:
        thread.start()
        deadline = time.monotonic() + 60
        while queue or held or not credits:  # until every frame's slot came back ...
            assert time.monotonic() < deadline, f"{len(results)} results"
            if management.poll(10):
                _, *parts = management.recv_multipart()
                results.append(ResultMessage.from_frames(parts))
            while acquisition.poll(10):
                peer, *parts = acquisition.recv_multipart()
                message = decode(parts)
                if isinstance(message, HeartbeatMessage):
                    beats += 1
                    continue
                assert peer == worker.encode() and message.worker == worker
                credits.append(message)
                held -= message.consumed
                while queue and held < message.capacity:  # all it may hold: batches wait
                    acquisition.send_multipart([peer, *queue.pop(0).to_frames()])
                    held += 1
        while management.poll(500):  # ... and the results sent before it
            _, *parts = management.recv_multipart()
            results.append(ResultMessage.from_frames(parts))
    finally:
        stop.set()
        thread.join(timeout=10)
        acquisition.close(linger=0)
        management.close(linger=0)
        context.term()
    return results, credits, beats


def test_micro_batches_keep_order_identity_and_results(tmp_path):
    config = PipelineConfig(inference={"batch_frames": 4, "batch_wait_ms": 200, "threads": 1})
    batched = open_segmenter(None, threads=1, batch_frames=4)
    assert batched.backend == "onnxruntime+batch4"
    frames = frames_of_two_sizes()
    results, credits, _ = serve_frames(tmp_path, frames, batched, config)
    # the worker introduced itself (a batch and one more), then returned every frame's slot
    assert credits[0].consumed == 0 and credits[0].capacity == 5
    assert sum(c.consumed for c in credits) == len(frames)
    assert [key for c in credits for key in c.done] == [("cam0", f.seq) for f in frames]
    assert batched.batches_run < len(frames)  # frames really went through in batches
    assert [r.seq for r in results] == list(range(len(frames)))
    single = open_segmenter(None, threads=1)
    for frame, result in zip(frames, results, strict=True):
        alone = process_frame(frame, single, config, "w1")
        assert result.mask.shape == frame.image.shape[:2]
        assert (result.chainage_m, result.capture_time) == (frame.chainage_m,
                                                            frame.capture_time)
        assert np.array_equal(result.mask, alone.mask), frame.seq
        assert [c.length_mm for c in result.cracks] == [c.length_mm for c in alone.cracks]
        assert [p.crack for p in result.photos] == [c.index for c in result.cracks]


def test_a_frame_that_fails_is_reported_failed_and_a_slow_frame_keeps_the_heart_beating(
        tmp_path):
    """A frame the segmenter cannot take is reported failed (its slot returned, acquisition
    sends it again); while one frame takes long, the heartbeat thread still says the worker is
    alive."""

    class SlowOnOdd:
        def __init__(self, inner):
            self.inner, self.info = inner, inner.info

        def segment(self, images):
            if images[0].shape[0] == 7:
                raise ValueError("cannot segment this")
            time.sleep(4 * HEARTBEAT_S)
            return self.inner.segment(images)

    config = PipelineConfig(inference={"threads": 1})
    frames = frames_of_two_sizes(3)
    frames[1] = FrameMessage(run_id="run-b", camera_id="cam0", seq=1, capture_time=1.7e9,
                             chainage_m=0.0, image=np.zeros((7, 9, 3), np.uint8))
    results, credits, beats = serve_frames(tmp_path, frames, SlowOnOdd(open_segmenter(
        None, threads=1)), config)
    assert [r.seq for r in results] == [0, 2]
    assert [key for c in credits for key in c.failed] == [("cam0", 1)]
    assert beats >= 4


def test_a_lining_model_s_joint_is_a_lining_feature_never_a_crack(tmp_path) -> None:
    """With a model that has lining classes, each region of a lining class becomes a
    FeatureRecord of the result (located in tunnel units), and the crack measurement sees only
    the crack class."""
    import cv2
    from support import lining_rule_model

    segmenter = open_segmenter(lining_rule_model(tmp_path / "lining.onnx"), threads=1)
    image = np.full((96, 256, 3), 150, np.uint8)
    cv2.line(image, (10, 20), (80, 70), (30, 30, 30), 3)  # a dark crack
    image[:, 150:158] = (40, 40, 200)  # a red ring joint across the frame (BGR)
    frame = FrameMessage(run_id="run-l", camera_id="cam0", seq=0, capture_time=1.7e9,
                         chainage_m=100.0, image=image, encoding="raw")
    config = PipelineConfig(camera={"id": "cam0", "mm_per_px_along": 2.0,
                                    "mm_per_px_across": 2.0, "along_axis": "x"})
    result = ResultMessage.from_frames(process_frame(frame, segmenter, config, "w1").to_frames())
    assert len(result.cracks) == 1 and result.cracks[0].bbox_px[0] < 100  # the joint is no crack
    (joint,) = result.features
    assert joint.kind == "joint" and joint.bbox_px == (150, 0, 8, 96)
    assert abs(joint.orientation_deg - 90) < 1  # round the ring
    assert joint.chainage_start_m == pytest.approx(100 + (150 - 127.5) * 0.002)
    assert joint.arc_end_mm - joint.arc_start_mm == pytest.approx(95 * 2.0)
    assert joint.length_mm == pytest.approx(96 * 2.0, abs=2)
    assert joint.area_px == 8 * 96


def test_each_crack_s_photo_shows_its_box_with_a_margin_within_the_frame():
    ramp = (np.arange(300)[:, None] + np.arange(900)[None, :]) // 5  # smooth: JPEG keeps it
    image = np.dstack([ramp, ramp[::-1], ramp[:, ::-1]]).astype(np.uint8)
    cracks = [crack_record(0, 1.0, 1.0, 10.0, bbox_px=(0, 100, 40, 20)),      # at the edge
              crack_record(1, 1.0, 1.0, 10.0, bbox_px=(100, 50, 800, 100))]   # long: scaled
    small, large = crack_photos(image, cracks, max_px=320, quality=85)
    assert small.box_px == (0, 84, 56, 52)  # 16 px margin, clipped at x = 0
    decoded = cv2.imdecode(np.frombuffer(small.jpeg, np.uint8), cv2.IMREAD_COLOR)
    assert decoded.shape == (52, 56, 3)
    assert np.abs(decoded.astype(int) - image[84:136, 0:56]).mean() < 3  # the frame's pixels
    assert large.box_px == (0, 0, 900, 300)  # 200 px margin (a quarter), clipped all round
    assert cv2.imdecode(np.frombuffer(large.jpeg, np.uint8), cv2.IMREAD_COLOR).shape == \
        (107, 320, 3)
    assert crack_photos(image, cracks, max_px=0, quality=85) == ()
    grey = crack_photos(image[:, :, 0], cracks[:1], max_px=320, quality=85)[0]
    assert cv2.imdecode(np.frombuffer(grey.jpeg, np.uint8), cv2.IMREAD_UNCHANGED).ndim == 2
