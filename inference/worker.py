"""The inference stage: pull frames, segment, measure cracks (and, with a multi-class model,
lining features), push results.

Workers are stateless services: N of them can PULL from one frame stream (ZeroMQ fans frames out)
and PUSH into one management socket. A run's lifecycle (start, end, counting) is between
acquisition and management; a worker only turns each frame into exactly one result.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from crackscan.config import PipelineConfig
from crackscan.geometry import measure_cracks, measure_features
from crackscan.sockets import KeyRing, SocketSpec
from crackscan.wire import FrameMessage, ResultMessage, WireError, decode
from inference.segmenter import Segmenter, split_map

log = logging.getLogger(__name__)

POLL_MS = 200


@dataclass
class WorkerStats:
    frames: int = 0
    cracks: int = 0
    malformed: int = 0
    failed: int = 0
    busy_s: float = 0.0


def worker_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_frame(frame: FrameMessage, segmenter: Segmenter, config: PipelineConfig,
                  worker: str) -> ResultMessage:
    """One frame in, one result out: segmentation, thresholding and measurement."""
    return process_frames([frame], segmenter, config, worker)[0]


def process_frames(frames: list[FrameMessage], segmenter: Segmenter, config: PipelineConfig,
                   worker: str) -> list[ResultMessage]:
    """A micro-batch of frames in (segmented in one call, so a batching backend runs them
    together), one result per frame out, in the same order. ``inference_ms`` of each result is
    its share of the batch's segmentation plus its own measurement."""
    started = time.perf_counter()
    probs = segmenter.segment([frame.image for frame in frames])
    share_s = (time.perf_counter() - started) / len(frames)
    threshold = config.inference.threshold or segmenter.info.threshold
    profiles = config.inference.line_min_share > 0
    results = []
    for frame, seg_map in zip(frames, probs, strict=True):
        measured = time.perf_counter()
        prob, classes = split_map(seg_map)
        camera = config.camera_for(frame.camera_id)
        mask, cracks = measure_cracks(prob, threshold, camera, frame.chainage_m, config.severity,
                                      config.inference.min_crack_area_px,
                                      config.inference.min_crack_length_mm,
                                      config.inference.min_crack_elongation,
                                      config.inference.straight_max_deviation,
                                      config.inference.straight_min_length_px,
                                      grey=_grey(frame.image) if profiles else None,
                                      line_min_share=config.inference.line_min_share)
        features = (() if classes is None else tuple(measure_features(
            classes, segmenter.info.classes, camera, frame.chainage_m,
            config.inference.min_feature_area_px)))
        results.append(ResultMessage(
            run_id=frame.run_id, camera_id=frame.camera_id, seq=frame.seq,
            capture_time=frame.capture_time, chainage_m=frame.chainage_m,
            inference_ms=round((share_s + time.perf_counter() - measured) * 1000, 2),
            model=segmenter.info.label, worker=worker, cracks=tuple(cracks), mask=mask,
            features=features))
    return results


def _grey(image: np.ndarray) -> np.ndarray:
    """A frame (BGR or grey) as HxW grey."""
    if image.ndim == 2 or image.shape[2] == 1:
        return image.reshape(image.shape[:2])
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)


def _send(sock: zmq.Socket, frames: list[bytes], stop: threading.Event) -> bool:
    """Blocking send that still notices ``stop`` (back-pressure from management)."""
    while not stop.is_set():
        if sock.poll(POLL_MS, zmq.POLLOUT):
            sock.send_multipart(frames)
            return True
    return False


def _receive(inbox: zmq.Socket, stats: WorkerStats) -> FrameMessage | None:
    raw = inbox.recv_multipart(copy=True)
    try:
        message = decode(raw)
        if not isinstance(message, FrameMessage):
            raise WireError(f"expected a frame message, got {message.TYPE!r}")
        return message
    except WireError as exc:
        stats.malformed += 1
        log.warning("skipping malformed message (%d so far): %s", stats.malformed, exc)
        return None


def _process(batch: list[FrameMessage], segmenter: Segmenter, config: PipelineConfig,
             worker: str, stats: WorkerStats) -> list[ResultMessage]:
    """Results of a batch; a batch that fails is retried frame by frame, so one bad frame never
    costs the others (or stops the worker)."""
    try:
        return process_frames(batch, segmenter, config, worker)
    except Exception:
        if len(batch) > 1:
            log.warning("a batch of %d frames failed; processing them one by one", len(batch))
    results = []
    for frame in batch:
        try:
            results.append(process_frame(frame, segmenter, config, worker))
        except Exception:
            stats.failed += 1
            log.exception("frame %s/%s/%d failed", frame.run_id, frame.camera_id, frame.seq)
    return results


def run_worker(frames: str, results: str, segmenter: Segmenter, config: PipelineConfig,
               stop: threading.Event, worker: str | None = None,
               keys: KeyRing | None = None) -> WorkerStats:
    """Take frames from ``frames`` and push results to ``results`` until ``stop``; with
    ``keys``, both links are CURVE-authenticated (a worker on another host).

    Micro-batching (``inference.batch_frames`` > 1, for GPUs): after a frame arrives, the
    worker waits up to ``batch_wait_ms`` for more, up to ``batch_frames``, and segments them in
    one call; results go out in the frames' order. With 1 (the default, right for a CPU, which
    gains nothing from batches) each frame is processed as it comes."""
    worker = worker or worker_name()
    stats = WorkerStats()
    batch_frames, wait_s = config.inference.batch_frames, config.inference.batch_wait_ms / 1000
    context = zmq.Context.instance()
    # one frame queued per worker at most (a batch's worth when batching), so frames go to
    # whichever worker is free
    inbox = SocketSpec.parse(frames).open(context, hwm=batch_frames, keys=keys)
    outbox = SocketSpec.parse(results).open(context, hwm=16, keys=keys)
    try:
        while not stop.is_set():
            if not inbox.poll(POLL_MS):
                continue
            first = _receive(inbox, stats)
            batch = [first] if first is not None else []
            deadline = time.monotonic() + wait_s
            while len(batch) < batch_frames:
                remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
                if not inbox.poll(remaining_ms):
                    break
                message = _receive(inbox, stats)
                if message is not None:
                    batch.append(message)
            if not batch:
                continue
            started = time.perf_counter()
            done = _process(batch, segmenter, config, worker, stats)
            stats.busy_s += time.perf_counter() - started
            for result in done:
                if not _send(outbox, result.to_frames(), stop):
                    return stats
                stats.frames += 1
                stats.cracks += len(result.cracks)
                if stats.frames % 100 == 0:
                    log.info("%d frames, %d cracks, %.1f ms/frame", stats.frames, stats.cracks,
                             1000 * stats.busy_s / stats.frames)
    finally:
        inbox.close(linger=0)
        outbox.close()
    return stats
