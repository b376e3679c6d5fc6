"""The acquisition stage: read a source, stamp every frame, send it to the inference workers.

One run: a ``run_start`` message on the control socket (to management), then one ``frame``
message per good source frame on the frame socket (PUSH: fanned out to N inference workers), then
an ``end`` message on the control socket with the counts, which always add up:
``frames_read == frames_sent + frames_dropped + frames_bad``.

Stamps. ``seq`` is the SOURCE frame index, not a count of sent frames, so a bad or dropped frame
leaves a visible gap in the sequence for management. ``capture_time`` is the source's own (a
recording, a metadata file, a camera's clock) or ``started_at + offset_s``; ``chainage_m`` (of
the image centre) is the source's own or the position model's at that time (constant speed, an
odometer log or a chainage file: ``acquisition.position``).

Cameras. A rig source (``acquisition.rig``) yields frames of several cameras, each with its
``camera_id``; every camera gets its own counts and its own end message, and management closes
the run when all have ended.

Recording. With a ``recorder`` every good frame is written to the recording before it is
offered to the stream, so a live run's recording keeps the frames the stream drops.

Modes. ``replay``: nothing is dropped. The frame socket's high-water mark is
``acquisition.queue_frames`` (live: ``live_queue_frames``, 1, as each queued frame adds latency);
when the workers fall behind, sending waits (polling, so a ``stop`` is seen within ``POLL_MS``)
and the reader waits with it. ``live``: a send that would wait is not made; the frame is counted
as dropped and the next one read. A recorded source replayed in live mode is paced at its own
frame rate (a camera paces itself), so drops measure whether inference keeps up in real time.
A live frame read more than ``LATE_FRAMES`` frame periods (and ``LATE_MIN_S``) after its capture
time, because acquisition itself fell behind (a slow disk, a busy CPU), is dropped, not sent, as
a camera would have overwritten it, so latency stays bounded. Dropped frames are still recorded.

Draining. After the end message, a run keeps the frame stream open until ``stop`` is set or
``drain_s`` passes (default ``management.drain_timeout_s``), then closes it with a linger; a
stopped run (``stop`` already set) until ``finish`` is set or ``STOPPED_DRAIN_S`` passes, so the
frames it sent before the stop still reach the workers. ZeroMQ's linger alone is not enough:
it only hands frames to the kernel, and a worker whose receive queue is full when the connection
closes drops what is still in its socket buffer (libzmq stops reading a peer that hung up while
its input was throttled). So a run's last frames would be lost whenever workers are behind at
the end. The pipeline stops acquisition once management has every result; ``crackscan acquire``
on its own exits after the drain.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import zmq

from acquisition.frames import FrameSource
from acquisition.position import ChainageModel, open_position
from acquisition.recording import Recorder
from crackscan.config import PipelineConfig
from crackscan.errors import UserError
from crackscan.sockets import MAX_MESSAGE_BYTES, KeyRing, SocketSpec, terminate
from crackscan.wire import (
    MAX_PIXELS,
    EndOfStreamMessage,
    FrameMessage,
    RunStartMessage,
    WireError,
)

log = logging.getLogger(__name__)

MODES = ("live", "replay")
POLL_MS = 100  # how long one wait for a slow worker lasts before `stop` is checked again
CONTROL_SEND_TIMEOUT_S = 10.0  # run_start / end wait this long for room on the control socket
REPLAY_LINGER_MS = 30_000  # after a drain that was not stopped, queued frames get this long
STOPPED_LINGER_MS = 1_000
LATE_FRAMES = 4.0  # live: a frame read this many frame periods after its time is dropped ...
LATE_MIN_S = 0.2  # ... and at least this late (a camera driver buffers a few frames)
STOPPED_DRAIN_S = 8.0  # a stopped run keeps its stream open this long for the frames it sent
CONTROL_LINGER_MS = 5_000
PROGRESS_EVERY_S = 5.0
WAIT_WARNING_S = 10.0  # replay: a frame waiting this long for a worker is logged


class AcquisitionError(UserError, RuntimeError):
    """The stage cannot start: a socket cannot be opened. The message says which and why."""


def new_run_id() -> str:
    """A new run id, UTC time then random hex: sortable by start time, unique across vehicles,
    e.g. ``20261121-201500-a1b2c3``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _open(spec: str, context: zmq.Context, hwm: int, role: str, keys: KeyRing | None = None
          ) -> zmq.Socket:
    try:
        return SocketSpec.parse(spec, authenticated=keys is not None).open(context, hwm=hwm,
                                                                          keys=keys)
    except ValueError as exc:
        raise AcquisitionError(f"bad {role} socket: {exc}") from None
    except zmq.ZMQError as exc:
        raise AcquisitionError(f"cannot open {role} socket {spec}: {exc}; is another process "
                               "using that endpoint?") from None


