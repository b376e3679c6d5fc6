"""The inference stage: pull frames, segment, measure cracks, push results.

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

import zmq

from crackscan.config import PipelineConfig
from crackscan.sockets import KeyRing, SocketSpec
from crackscan.wire import FrameMessage, ResultMessage, WireError, decode
from inference.geometry import measure_cracks
from inference.segmenter import Segmenter

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
    started = time.perf_counter()
    prob = segmenter.segment([frame.image])[0]
    threshold = config.inference.threshold or segmenter.info.threshold
    mask, cracks = measure_cracks(prob, threshold, config.camera_for(frame.camera_id),
                                  frame.chainage_m,
                                  config.severity, config.inference.min_crack_area_px,
                                  config.inference.min_crack_length_mm,
                                  config.inference.min_crack_elongation)
    return ResultMessage(
        run_id=frame.run_id, camera_id=frame.camera_id, seq=frame.seq,
        capture_time=frame.capture_time, chainage_m=frame.chainage_m,
        inference_ms=round((time.perf_counter() - started) * 1000, 2),
        model=segmenter.info.label, worker=worker, cracks=tuple(cracks), mask=mask)


def _send(sock: zmq.Socket, frames: list[bytes], stop: threading.Event) -> bool:
    """Blocking send that still notices ``stop`` (back-pressure from management)."""
    while not stop.is_set():
        if sock.poll(POLL_MS, zmq.POLLOUT):
            sock.send_multipart(frames)
            return True
    return False


def run_worker(frames: str, results: str, segmenter: Segmenter, config: PipelineConfig,
               stop: threading.Event, worker: str | None = None,
               keys: KeyRing | None = None) -> WorkerStats:
    """Take frames from ``frames`` and push results to ``results`` until ``stop``; with
    ``keys``, both links are CURVE-authenticated (a worker on another host)."""
    worker = worker or worker_name()
    stats = WorkerStats()
    context = zmq.Context.instance()
    # one frame queued per worker at most, so frames go to whichever worker is free
    inbox = SocketSpec.parse(frames).open(context, hwm=1, keys=keys)
    outbox = SocketSpec.parse(results).open(context, hwm=16, keys=keys)
    try:
        while not stop.is_set():
            if not inbox.poll(POLL_MS):
                continue
            raw = inbox.recv_multipart(copy=True)
            try:
                message = decode(raw)
                if not isinstance(message, FrameMessage):
                    raise WireError(f"expected a frame message, got {message.TYPE!r}")
            except WireError as exc:
                stats.malformed += 1
                log.warning("skipping malformed message (%d so far): %s", stats.malformed, exc)
                continue
            started = time.perf_counter()
            try:
                result = process_frame(message, segmenter, config, worker)
            except Exception:  # one bad frame never stops a worker
                stats.failed += 1
                log.exception("frame %s/%s/%d failed", message.run_id, message.camera_id,
                              message.seq)
                continue
            stats.busy_s += time.perf_counter() - started
            if not _send(outbox, result.to_frames(), stop):
                break
            stats.frames += 1
            stats.cracks += len(result.cracks)
            if stats.frames % 100 == 0:
                log.info("%d frames, %d cracks, %.1f ms/frame", stats.frames, stats.cracks,
                         1000 * stats.busy_s / stats.frames)
    finally:
        inbox.close(linger=0)
        outbox.close()
    return stats
