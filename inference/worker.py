"""The inference stage: pull frames, segment, measure cracks (and, with a multi-class model,
lining features), push results.

Workers are stateless services: N of them connect to one acquisition's frame link and to one
management socket. A run's lifecycle (start, end, counting) is between acquisition and
management; a worker only turns each frame into exactly one result. It takes frames by credit
(``acquisition.dispatch``): it says how many it may hold, and after each batch reports which it
took, sent the results of, or failed, which returns their slots; a thread of its own beats every
``HEARTBEAT_S`` so acquisition knows it is alive, however long one frame takes. Frames
acquisition sends to a worker that died go to the others.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass

import cv2
import numpy as np
import zmq

from crackscan import metrics
from crackscan.config import PipelineConfig
from crackscan.geometry import measure_cracks, measure_features
from crackscan.sockets import KeyRing, SocketError, SocketSpec
from crackscan.wire import (
    HEARTBEAT_S,
    CrackPhoto,
    CrackRecord,
    CreditMessage,
    FrameKey,
    FrameMessage,
    HeartbeatMessage,
    ResultMessage,
    WireError,
    decode,
)
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
    """Host, process and a random suffix: unique on the frame link (its routing id there)."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{secrets.token_hex(3)}"


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
            features=features,
            # photo boxes are in mask pixels: a frame of another size (never seen) has none
            photos=(crack_photos(frame.image, cracks, config.inference.photo_max_px,
                                 config.inference.photo_jpeg_quality)
                    if frame.image.shape[:2] == mask.shape[:2] else ())))
    return results


PHOTO_MARGIN = 0.25  # a crack photo shows its box plus this share of the box's size each side ...
PHOTO_MIN_MARGIN_PX = 16  # ... and at least this many pixels


def crack_photos(image: np.ndarray, cracks: list[CrackRecord], max_px: int,
                 quality: int) -> tuple[CrackPhoto, ...]:
    """The evidence of each crack: the frame around its box (with a margin, clipped to the
    frame) as a JPEG at most ``max_px`` on its longer side; none when ``max_px`` is 0."""
    if max_px <= 0:
        return ()
    height, width = image.shape[:2]
    photos = []
    for crack in cracks:
        x, y, w, h = crack.bbox_px
        margin = max(PHOTO_MIN_MARGIN_PX, round(PHOTO_MARGIN * max(w, h)))
        x0, y0 = max(0, x - margin), max(0, y - margin)
        x1, y1 = min(width, x + w + margin), min(height, y + h + margin)
        if x1 <= x0 or y1 <= y0:
            continue
        crop = image[y0:y1, x0:x1]
        scale = max_px / max(x1 - x0, y1 - y0)
        if scale < 1:
            crop = cv2.resize(crop, (max(1, round((x1 - x0) * scale)),
                                     max(1, round((y1 - y0) * scale))),
                              interpolation=cv2.INTER_AREA)
        ok, jpeg = cv2.imencode(".jpg", np.ascontiguousarray(crop),
                                [cv2.IMWRITE_JPEG_QUALITY, quality])
        if ok:
            photos.append(CrackPhoto(crack=crack.index, box_px=(x0, y0, x1 - x0, y1 - y0),
                                     jpeg=jpeg.tobytes()))
    return tuple(photos)


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


def _receive(inbox: zmq.Socket, stats: WorkerStats, max_pixels: int) -> FrameMessage | None:
    raw = inbox.recv_multipart(copy=True)
    try:
        message = decode(raw, max_pixels)
        if not isinstance(message, FrameMessage):
            raise WireError(f"expected a frame message, got {message.TYPE!r}")
        return message
    except WireError as exc:
        stats.malformed += 1
        metrics.INFERENCE_FRAMES.labels("malformed").inc()
        log.warning("skipping malformed message (%d so far): %s", stats.malformed, exc)
        return None


def _process(batch: list[FrameMessage], segmenter: Segmenter, config: PipelineConfig,
             worker: str, stats: WorkerStats) -> tuple[list[ResultMessage], list[FrameKey]]:
    """Results of a batch, and the frames that failed; a batch that fails is retried frame by
    frame, so one bad frame never costs the others (or stops the worker)."""
    try:
        return process_frames(batch, segmenter, config, worker), []
    except Exception:
        if len(batch) > 1:
            log.warning("a batch of %d frames failed; processing them one by one", len(batch))
    results, failed = [], []
    for frame in batch:
        try:
            results.append(process_frame(frame, segmenter, config, worker))
        except Exception:
            stats.failed += 1
            metrics.INFERENCE_FRAMES.labels("failed").inc()
            failed.append((frame.camera_id, frame.seq))
            log.exception("frame %s/%s/%d failed", frame.run_id, frame.camera_id, frame.seq)
    return results, failed


