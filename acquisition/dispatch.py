"""Acknowledged, credit-based dispatch of a run's frames to inference workers.

Acquisition binds the frame link (a ROUTER); each worker connects (a DEALER whose routing id is
its name) and says how many frames it may hold (``credit``, ``capacity``); a frame goes only to a
worker with a free slot. The frame is kept here until management reports its result stored
(``stored``, on the control link), so it can be sent again when it is lost on the way:

    new -> at worker W --(W's credit: done)--> result on its way --(stored)--> forgotten
                      \\--(W failed it, skipped it, or went silent)--> re-sent (first in line)
    result on its way --(no stored after ack_timeout_s: management lost it)--> re-sent

A worker is dead when neither its heartbeat thread nor its loop has said anything for
``WORKER_TIMEOUT_S`` (a worker busy with one long frame still beats), or when it cannot be
reached. A frame is sent at most ``MAX_SENDS`` times, then given up (logged; the run ends
incomplete). Management stores idempotently, so a frame sent twice is stored once.

Modes. ``replay`` waits for a free slot, re-sends, and waits at the end until every frame is
stored. ``live`` never waits: a worker holds at most ``capacity - 1`` frames (with batches of 1:
the one it is working on, so a frame never waits behind another), and a lost frame is not re-sent
(the next one is worth more); it is missing from the run as a dropped frame would be. A live
frame with no free slot is kept as its camera's standby frame, as a camera keeps its newest
image: the next frame of that camera replaces it (the older is dropped), and the moment a slot
frees the oldest standby goes out, unless it is older than ``late_s`` (dropped). So a worker that
finishes takes the newest frame at once instead of idling until the camera's next one, and no
frame waits longer than one frame period plus the time until a slot frees. What became of each
live frame is reported by :meth:`Dispatcher.take_outcomes`.

Memory: frames in flight are held encoded, at most ``in_flight_mb`` (one frame always fits), so
a slow management pushes back on the reader as a slow worker does.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import zmq

from crackscan import metrics
from crackscan.wire import (
    HEARTBEAT_S,
    WORKER_TIMEOUT_S,
    CreditMessage,
    FrameKey,
    HeartbeatMessage,
    StoredMessage,
    WireError,
    decode,
)

log = logging.getLogger(__name__)

MAX_SENDS = 3  # a frame is sent at most this many times, then given up
MAX_READS = 1000  # messages handled per pump before the caller gets its turn again
CHECK_EVERY_S = 0.1  # how often the clocks (silent workers, overdue stores) are looked at


@dataclass
class _Flight:
    parts: list[bytes]  # the encoded frame message
    size: int
    sends: int = 0
    worker: str | None = None  # holding it now
    done_at: float | None = None  # its worker sent the result at this (monotonic) time


@dataclass
class _Worker:
    name: str
    capacity: int
    last_seen: float
    held: deque[FrameKey] = field(default_factory=deque)  # sent to it, in order


@dataclass
class DispatchStats:
    resent: int = 0  # sends after a frame's first
    given_up: int = 0  # frames not stored after MAX_SENDS sends (replay) or lost (live)
    workers_lost: int = 0
    malformed: int = 0  # messages on either link that were not for us


class Dispatcher:
    """The frames of one run in flight between acquisition and management. ``frames``: the bound
    frame-link socket (ROUTER); ``control``: the control link to management (DEALER), where
    ``stored`` arrives and this run's heartbeat leaves."""

    def __init__(self, frames: zmq.Socket, control: zmq.Socket, run_id: str, mode: str,
                 ack_timeout_s: float, in_flight_mb: float, late_s: float = 0.2) -> None:
        self.frames, self.control = frames, control
        self.late_s = late_s  # live: a standby frame older than this is dropped, not sent
        # live: each camera's newest unsent frame (key, encoded parts, monotonic time offered)
        self.standby: dict[str, tuple[FrameKey, list[bytes], float]] = {}
        self.outcomes: list[tuple[FrameKey, bool]] = []  # live: (frame, sent?) not yet taken
        self.run_id, self.mode = run_id, mode
        self.ack_timeout_s = ack_timeout_s
        self.max_bytes = int(in_flight_mb * (1 << 20))
        self.flights: dict[FrameKey, _Flight] = {}
        self.bytes = 0
        self.resend: deque[FrameKey] = deque()
        self.workers: dict[str, _Worker] = {}
        self.stats = DispatchStats()
        self.poller = zmq.Poller()
        self.poller.register(frames, zmq.POLLIN)
        self.poller.register(control, zmq.POLLIN)
        now = time.monotonic()
        self.checked_at = self.beat_at = now
        self.progress_at = now  # the last time a frame was done or stored

    # --- sending -------------------------------------------------------------------------------

    def submit(self, key: FrameKey, parts: list[bytes], stop: threading.Event | None = None,
               wait_warning_s: float = 10.0) -> bool:
        """Send frame ``key`` (its encoded ``parts``) to a worker. Replay: waits for a free slot
        and for room in flight (re-sends go first), returns False only when ``stop`` is set.
        Live: use :meth:`offer`."""
        if self.mode == "live":
            raise ValueError("a live frame is offered (Dispatcher.offer), not submitted")
        self._hold(key, parts)
        waiting_since = time.monotonic()
        warned_at = waiting_since
        while True:
            if key not in self.flights:
                # reported stored while it waited: an earlier acquisition of the run sent it
                return True
            self._send_resends()
            if not self.resend and self._room_for(key) and self._send_new(key):
                return True
            if stop is not None and stop.is_set():
                self._forget(key)
                return False
            self.pump(100)
            if time.monotonic() - warned_at >= wait_warning_s:
                warned_at = time.monotonic()
                log.warning("run %s: frame %s/%d has waited %.0f s for an inference worker "
                            "(%d alive, %d frames in flight); still waiting", self.run_id,
                            key[0], key[1], warned_at - waiting_since, len(self.workers),
                            len(self.flights) - 1)

    def offer(self, key: FrameKey, parts: list[bytes]) -> None:
        """Live: send frame ``key`` now if a slot is free, else keep it as its camera's standby
        frame (the one it replaces is dropped). Never waits; see :meth:`take_outcomes`."""
        self.pump(0)  # slots freed since: standby frames go first
        if self._send_live(key, parts):
            return
        replaced = self.standby.get(key[0])
        if replaced is not None:
            self.outcomes.append((replaced[0], False))
        self.standby[key[0]] = (key, parts, time.monotonic())

    def wait(self, seconds: float, stop: threading.Event) -> bool:
        """Wait ``seconds`` handling the links meanwhile (credits, stored reports; live: standby
        frames go out as slots free); False when ``stop`` was set."""
        until = time.monotonic() + seconds
        while (left := until - time.monotonic()) > 0:
            if stop.is_set():
                return False
            self.pump(max(1, min(int(left * 1000), 50)))
        return not stop.is_set()

    def wait_for_worker(self, stop: threading.Event, timeout_s: float) -> bool:
        """Wait until an inference worker has said it takes frames; False after ``timeout_s``
        or when ``stop`` is set."""
        until = time.monotonic() + timeout_s
        while not self.workers:
            if stop.is_set() or time.monotonic() >= until:
                return False
            self.pump(50)
        return True

    def settle(self, stop: threading.Event) -> None:
        """Live, after the source: send the standby frames as slots free, or drop them once they
        are older than ``late_s`` (at once when ``stop`` is set)."""
        while self.standby and not stop.is_set():
            self.pump(10)
        self._drop_standby()

    def take_outcomes(self) -> list[tuple[FrameKey, bool]]:
        """Live: the frames sent (True) or dropped (False) since the last call."""
        outcomes, self.outcomes = self.outcomes, []
        return outcomes

    def _hold(self, key: FrameKey, parts: list[bytes]) -> None:
        """Keep frame ``key`` in flight (until stored, given up or forgotten)."""
        self.flights[key] = _Flight(parts, sum(len(p) for p in parts))
        self.bytes += self.flights[key].size

    def _send_live(self, key: FrameKey, parts: list[bytes]) -> bool:
        self._hold(key, parts)
        if self._send_new(key):
            self.outcomes.append((key, True))
            return True
        self._forget(key)
        return False

    def _send_standby(self) -> None:
        """Live: the oldest standby frames to free slots; those too old are dropped."""
        now = time.monotonic()
        for camera, (key, parts, offered) in sorted(self.standby.items(),
                                                    key=lambda item: item[1][2]):
            if now - offered > self.late_s:
                del self.standby[camera]
                self.outcomes.append((key, False))
            elif self._free_worker() is None or not self._send_live(key, parts):
                return
            else:
                del self.standby[camera]

    def _drop_standby(self) -> None:
        self.outcomes += [(key, False) for key, _parts, _offered in self.standby.values()]
        self.standby.clear()

    def _room_for(self, key: FrameKey) -> bool:
        """Within the memory bound (the frame being submitted always fits alone)."""
        return self.bytes <= self.max_bytes or len(self.flights) == 1

    def _slots(self, worker: _Worker) -> int:
        return worker.capacity if self.mode == "replay" else max(1, worker.capacity - 1)

    def _free_worker(self) -> _Worker | None:
        """The worker with the most free slots (None when every one is full)."""
        best, best_free = None, 0
        for worker in self.workers.values():
            free = self._slots(worker) - len(worker.held)
            if free > best_free:
                best, best_free = worker, free
        return best

    def _send_new(self, key: FrameKey) -> bool:
        while (worker := self._free_worker()) is not None:
            if self._send(worker, key):
                return True
        return False

    def _send_resends(self) -> None:
        while self.resend:
            key = self.resend[0]
            if key not in self.flights:  # stored meanwhile (its first result arrived after all)
                self.resend.popleft()
                continue
            worker = self._free_worker()
            if worker is None or not self._send(worker, key):
                return
            self.resend.popleft()
            self.stats.resent += 1
            metrics.DISPATCH_EVENTS.labels("resent").inc()

    def _send(self, worker: _Worker, key: FrameKey) -> bool:
        flight = self.flights[key]
        try:
            self.frames.send_multipart([worker.name.encode(), *flight.parts],
                                       flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: its frame socket is not (or no longer) here
            self._lose(worker, f"cannot be reached ({exc.strerror})")
            return False
        flight.sends += 1
        flight.worker, flight.done_at = worker.name, None
        worker.held.append(key)
        return True

    # --- receiving -----------------------------------------------------------------------------

    def pump(self, timeout_ms: int) -> None:
        """Handle what arrives within ``timeout_ms`` (and whatever is already queued), then the
        clocks: silent workers, results management has not stored, this run's heartbeat."""
        events = dict(self.poller.poll(timeout_ms))
        now = time.monotonic()
        for socket, handle in ((self.frames, self._on_frame_link),
                               (self.control, self._on_control_link)):
            for _ in range(MAX_READS if socket in events else 0):
                try:
                    parts = socket.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                handle(parts, now)
        if self.standby:
            self._send_standby()
        if now - self.checked_at >= CHECK_EVERY_S:
            self.checked_at = now
            self._check_clocks(now)
            metrics.FRAMES_IN_FLIGHT.set(len(self.flights))
            metrics.WORKERS.set(len(self.workers))
        if now - self.beat_at >= HEARTBEAT_S:
            self.beat_at = now
            try:
                self.control.send_multipart(
                    HeartbeatMessage(sender="acquisition", run_id=self.run_id).to_frames(),
                    flags=zmq.NOBLOCK)
            except zmq.Again:  # management is not reading: it will hear the next one
                pass

    def _on_frame_link(self, parts: list[bytes], now: float) -> None:
        """``parts``: the sending worker's routing id, then the message."""
        try:
            message = decode(parts[1:])
        except WireError as exc:
            self._malformed("frame", str(exc))
            return
        if isinstance(message, CreditMessage):
            self._on_credit(message, now)
        elif isinstance(message, HeartbeatMessage) and message.capacity > 0:
            self._worker(message.sender, message.capacity, now)
        else:
            self._malformed("frame", f"a {message.TYPE} message does not belong there")

    def _on_control_link(self, parts: list[bytes], now: float) -> None:
        try:
            message = decode(parts)
        except WireError as exc:
            self._malformed("control", str(exc))
            return
        if not isinstance(message, StoredMessage):
            self._malformed("control", f"a {message.TYPE} message does not belong there")
            return
        if message.run_id != self.run_id:
            return  # an older run's report (a management that restarted): nothing of ours
        for key in message.frames:
            if key in self.flights:
                self._forget(key)
                self.progress_at = now

    def _malformed(self, link: str, reason: str) -> None:
        self.stats.malformed += 1
        log.warning("run %s: a malformed message on the %s link skipped: %s", self.run_id, link,
                    reason)

    def _worker(self, name: str, capacity: int, now: float) -> _Worker:
        worker = self.workers.get(name)
        if worker is None:
            worker = self.workers[name] = _Worker(name, capacity, now)
            log.info("run %s: inference worker %s takes frames (%d at a time)", self.run_id,
                     name, capacity)
        worker.capacity, worker.last_seen = capacity, now
        return worker

    def _on_credit(self, message: CreditMessage, now: float) -> None:
        worker = self._worker(message.worker, message.capacity, now)
        done, failed = set(message.done), set(message.failed)
        for _ in range(min(message.consumed, len(worker.held))):
            key = worker.held.popleft()
            flight = self.flights.get(key)
            if flight is None or flight.worker != worker.name:
                continue  # stored already, or given to another worker meanwhile
            flight.worker = None
            if key in done:
                flight.done_at = now
                self.progress_at = now
            else:
                self._retry(key, f"worker {worker.name} "
                            f"{'failed on it' if key in failed else 'could not read it'}")

    # --- losses --------------------------------------------------------------------------------

    def _check_clocks(self, now: float) -> None:
        for worker in list(self.workers.values()):
            if now - worker.last_seen > WORKER_TIMEOUT_S:
                self._lose(worker, f"silent for {now - worker.last_seen:.1f} s")
        overdue = [key for key, flight in self.flights.items()
                   if flight.done_at is not None and now - flight.done_at > self.ack_timeout_s]
        for key in overdue:
            self.flights[key].done_at = None
            self._retry(key, f"its result was not stored within {self.ack_timeout_s:g} s")

    def _lose(self, worker: _Worker, why: str) -> None:
        """``worker`` is gone: the frames it held go to the others (it comes back, as new, with
        its next heartbeat)."""
        del self.workers[worker.name]
        self.stats.workers_lost += 1
        metrics.DISPATCH_EVENTS.labels("worker_lost").inc()
        held = [key for key in worker.held
                if key in self.flights and self.flights[key].worker == worker.name]
        log.warning("run %s: inference worker %s %s; %d frame(s) it held %s", self.run_id,
                    worker.name, why, len(held),
                    "go to other workers" if self.mode == "replay" else "are lost (live)")
        for key in held:
            self.flights[key].worker = None
            self._retry(key, f"worker {worker.name} is gone")

    def _retry(self, key: FrameKey, why: str) -> None:
        flight = self.flights[key]
        if self.mode == "live" or flight.sends >= MAX_SENDS:
            log.log(logging.ERROR if self.mode == "replay" else logging.INFO,
                    "run %s: frame %s/%d given up after %d send(s): %s", self.run_id, key[0],
                    key[1], flight.sends, why)
            self.stats.given_up += 1
            metrics.DISPATCH_EVENTS.labels("given_up").inc()
            self._forget(key)
            return
        log.info("run %s: frame %s/%d sent again: %s", self.run_id, key[0], key[1], why)
        self.resend.append(key)

    def _forget(self, key: FrameKey) -> None:
        flight = self.flights.pop(key)
        self.bytes -= flight.size

    # --- the end -------------------------------------------------------------------------------

    def drain(self, stop: threading.Event | None, idle_s: float,
              until: float | None = None) -> bool:
        """Wait until every frame in flight is stored (True) or given up. Returns False, leaving
        the rest, when ``stop`` is set, ``until`` (monotonic) passes, or no frame was done or
        stored for ``idle_s`` while no live worker held one (nothing is working on them)."""
        self.progress_at = time.monotonic()
        while self.flights:
            self._send_resends()
            now = time.monotonic()
            if stop is not None and stop.is_set() or until is not None and now >= until:
                return False
            held = any(flight.worker is not None for flight in self.flights.values())
            if not held and now - self.progress_at > idle_s:
                log.warning("run %s: %d frame(s) still in flight and no worker has made "
                            "progress for %.0f s: ending without them", self.run_id,
                            len(self.flights), idle_s)
                return False
            self.pump(100)
        return True