def _send(socket: zmq.Socket, parts: list[bytes], stop: threading.Event | None,
          timeout_s: float | None = None) -> bool:
    """Send, waiting for room in the queue until it is made, ``stop`` is set or ``timeout_s``
    passes. Returns whether it was sent. A multipart message is queued whole or not at all."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        try:
            socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
            return True
        except zmq.Again:
            pass
        if stop is not None and stop.is_set():
            return False
        if deadline is not None and time.monotonic() >= deadline:
            return False
        socket.poll(POLL_MS, zmq.POLLOUT)


class Counts:
    """One camera's frames: read = sent + dropped + bad at the end of a run."""

    def __init__(self) -> None:
        self.read = self.sent = self.dropped = self.bad = self.recorded = 0


def _sendable(message: FrameMessage) -> list[bytes]:
    """The frames of ``message``, or :class:`WireError` for one that a worker would refuse (more
    pixels than the wire's budget) or ZeroMQ would drop on the way (over its message limit), so
    that such a frame is counted bad here instead of vanishing downstream."""
    height, width = message.image.shape[:2]
    if height * width > MAX_PIXELS:
        raise WireError(f"{width} x {height} pixels is over the wire's budget of {MAX_PIXELS} "
                        "pixels a frame")
    parts = message.to_frames()
    size = sum(len(part) for part in parts)
    if size > MAX_MESSAGE_BYTES:
        raise WireError(f"the message of {size} bytes is over the limit of {MAX_MESSAGE_BYTES} "
                        "(--encoding jpeg or png makes it smaller)")
    return parts


def position_model(config: PipelineConfig) -> ChainageModel:
    """The run's chainage model from ``acquisition.position`` (constant speed by default)."""
    acquisition = config.acquisition
    position = acquisition.position
    return open_position(position.source, file=position.file, speed_kmh=acquisition.speed_kmh,
                         start_chainage_m=acquisition.start_chainage_m,
                         direction=position.direction, ticks_per_m=position.ticks_per_m,
                         clock=position.clock)


def _close_on_stop(source: FrameSource, stop: threading.Event, done: threading.Event) -> None:
    while not done.is_set():
        if stop.wait(POLL_MS / 1000):
            if not done.is_set():
                source.close()
            return


def _totals(counts: dict[str, Counts]) -> tuple[int, int, int, int]:
    return (sum(c.read for c in counts.values()), sum(c.sent for c in counts.values()),
            sum(c.dropped for c in counts.values()), sum(c.bad for c in counts.values()))