def _beat(context: zmq.Context, spec: SocketSpec, keys: KeyRing | None, message: list[bytes],
          done: threading.Event) -> None:
    """The heartbeat thread: its own socket on the frame link (a socket belongs to one thread),
    one beat every HEARTBEAT_S until ``done``; a beat nobody takes is not queued twice."""
    sock = spec.open(context, hwm=1, keys=keys)
    try:
        while True:
            try:
                sock.send_multipart(message, flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
            if done.wait(HEARTBEAT_S):
                return
    finally:
        sock.close(linger=0)


def _connecting(text: str, role: str, keys: KeyRing | None) -> SocketSpec:
    spec = SocketSpec.parse(text, authenticated=keys is not None)
    if spec.bind:
        raise SocketError(f"{role} socket {text!r}: a worker connects to it "
                          f"(e.g. {spec.pattern}+connect:...)")
    return spec


def run_worker(frames: str, results: str, segmenter: Segmenter, config: PipelineConfig,
               stop: threading.Event, worker: str | None = None,
               keys: KeyRing | None = None) -> WorkerStats:
    """Take frames from ``frames`` and push results to ``results`` until ``stop``; with
    ``keys``, both links are CURVE-authenticated (a worker on another host).

    Micro-batching (``inference.batch_frames`` > 1, for GPUs): after a frame arrives, the
    worker waits up to ``batch_wait_ms`` for more, up to ``batch_frames``, and segments them in
    one call; results go out in the frames' order. With 1 (the default, right for a CPU, which
    gains nothing from batches) each frame is processed as it comes. The worker may hold one
    frame more than a batch (the next waits while a batch is worked on)."""
    worker = worker or worker_name()
    stats = WorkerStats()
    batch_frames, wait_s = config.inference.batch_frames, config.inference.batch_wait_ms / 1000
    capacity = batch_frames + 1
    max_pixels = config.acquisition.max_frame_pixels
    frames_spec = _connecting(frames, "frames", keys)
    results_spec = _connecting(results, "results", keys)
    context = zmq.Context.instance()
    inbox = frames_spec.open(context, hwm=capacity + 1, keys=keys, routing_id=worker)
    outbox = results_spec.open(context, hwm=16, keys=keys)
    beating = threading.Event()
    heart = threading.Thread(target=_beat, name="heartbeat", daemon=True, args=(
        context, frames_spec, keys, HeartbeatMessage(sender=worker, capacity=capacity)
        .to_frames(), beating))
    heart.start()
    try:
        if not _send(inbox, CreditMessage(worker, capacity).to_frames(), stop):
            return stats
        while not stop.is_set():
            if not inbox.poll(POLL_MS):
                continue
            consumed = 1
            first = _receive(inbox, stats, max_pixels)
            batch = [first] if first is not None else []
            deadline = time.monotonic() + wait_s
            while consumed < batch_frames:
                remaining_ms = max(0, round((deadline - time.monotonic()) * 1000))
                if not inbox.poll(remaining_ms):
                    break
                consumed += 1
                message = _receive(inbox, stats, max_pixels)
                if message is not None:
                    batch.append(message)
            done_keys: list[FrameKey] = []
            failed: list[FrameKey] = []
            if batch:
                started = time.perf_counter()
                done, failed = _process(batch, segmenter, config, worker, stats)
                stats.busy_s += time.perf_counter() - started
                for result in done:
                    if not _send(outbox, result.to_frames(), stop):
                        return stats
                    done_keys.append((result.camera_id, result.seq))
                    stats.frames += 1
                    stats.cracks += len(result.cracks)
                    metrics.INFERENCE_FRAMES.labels("done").inc()
                    metrics.INFERENCE_CRACKS.inc(len(result.cracks))
                    metrics.INFERENCE_SECONDS.observe(result.inference_ms / 1000)
                    if stats.frames % 100 == 0:
                        log.info("%d frames, %d cracks, %.1f ms/frame", stats.frames,
                                 stats.cracks, 1000 * stats.busy_s / stats.frames)
            credit = CreditMessage(worker, capacity, consumed, tuple(done_keys), tuple(failed))
            if not _send(inbox, credit.to_frames(), stop):
                return stats
    finally:
        beating.set()
        heart.join(timeout=2)
        inbox.close(linger=0)
        outbox.close()
    return stats
