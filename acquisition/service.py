"""The acquisition stage: read a source, stamp every frame, send it to the inference workers.

One run: a ``run_start`` message on the control socket (to management), then one ``frame``
message per good source frame on the frame socket (PUSH: fanned out to N inference workers), then
an ``end`` message on the control socket with the counts, which always add up:
``frames_read == frames_sent + frames_dropped + frames_bad``.

Stamps. ``seq`` is the SOURCE frame index, not a count of sent frames, so a bad or dropped frame
leaves a visible gap in the sequence for management. ``capture_time`` is the source's own (a
recording, a metadata file, a camera's clock) or the time reading began + ``offset_s`` (a live
run first waits for a worker); ``chainage_m`` (of the image centre) is the source's own or the
position model's at that time (constant speed, an odometer log or a chainage file:
``acquisition.position``).

Cameras. A rig source (``acquisition.rig``) yields frames of several cameras, each with its
``camera_id``; every camera gets its own counts and its own end message, and management closes
the run when all have ended.

Recording. With a ``recorder`` every good frame is written to the recording before it is
offered to the stream, so a live run's recording keeps the frames the stream drops.

Dispatch (``acquisition.dispatch``). Workers ask for frames (credit) and a frame goes only to
a worker with a free slot; every frame sent is kept until management reports its result
stored, and re-sent when its worker dies or its result is lost. ``replay``: nothing is dropped;
the reader waits for a free slot (and for room in ``acquisition.in_flight_mb``), so back-pressure
slows it. ``live``: a frame with no free slot waits as its camera's standby frame until a slot
frees; a newer frame replaces it and the older is dropped and counted. A recorded source replayed
in live mode is paced at its own frame rate (a camera paces itself), so drops measure whether
inference keeps up in real time. A live frame read more than ``LATE_FRAMES`` frame periods (and
``LATE_MIN_S``) after its capture time, because acquisition itself fell behind (a slow disk, a
busy CPU), is dropped, not sent, as a camera would have overwritten it, so latency stays
bounded. Dropped frames are still recorded.

The end. After the source, a run waits until every frame it sent is stored (or given up: no
worker alive to take it for ``drain_s``, default ``management.drain_timeout_s``), and only then
sends its end message, so management closes the run the moment the end arrives, however long the
last frames took. A stopped run (``stop`` set) sends its end at once (every stage may be
stopping), then waits for the frames it sent up to ``STOPPED_DRAIN_S`` or until ``finish`` is
set (a second stop).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time

import zmq

from acquisition.dispatch import Dispatcher
from acquisition.frames import FrameSource
from acquisition.position import ChainageModel, open_position
from acquisition.recording import Recorder, RecordingError
from crackscan import metrics
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
POLL_MS = 100  # how long one wait for room on the control socket lasts
CONTROL_SEND_TIMEOUT_S = 10.0  # run_start / end wait this long for room on the control socket
FRAMES_HWM = 64  # messages queued per worker (credit keeps it far below)
LATE_FRAMES = 4.0  # live: a frame read this many frame periods after its time is dropped ...
FIRST_WORKER_WAIT_S = 120.0  # live: how long reading waits for the first inference worker
LATE_MIN_S = 0.2  # ... and at least this late (a camera driver buffers a few frames)
STOPPED_DRAIN_S = 8.0  # a stopped run waits this long for the frames it sent to be stored
CONTROL_LINGER_MS = 5_000
PROGRESS_EVERY_S = 5.0
WAIT_WARNING_S = 10.0  # replay: a frame waiting this long for a worker is logged


class AcquisitionError(UserError, RuntimeError):
    """The stage cannot start: a socket cannot be opened. The message says which and why."""


def new_run_id() -> str:
    """A new run id, UTC time then random hex: sortable by start time, unique across vehicles,
    e.g. ``20261121-201500-a1b2c3``."""
    return time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-" + secrets.token_hex(3)


def _open(spec: str, context: zmq.Context, hwm: int, role: str, bind: bool,
          keys: KeyRing | None = None) -> zmq.Socket:
    """The ``role`` socket of ``spec``, which must bind (the frame link) or connect (the
    control link to management) as ``bind`` says."""
    try:
        parsed = SocketSpec.parse(spec, authenticated=keys is not None)
        if parsed.bind != bind:
            raise ValueError(f"{spec}: acquisition {'binds' if bind else 'connects to'} the "
                             f"{role} link (e.g. push+{'bind' if bind else 'connect'}:...)")
        return parsed.open(context, hwm=hwm, keys=keys)
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
    """One camera's frames: read = sent + dropped + bad at the end of a run (each also counted in
    the ``crackscan_acquisition_frames`` metric)."""

    def __init__(self, camera: str) -> None:
        self.camera = camera
        self.read = self.sent = self.dropped = self.bad = self.recorded = 0

    def add(self, outcome: str, n: int = 1) -> None:
        setattr(self, outcome, getattr(self, outcome) + n)
        metrics.ACQUISITION_FRAMES.labels(self.camera, outcome).inc(n)


def _count_outcomes(dispatcher: Dispatcher, counts: dict[str, Counts]) -> None:
    """Live: count the frames the dispatcher sent or dropped since last asked."""
    for (camera_id, _seq), sent in dispatcher.take_outcomes():
        counts.setdefault(camera_id, Counts(camera_id)).add("sent" if sent else "dropped")


def _sendable(message: FrameMessage, max_pixels: int = MAX_PIXELS) -> list[bytes]:
    """The frames of ``message``, or :class:`WireError` for one that a worker would refuse (more
    pixels than the wire's budget, ``acquisition.max_frame_pixels``) or ZeroMQ would drop on the
    way (over its message limit), so that such a frame is counted bad here instead of vanishing
    downstream."""
    height, width = message.image.shape[:2]
    if height * width > max_pixels:
        raise WireError(f"{width} x {height} pixels is over the wire's budget of {max_pixels} "
                        "pixels a frame (acquisition.max_frame_pixels)")
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
                    keys: KeyRing | None = None, finish: threading.Event | None = None,
                    skip: frozenset[tuple[str, int]] = frozenset()) -> EndOfStreamMessage:
    """Run one acquisition over ``source``; returns the end message that was sent (for a rig:
    one with the totals over its cameras, camera_id ``"cam_a+cam_b"``).

    ``frames`` and ``control`` are socket specs (``push+bind:...`` for frames, ``push+connect:...``
    to management's results socket for control). ``stop`` ends the run early (reason ``"stopped"``).
    ``pace``: wait between frames to keep the source's frame rate; default: in live mode only.
    ``drain_s``: after the source, how long frames may wait with no worker making progress on
    them before the run ends without them (see the module docstring).
    ``context``: the ZeroMQ context (needed for inproc:// endpoints); by default the run makes its
    own and terminates it, which waits for queued messages up to the sockets' linger.
    ``position``: the chainage model (default: from ``config.acquisition.position``).
    ``recorder``: write every good frame there too (``--record DIR``); closed at the end, so the
    end's ``frames_recorded`` counts the frames on disk. A frame it cannot write (a full disk)
    ends the run (reason ``"recording_error"``): a recording with holes is no recording.
    ``keys``: every link CURVE-authenticated (the frame stream serves authorized clients only).
    ``finish``: after a stop, end the wait for the frames already sent now (a second stop).
    ``skip``: (camera, seq) of frames the run has already stored (``crackscan run --resume``):
    counted as sent, not sent again.
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
    counts = {camera: Counts(camera) for camera in cameras}
    reason = "end_of_source"
    skipped = 0
    try:
        frame_socket = _open(frames, context, FRAMES_HWM, "frame", True, keys)
        control_socket = _open(control, context, 16, "control", False, keys)
        frame_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a gone worker is an error, not a void
        late_s = max(LATE_FRAMES / max(getattr(source, "fps", 0) or 0, 1e-3), LATE_MIN_S)
        dispatcher = Dispatcher(frame_socket, control_socket, run_id, mode,
                                acquisition.ack_timeout_s, acquisition.in_flight_mb, late_s)
        label = source_label or source.description
        started_at = time.time()
        start = RunStartMessage(run_id=run_id, source=label, mode=mode, started_at=started_at,
                                cameras=cameras, config=config.model_dump(mode="json"))
        if not _send(control_socket, start.to_frames(), None, CONTROL_SEND_TIMEOUT_S):
            log.error("run_start could not be queued for management within %gs",
                      CONTROL_SEND_TIMEOUT_S)
        log.info("run %s: %s, %s mode, camera(s) %s, %s, frames on %s", run_id, label, mode,
                 ", ".join(cameras), position.description, frames)

        if mode == "live" and not dispatcher.workers:
            # a live source's frames go by whether or not a worker is up: a run that starts
            # reading while the models still load would drop its first seconds of tunnel
            log.info("run %s: waiting for an inference worker before reading the live source",
                     run_id)
            if not dispatcher.wait_for_worker(stop, FIRST_WORKER_WAIT_S) and not stop.is_set():
                log.warning("run %s: no inference worker after %.0f s; reading anyway (frames "
                            "no worker takes are dropped)", run_id, FIRST_WORKER_WAIT_S)
        clock, reading_at = time.monotonic(), time.time()  # a frame's offset_s counts from here
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
                count = counts.setdefault(camera_id, Counts(camera_id))
                count.add("read")
                if item.image is None:
                    count.add("bad")
                    continue
                if (camera_id, item.index) in skip:
                    count.add("sent")
                    skipped += 1
                    continue
                late = False
                if pace:
                    delay = clock + item.offset_s - time.monotonic()
                    if delay > 0 and not dispatcher.wait(delay, stop):
                        reason = "stopped"
                        break
                    _count_outcomes(dispatcher, counts)
                    # live: a frame more than LATE_FRAMES periods behind its capture time is one a
                    # camera would have overwritten while we were busy: recorded, not sent
                    late = mode == "live" and -delay > late_s
                capture_time = (item.capture_time if item.capture_time is not None
                                else reading_at + item.offset_s)
                chainage_m = (item.chainage_m if item.chainage_m is not None
                              else position.chainage_at(item.offset_s if position.clock ==
                                                        "relative" else capture_time))
                if recorder is not None:  # before the stream, which may drop it
                    try:
                        recorder.write(camera_id, item.index, capture_time, chainage_m,
                                       item.image)
                    except RecordingError as exc:  # a full disk: the recording cannot go on
                        log.error("run %s: %s; ending the run", run_id, exc)
                        reason = "recording_error"
                        break
                if late:
                    count.add("dropped")
                    continue
                message = FrameMessage(
                    run_id=run_id, camera_id=camera_id, seq=item.index,
                    capture_time=capture_time, chainage_m=chainage_m,
                    image=item.image, encoding=acquisition.encoding)
                try:
                    parts = _sendable(message, acquisition.max_frame_pixels)
                except WireError as exc:  # one frame that cannot be sent is a bad frame
                    log.warning("run %s: frame %d cannot be sent: %s", run_id, item.index, exc)
                    count.add("bad")
                    continue
                key = (camera_id, item.index)
                if mode == "replay":
                    if not dispatcher.submit(key, parts, stop, WAIT_WARNING_S):
                        reason = "stopped"
                        break
                    count.add("sent")
                else:
                    dispatcher.offer(key, parts)
                    _count_outcomes(dispatcher, counts)
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
        dispatcher.settle(stop)  # live: the standby frames sent or dropped
        _count_outcomes(dispatcher, counts)

        drain_s = config.management.drain_timeout_s if drain_s is None else drain_s
        if dispatcher.flights and reason != "stopped":
            log.info("run %s: waiting until the %d frame(s) in flight are stored (stop to end "
                     "now)", run_id, len(dispatcher.flights))
            if not dispatcher.drain(stop, drain_s) and stop.is_set():
                reason = "stopped"
        if skip:
            log.info("run %s: %d frame(s) were stored before: not sent again", run_id, skipped)
        if recorder is not None:  # the counts of what is on disk, queued frames written
            try:
                recorder.close()
            except RecordingError as exc:
                log.error("run %s: %s", run_id, exc)
                reason = "recording_error" if reason == "end_of_source" else reason
            for camera_id, written in recorder.written_by_camera().items():
                counts.setdefault(camera_id, Counts(camera_id)).recorded = written
        dispatch = dispatcher.stats
        if dispatch.resent or dispatch.given_up or dispatch.workers_lost:
            log.warning("run %s: %d frame(s) sent again, %d given up, %d worker(s) lost", run_id,
                        dispatch.resent, dispatch.given_up, dispatch.workers_lost)

        ended_at = time.time()
        for camera_id, count in counts.items():
            # read but neither sent nor bad (the run stopped while it waited): dropped
            count.add("dropped", count.read - count.sent - count.bad - count.dropped)
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
        if reason == "stopped" and dispatcher.flights:
            # the end went first: with every stage stopping at once (the supervisor died),
            # management has it before it goes; the frames in flight may still be stored
            log.info("run %s: waiting up to %gs for the %d frame(s) in flight (a second stop "
                     "ends now)", run_id, STOPPED_DRAIN_S, len(dispatcher.flights))
            dispatcher.drain(finish, drain_s, until=time.monotonic() + STOPPED_DRAIN_S)
        return end
    finally:
        if frame_socket is not None:  # every frame sent is stored or given up by now
            frame_socket.close(linger=0)
        if control_socket is not None:
            control_socket.close(linger=CONTROL_LINGER_MS)
        if own_context:
            terminate(context)
