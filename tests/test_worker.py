"""The inference worker over real ZeroMQ sockets with the bundled model: micro-batches keep each
frame's identity and order, and give the same results as one frame at a time."""

from __future__ import annotations

import threading

import numpy as np
import zmq

from crackscan.config import PipelineConfig
from crackscan.wire import FrameMessage, ResultMessage
from inference.backends import open_segmenter
from inference.worker import process_frame, run_worker


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


def test_micro_batches_keep_order_identity_and_results(tmp_path):
    config = PipelineConfig(inference={"batch_frames": 4, "batch_wait_ms": 200, "threads": 1})
    batched = open_segmenter(None, threads=1, batch_frames=4)
    assert batched.backend == "onnxruntime+batch4"
    frames = frames_of_two_sizes()
    context = zmq.Context()
    push, pull = context.socket(zmq.PUSH), context.socket(zmq.PULL)
    push.bind(f"ipc://{tmp_path}/frames")
    pull.bind(f"ipc://{tmp_path}/results")
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(
        f"pull+connect:ipc://{tmp_path}/frames", f"push+connect:ipc://{tmp_path}/results",
        batched, config, stop, "w1"))
    try:
        worker.start()
        for frame in frames:  # all at once: the worker finds batches waiting
            push.send_multipart(frame.to_frames(), copy=False)
        results = [ResultMessage.from_frames(pull.recv_multipart()) for _ in frames]
    finally:
        stop.set()
        worker.join(timeout=10)
        push.close(linger=0)
        pull.close(linger=0)
        context.term()
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