def run_acquisition(source: FrameSource, frames: str, control: str, run_id: str, mode: str,
                    config: PipelineConfig, stop: threading.Event,
                    source_label: str | None = None, *, pace: bool | None = None,
                    drain_s: float | None = None, context: zmq.Context | None = None,
                    position: ChainageModel | None = None, recorder: Recorder | None = None,
                    keys: KeyRing | None = None, finish: threading.Event | None = None
                    ) -> EndOfStreamMessage:
    """Run one acquisition over ``source``; returns the end message that was sent (for a rig:
    one with the totals over its cameras, camera_id ``"cam_a+cam_b"``).

    ``frames`` and ``control`` are socket specs (``push+bind:...`` for frames, ``push+connect:...``
    to management's PULL for control). ``stop`` ends the run early (reason ``"stopped"``).
    ``pace``: wait between frames to keep the source's frame rate; default: in live mode only.
    ``drain_s``: how long the frame stream stays open after the end (see the module docstring).
    ``context``: the ZeroMQ context (needed for inproc:// endpoints); by default the run makes its
    own and terminates it, which waits for queued messages up to the sockets' linger.
    ``position``: the chainage model (default: from ``config.acquisition.position``).
    ``recorder``: write every good frame there too (``--record DIR``); closed by the caller.
    ``keys``: every link CURVE-authenticated (the frame stream serves authorized clients only).
    ``finish``: set when the frames sent are all stored, so the stream may close; after a stop,
    the stream stays open for the frames already sent until ``finish`` or ``STOPPED_DRAIN_S``.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    acquisition = config.acquisition
    cameras = tuple(getattr(source, "cameras", None) or (config.camera.id,))
    position = position_model(config) if position is None else position
    pace = mode == "live" if pace is None else pace
    own_context = context is None
    context = zmq.Context() if context is None else context
    frame_socket = control_socket = None
    counts = {camera: Counts() for camera in cameras}
    reason = "end_of_source"
    try:
        queue = acquisition.queue_frames if mode == "replay" else acquisition.live_queue_frames
        frame_socket = _open(frames, context, queue, "frame", keys)
        control_socket = _open(control, context, 16, "control", keys)
        label = source_label or source.description
        started_at = time.time()
        start = RunStartMessage(run_id=run_id, source=label, mode=mode, started_at=started_at,
                                cameras=cameras, config=config.model_dump(mode="json"))
        if not _send(control_socket, start.to_frames(), None, CONTROL_SEND_TIMEOUT_S):
            log.error("run_start could not be queued for management within %gs",
                      CONTROL_SEND_TIMEOUT_S)
        log.info("run %s: %s, %s mode, camera(s) %s, %s, frames on %s", run_id, label, mode,
                 ", ".join(cameras), position.description, frames)

        clock = time.monotonic()
        next_report = clock + PROGRESS_EVERY_S
        reading = threading.Event()
        if getattr(source, "interruptible", False):
            # a camera waiting to reconnect yields nothing: close it on stop, ending iteration
            threading.Thread(target=_close_on_stop, args=(source, stop, reading), daemon=True,
                             name="close-on-stop").start()
        try:
            for item in source:
                if stop.is_set():
                    reason = "stopped"
                    break
                camera_id = item.camera_id or cameras[0]
                count = counts.setdefault(camera_id, Counts())
                count.read += 1
                if item.image is None:
                    count.bad += 1
                    continue
                late = False
                if pace:
                    delay = clock + item.offset_s - time.monotonic()
                    if delay > 0 and stop.wait(delay):
                        reason = "stopped"
                        break
                    # live: a frame more than LATE_FRAMES periods behind its capture time is one a
                    # camera would have overwritten while we were busy: recorded, not sent
                    late = mode == "live" and -delay > max(LATE_FRAMES / max(source.fps, 1e-3),
                                                           LATE_MIN_S)
                capture_time = (item.capture_time if item.capture_time is not None
                                else started_at + item.offset_s)
                chainage_m = (item.chainage_m if item.chainage_m is not None
                              else position.chainage_at(item.offset_s if position.clock ==
                                                        "relative" else capture_time))
                if recorder is not None:  # before the stream, which may drop it
                    recorder.write(camera_id, item.index, capture_time, chainage_m, item.image)
                    count.recorded += 1
                if late:
                    count.dropped += 1
                    continue
                message = FrameMessage(
                    run_id=run_id, camera_id=camera_id, seq=item.index,
                    capture_time=capture_time, chainage_m=chainage_m,
                    image=item.image, encoding=acquisition.encoding)
                try:
                    parts = _sendable(message)
                except WireError as exc:  # one frame that cannot be sent is a bad frame
                    log.warning("run %s: frame %d cannot be sent: %s", run_id, item.index, exc)
                    count.bad += 1
                    continue
                if mode == "replay":
                    delivered = _send(frame_socket, parts, stop, WAIT_WARNING_S)
                    if not delivered and not stop.is_set():
                        log.warning("run %s: frame %d has waited %gs for an inference worker on "
                                    "%s; still waiting", run_id, item.index, WAIT_WARNING_S,
                                    frames)
                        delivered = _send(frame_socket, parts, stop)
                    if delivered:
                        count.sent += 1
                    else:
                        reason = "stopped"
                        break
                else:
                    try:
                        frame_socket.send_multipart(parts, flags=zmq.NOBLOCK, copy=False)
                        count.sent += 1
                    except zmq.Again:
                        count.dropped += 1
                if time.monotonic() >= next_report:
                    next_report += PROGRESS_EVERY_S
                    read, sent, dropped, bad = _totals(counts)
                    log.info("run %s: %d read, %d sent, %d dropped, %d bad (%.1f frames/s)",
                             run_id, read, sent, dropped, bad, read / (time.monotonic() - clock))
        except KeyboardInterrupt:
            reason = "stopped"
        except Exception:  # a source failing mid-run ends the run cleanly, with the counts so far
            log.exception("run %s: reading %s failed", run_id, label)
            reason = "source_error"
        finally:
            reading.set()
        if stop.is_set() and reason == "end_of_source":
            reason = "stopped"  # the source ended because it was closed on stop

        ended_at = time.time()
        for camera_id, count in counts.items():
            # read but neither sent nor bad (the run stopped while it waited): dropped
            count.dropped = count.read - count.sent - count.bad
            end = EndOfStreamMessage(run_id=run_id, camera_id=camera_id, ended_at=ended_at,
                                     frames_read=count.read, frames_sent=count.sent,
                                     frames_dropped=count.dropped, frames_bad=count.bad,
                                     reason=reason, frames_recorded=count.recorded)
            if not _send(control_socket, end.to_frames(), None, CONTROL_SEND_TIMEOUT_S):
                log.error("end of run %s camera %s could not be queued for management within "
                          "%gs", run_id, camera_id, CONTROL_SEND_TIMEOUT_S)
        read, sent, dropped, bad = _totals(counts)
        if len(counts) > 1:  # what the caller gets: the run's totals over its cameras
            end = EndOfStreamMessage(run_id=run_id, camera_id="+".join(counts),
                                     ended_at=ended_at, frames_read=read, frames_sent=sent,
                                     frames_dropped=dropped, frames_bad=bad, reason=reason,
                                     frames_recorded=sum(c.recorded for c in counts.values()))
        log.info("run %s ended (%s): %d read, %d sent, %d dropped, %d bad%s", run_id, reason,
                 read, sent, dropped, bad, f", {sum(c.recorded for c in counts.values())} "
                 "recorded" if recorder is not None else "")
        if sent:
            # the frames already sent are the run's: keep the stream open while workers take
            # them, until told the run is stored (``finish``, or ``stop`` after a normal end)
            stopped = reason == "stopped"
            drain_s = (STOPPED_DRAIN_S if stopped else config.management.drain_timeout_s
                       if drain_s is None else drain_s)
            log.info("run %s: keeping the frame stream open up to %gs so workers can take the "
                     "frames still queued (%s to end now)", run_id, drain_s,
                     "a second stop" if stopped else "stop")
            deadline = time.monotonic() + drain_s
            while time.monotonic() < deadline and not (finish is not None and finish.is_set()):
                if not stopped and stop.is_set():
                    break
                time.sleep(POLL_MS / 1000)
        return end
    finally:
        if frame_socket is not None:
            frame_socket.close(linger=REPLAY_LINGER_MS if mode == "replay" and not stop.is_set()
                               else STOPPED_LINGER_MS)
        if control_socket is not None:
            control_socket.close(linger=CONTROL_LINGER_MS)
        if own_context:
            terminate(context)
