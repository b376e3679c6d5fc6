"""The management process loop: receive run_start, result, heartbeat and end messages on one
socket, store them in batched transactions and decide when each run is finished.

Batches. A replay's results are written ``batch_size`` at a time or after ``batch_seconds``,
whichever comes first (fewer transactions). A live run's results are committed as soon as nothing
more waits on the socket (group commit: what arrives during one commit goes into the next), so
the capture-to-stored latency of a live run is the pipeline's own, not the batch clock's.

Acquisition (run_start, heartbeat, end) and every inference worker (result) send into the same
socket (a ROUTER: it knows who sent what). Once a transaction has committed, each run's
acquisition is told which of its frames are now in the database (``stored``), so it can forget
them, and re-send any it is not told about (``acquisition.dispatch``); the acquisition of a run
is whoever sent its run_start, heartbeat or end last. A run's heartbeat is written to the
database every ``RUN_HEARTBEAT_S``, so a run whose pipeline died can be told from one that runs
(``store.close_stale_runs``). Messages are applied to the database in the order they arrived,
so a run_start always precedes its run's results and ends in the same or an earlier
transaction (a result that overtakes its run_start creates the run lazily; see
:mod:`management.store`).

Loss rules, in order of importance:
- A received message is never dropped while the database can take it: a batch that fails for a
  transient reason (server down, SQLite busy, disk full) stays buffered and is retried, and the
  socket is not read while too much is buffered, which pushes back on inference and acquisition.
  A batch the database rejects for its data is retried one message at a time; only the message
  it refuses is dropped, logged and counted (``ManagementStats.rejected``).
- A message that fails the wire checks is logged, counted and skipped; never fatal. It is counted
  on its run (``runs.frames_malformed``) when its header is readable and names a run that exists
  in the database; otherwise only in ``ManagementStats.malformed_unattributed``.

A run is finished when every camera of its run_start has sent ``end`` and the frames stored
reach the sum of the ends' ``frames_sent``: status "stopped" when an end's reason was "stopped",
"incomplete" when one was "source_error" or "recording_error" (the source was not read to its
end), else "complete".
When all ends arrived but results are missing and nothing arrived for the run for
``drain_timeout_s``, the run is finished as "incomplete".
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import sqlalchemy.exc as sa_exc
import zmq
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from crackscan import metrics
from crackscan.config import ManagementConfig
from crackscan.sockets import KeyRing, SocketError, SocketSpec, terminate
from crackscan.wire import (
    MAX_FRAME_KEYS,
    MAX_PIXELS,
    EndOfStreamMessage,
    FrameKey,
    HeartbeatMessage,
    ResultMessage,
    RunStartMessage,
    StoredMessage,
    WireError,
    decode,
    parse_header,
)
from management import store
from management.db import describe_error, session_factory

log = logging.getLogger(__name__)

POLL_MS = 100  # how often ``stop`` and the batch / drain clocks are looked at
RESULTS_HWM = 1000  # messages queued per sender before it blocks
MAX_PENDING_BATCHES = 20  # stop reading the socket while this many batches wait for the database
RETRY_S = 1.0  # wait before retrying a batch the database could not take
STOP_DRAIN_S = 2.0  # on stop, keep reading what is queued (or a run's end) at most this long
STOP_DRAIN_QUIET_MS = 50  # ... until nothing arrives for this long
RUN_HEARTBEAT_S = 10.0  # a run's heartbeat is written at most this often (store.STALE_RUN_S)
MAX_UNSENT_ACKS = 100_000  # frames a run's acquisition may be owed before the oldest are dropped

OnRunFinished = Callable[[str, str], Any]  # (run_id, status)


@dataclass
class ManagementStats:
    """What one ``run_management`` call received and did (the database keeps per-run counts)."""

    messages: int = 0
    results: int = 0
    stored: int = 0
    duplicates: int = 0
    malformed: int = 0
    malformed_unattributed: int = 0
    rejected: int = 0
    database_errors: int = 0


@dataclass
class _RunWatch:
    last_activity: float  # monotonic time of the last message received for the run
    end_seen: bool = False
    all_ended: bool = False  # every run_start camera has ended (known after a progress check)
    dirty: bool = False  # something was committed for it since the last progress check
    finished: bool = False


def _is_transient(exc: BaseException) -> bool:
    """A database failure that a retry may cure (connection, lock, full disk), as opposed to
    the database refusing this data."""
    if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated


def _claimed_run(frames: list[bytes]) -> str | None:
    """The run id a malformed message's header names, when the header is readable at all."""
    try:
        header = parse_header(frames[0]) if frames else {}
    except WireError:
        return None
    run_id = header.get("run_id")
    return run_id if isinstance(run_id, str) and run_id else None


def _run_of(item: Any) -> str:
    """The run a pending operation is for: malformed and heartbeat ops hold only its id."""
    return item if isinstance(item, str) else item.run_id


class _Manager:
    """The state of one management loop: messages received but not committed, and per-run
    clocks. All database work goes through :mod:`management.store`."""

    def __init__(self, sessions: sessionmaker[Session], config: ManagementConfig,
                 stats: ManagementStats, on_run_finished: OnRunFinished | None,
                 max_pixels: int = MAX_PIXELS) -> None:
        self.max_pixels = max_pixels
        self.sessions = sessions
        self.config = config
        self.stats = stats
        self.on_run_finished = on_run_finished
        self.pending: list[tuple[str, Any]] = []  # (kind, message or run id), in arrival order
        self.pending_results = 0
        self.pending_control = False  # a run_start or end waits: flush without delay
        self.pending_live = False  # a live run's result waits: flush when the socket is idle
        self.live_runs: set[str] = set()  # runs whose run_start said mode "live"
        self.first_pending_at = 0.0
        self.retry_at = 0.0
        self.retries = 0  # failed attempts at writing what is pending now
        self.retries_noted: set[str] = set()  # runs already given those retries
        self.watches: dict[str, _RunWatch] = {}
        self.finished: list[str] = []
        self.acquisitions: dict[str, bytes] = {}  # run id -> its acquisition's peer on the socket
        self.acks: dict[str, list[FrameKey]] = {}  # run id -> frames committed, not yet reported
        self.beats: dict[str, float] = {}  # run id -> when its heartbeat was last queued

    # --- receiving ---------------------------------------------------------------------------

    def can_receive(self) -> bool:
        return len(self.pending) < self.config.batch_size * MAX_PENDING_BATCHES

    def _queue(self, kind: str, item: Any, now: float) -> None:
        if not self.pending:
            self.first_pending_at = now
        self.pending.append((kind, item))

    def _touch(self, run_id: str, now: float) -> _RunWatch:
        watch = self.watches.get(run_id)
        if watch is None:
            watch = self.watches[run_id] = _RunWatch(last_activity=now)
        watch.last_activity = now
        return watch

    def receive(self, frames: list[bytes], now: float, sender: bytes | None = None) -> None:
        """One message, from peer ``sender`` (None: it cannot be answered)."""
        self.stats.messages += 1
        try:
            message = decode(frames, self.max_pixels)
        except WireError as exc:
            metrics.MANAGEMENT_MESSAGES.labels("malformed").inc()
            self._malformed(_claimed_run(frames), str(exc), now)
            return
        metrics.MANAGEMENT_MESSAGES.labels(message.TYPE).inc()
        if sender is not None and isinstance(message, (RunStartMessage, HeartbeatMessage,
                                                       EndOfStreamMessage)) and message.run_id:
            self.acquisitions[message.run_id] = sender
        if isinstance(message, HeartbeatMessage):
            if message.run_id and now - self.beats.get(message.run_id, -RUN_HEARTBEAT_S) \
                    >= RUN_HEARTBEAT_S:
                self.beats[message.run_id] = now
                self._queue("heartbeat", message.run_id, now)
            return
        if isinstance(message, ResultMessage):
            self.stats.results += 1
            watch = self._touch(message.run_id, now)
            if watch.finished:
                log.warning("run %s: result for camera %s seq %d arrived after the run was "
                            "finished; storing it anyway", message.run_id, message.camera_id,
                            message.seq)
            self._queue("result", message, now)
            self.pending_results += 1
            self.pending_live = self.pending_live or message.run_id in self.live_runs
        elif isinstance(message, RunStartMessage):
            log.info("run %s started: source %s, mode %s, cameras %s", message.run_id,
                     message.source, message.mode, ", ".join(message.cameras))
            self._touch(message.run_id, now)
            if message.mode == "live":
                self.live_runs.add(message.run_id)
            self._queue("run_start", message, now)
            self.pending_control = True
        elif isinstance(message, EndOfStreamMessage):
            log.info("run %s camera %s ended (%s): %d frames sent, %d dropped, %d bad",
                     message.run_id, message.camera_id, message.reason, message.frames_sent,
                     message.frames_dropped, message.frames_bad)
            self._touch(message.run_id, now).end_seen = True
            self._queue("end", message, now)
            self.pending_control = True
        else:
            # a frame (or a worker's credit, or a stored report) sent here by mistake
            self._malformed(getattr(message, "run_id", None) or None,
                            f"a {message.TYPE} message does not belong on the results socket",
                            now)

    def _malformed(self, run_id: str | None, reason: str, now: float) -> None:
        self.stats.malformed += 1
        log.warning("malformed message%s skipped: %s",
                    f" for run {run_id}" if run_id else "", reason)
        if run_id is None:
            self.stats.malformed_unattributed += 1
        else:
            self._queue("malformed", run_id, now)

    # --- writing -----------------------------------------------------------------------------

    def flush_due(self, now: float, idle: bool = False) -> bool:
        """Whether to commit now; ``idle``: no message waits on the socket."""
        return bool(self.pending) and now >= self.retry_at and (
            self.pending_control or (self.pending_live and idle)
            or self.pending_results >= self.config.batch_size
            or now - self.first_pending_at >= self.config.batch_seconds)

    def _apply(self, session: Session, ops: list[tuple[str, Any]]) -> dict[str, int]:
        """Apply ``ops`` in order in ``session``; consecutive results go in one call."""
        counts = {"stored": 0, "duplicates": 0, "unattributed": 0}
        results: list[ResultMessage] = []

        def write_results() -> None:
            if results:
                stored, duplicates = store.store_results(session, results)
                counts["stored"] += stored
                counts["duplicates"] += duplicates
                results.clear()

        for kind, item in ops:
            if kind == "result":
                results.append(item)
                continue
            write_results()
            if kind == "run_start":
                store.start_run(session, item)
            elif kind == "end":
                store.end_stream(session, item)
            elif kind == "heartbeat":
                store.beat_run(session, item)
            elif not store.count_malformed(session, item):
                counts["unattributed"] += 1
        write_results()
        return counts

    def _committed(self, ops: list[tuple[str, Any]], counts: dict[str, int]) -> None:
        self.stats.stored += counts["stored"]
        self.stats.duplicates += counts["duplicates"]
        metrics.MANAGEMENT_RESULTS.labels("stored").inc(counts["stored"])
        metrics.MANAGEMENT_RESULTS.labels("duplicate").inc(counts["duplicates"])
        committed_at = time.time()
        for kind, item in ops:
            if kind == "result":
                metrics.CAPTURE_TO_STORED.observe(max(0.0, committed_at - item.capture_time))
        self.stats.malformed_unattributed += counts["unattributed"]
        for kind, item in ops:
            run_id = _run_of(item)
            if run_id in self.watches and kind != "heartbeat":
                self.watches[run_id].dirty = True
            if kind == "result":
                self._owe(item)

    def _owe(self, result: ResultMessage) -> None:
        """``result``'s frame is in the database (or refused for good): tell its acquisition."""
        owed = self.acks.setdefault(result.run_id, [])
        owed.append((result.camera_id, result.seq))
        if len(owed) > MAX_UNSENT_ACKS:  # an acquisition long gone: it would only re-send
            del owed[:len(owed) - MAX_UNSENT_ACKS]

    def send_acks(self, socket: zmq.Socket) -> None:
        """Report the frames committed to the acquisitions of their runs (those heard from). A
        report that cannot be queued is dropped: the frame is sent again and acknowledged then."""
        for run_id in [run for run in self.acks if run in self.acquisitions]:
            owed = self.acks.pop(run_id)
            peer = self.acquisitions[run_id]
            for start in range(0, len(owed), MAX_FRAME_KEYS):
                stored = StoredMessage(run_id, tuple(owed[start:start + MAX_FRAME_KEYS]))
                try:
                    socket.send_multipart([peer, *stored.to_frames()], flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    break

    def flush(self, now: float) -> bool:
        """Commit everything pending; returns False when some of it must wait for a retry."""
        if not self.pending:
            return True
        ops = self.pending
        try:
            with self.sessions.begin() as session:
                counts = self._apply(session, ops)
                noted = self._note_retries(session, ops)
        except Exception as exc:  # the data was refused (any driver error): bisect below
            if _is_transient(exc):
                return self._defer(exc, now)
            log.warning("a batch of %d messages was refused (%s); storing them one by one",
                        len(ops), describe_error(exc))
            return self._flush_one_by_one(now)
        self.retries_noted |= noted
        self._committed(ops, counts)
        self._clear_pending()
        return True

    def _flush_one_by_one(self, now: float) -> bool:
        while self.pending:
            op = self.pending[0]
            try:
                with self.sessions.begin() as session:
                    counts = self._apply(session, [op])
                    noted = self._note_retries(session, [op])
            except Exception as exc:
                if _is_transient(exc):
                    return self._defer(exc, now)
                self.stats.rejected += 1
                if op[0] == "result":
                    metrics.MANAGEMENT_RESULTS.labels("rejected").inc()
                kind, item = op
                what = (f"run {item}" if isinstance(item, str) else
                        f"run {item.run_id} camera {getattr(item, 'camera_id', '-')} "
                        f"seq {getattr(item, 'seq', '-')}")
                log.error("the database refused a %s message (%s), skipped: %s", kind, what,
                          describe_error(exc),
                          exc_info=not isinstance(exc, (sa_exc.SQLAlchemyError, ArithmeticError)))
                if kind == "result":  # sending it again would not change the answer
                    self._owe(item)
            else:
                self.retries_noted |= noted
                self._committed([op], counts)
            self.pending.pop(0)
        self._clear_pending()
        return True

    def _note_retries(self, session: Session, ops: list[tuple[str, Any]]) -> set[str]:
        """On the runs of ``ops``, in the transaction that finally stores them: how many retries
        the database's failure cost (their status shows the outage, and that nothing was lost).
        Returns the runs noted, for the caller to remember once the transaction committed."""
        if not self.retries:
            return set()
        runs = {_run_of(item) for _kind, item in ops}
        store.count_database_retries(session, runs - self.retries_noted, self.retries)
        return runs

    def _defer(self, exc: BaseException, now: float) -> bool:
        self.stats.database_errors += 1
        metrics.DATABASE_RETRIES.inc()
        self.retries += 1
        self.retry_at = now + RETRY_S
        log.error("cannot write to the database, %d messages kept for a retry in %.0f s: %s",
                  len(self.pending), RETRY_S, describe_error(exc))
        return False

    def _clear_pending(self) -> None:
        self.pending = []
        self.pending_results = 0
        self.pending_control = False
        self.pending_live = False
        self.retry_at = 0.0
        self.retries = 0
        self.retries_noted = set()

    # --- finishing runs ----------------------------------------------------------------------

    def _status(self, progress: dict[str, Any]) -> str:
        if "stopped" in progress["end_reasons"]:
            return "stopped"
        if {"source_error", "recording_error"} & set(progress["end_reasons"]):
            return "incomplete"
        return "complete"

    def check_runs(self, now: float) -> None:
        """Finish the runs that are done; call only when nothing is pending."""
        for run_id, watch in self.watches.items():
            if watch.finished or not watch.end_seen or now < self.retry_at:
                continue
            drained = now - watch.last_activity >= self.config.drain_timeout_s
            if not (watch.dirty or (watch.all_ended and drained)):
                continue
            try:
                with self.sessions() as session:
                    progress = store.run_progress(session, run_id)
            except sa_exc.SQLAlchemyError as exc:
                self._defer(exc, now)
                return
            watch.dirty = False
            watch.all_ended = progress["expected"] is not None
            if not watch.all_ended:
                continue
            if progress["stored"] >= progress["expected"]:
                self._finish(run_id, self._status(progress), progress, now)
            elif drained:
                log.warning("run %s: %d of %d results missing %.1f s after its last message; "
                            "finishing it as incomplete", run_id, progress["missing"],
                            progress["expected"], self.config.drain_timeout_s)
                self._finish(run_id, "incomplete", progress, now)

    def _finish(self, run_id: str, status: str, progress: dict[str, Any], now: float) -> None:
        try:
            with self.sessions.begin() as session:
                store.finish_run(session, run_id, status)
        except sa_exc.SQLAlchemyError as exc:
            self.watches[run_id].dirty = True  # look again after the retry
            self._defer(exc, now)
            return
        self.watches[run_id].finished = True
        self.finished.append(run_id)
        metrics.RUNS_FINISHED.labels(status).inc()
        log.info("run %s finished: %s, %d frames stored of %s expected, %d duplicates skipped",
                 run_id, status, progress["stored"], progress["expected"], progress["duplicates"])
        self._merge(run_id)
        if self.on_run_finished is not None:
            try:
                self.on_run_finished(run_id, status)
            except Exception:  # the caller's hook must not take the store down
                log.exception("on_run_finished(%r, %r) failed", run_id, status)

    def _merge(self, run_id: str) -> None:
        """Merge the finished run's detections into physical cracks. A failure leaves the run
        unmerged (queries merge it in memory; ``crackscan db merge`` stores it later): it must
        not keep the run from finishing."""
        try:
            with self.sessions.begin() as session:
                count = store.merge_run(session, run_id, self.config.merge_link_mm)
        except Exception:
            log.exception("run %s: merging its detections into physical cracks failed", run_id)
            return
        log.info("run %s: %d physical cracks", run_id, count)

    def streaming(self) -> bool:
        """Whether a run this process heard of has not finished and sent no end yet."""
        return any(not watch.finished and not watch.end_seen for watch in self.watches.values())

    def stop_runs(self, now: float) -> None:
        """On stop: finish the runs whose ends all arrived (as "stopped" if results are still
        missing: management stopped before they came). Runs still streaming stay "running", so
        a restarted management process carries on storing them."""
        for run_id, watch in self.watches.items():
            if watch.finished or not watch.end_seen:
                if not watch.finished:
                    log.info("run %s left running: not every camera has ended", run_id)
                continue
            try:
                with self.sessions() as session:
                    progress = store.run_progress(session, run_id)
            except sa_exc.SQLAlchemyError as exc:
                log.error("run %s: cannot read its progress on stop: %s", run_id,
                          describe_error(exc))
                continue
            if progress["expected"] is None:
                log.info("run %s left running: not every camera has ended", run_id)
            elif progress["stored"] >= progress["expected"]:
                self._finish(run_id, self._status(progress), progress, now)
            else:
                log.warning("run %s: stopping with %d of %d results missing", run_id,
                            progress["missing"], progress["expected"])
                self._finish(run_id, "stopped", progress, now)


def run_management(results: str, engine: Engine, config: ManagementConfig,
                   stop: threading.Event, exit_after_runs: int | None = None,
                   on_run_finished: OnRunFinished | None = None,
                   stats: ManagementStats | None = None,
                   keys: KeyRing | None = None, max_pixels: int = MAX_PIXELS) -> list[str]:
    """Receive on ``results`` (a ``pull+bind:`` SocketSpec string) and store into ``engine``
    until ``stop`` is set or ``exit_after_runs`` runs have finished; returns the ids of the runs
    finished, in the order they finished.

    ``on_run_finished(run_id, status)`` is called as each run finishes. ``stats``, when given,
    is filled in as messages arrive. On ``stop``, what is already queued on the socket is read
    and everything received is committed before returning. ``keys``: accept only authorized
    CURVE clients (needed to bind a non-loopback interface). ``max_pixels``: a result's mask
    over this is refused from its header (``acquisition.max_frame_pixels``).
    """
    spec = SocketSpec.parse(results, authenticated=keys is not None)
    if spec.pattern != "pull" or not spec.bind:
        raise SocketError(f"results socket {results!r}: management binds it to receive, "
                         "e.g. pull+bind:ipc:///tmp/crackscan/results")
    manager = _Manager(session_factory(engine), config, stats or ManagementStats(),
                       on_run_finished, max_pixels)
    context = zmq.Context()
    socket = spec.open(context, hwm=RESULTS_HWM, keys=keys)
    log.info("management receiving on %s, storing to %s", spec,
             engine.url.render_as_string(hide_password=True))
    try:
        while not stop.is_set():
            if exit_after_runs is not None and len(manager.finished) >= exit_after_runs:
                break
            if manager.can_receive():
                if socket.poll(POLL_MS):
                    sender, *frames = socket.recv_multipart()
                    manager.receive(frames, time.monotonic(), sender)
            else:
                stop.wait(POLL_MS / 1000)
            now = time.monotonic()
            if manager.flush_due(now, idle=not socket.poll(0)):
                manager.flush(now)
            manager.send_acks(socket)
            metrics.PENDING_MESSAGES.set(len(manager.pending))
            if not manager.pending:
                manager.check_runs(now)
        if stop.is_set():
            # What is queued is read; while a run has sent no end, for up to STOP_DRAIN_S: a
            # pipeline stopped all at once (a service manager, its supervisor killed) stops
            # acquisition too, whose end of the run comes a moment after this stop
            deadline = time.monotonic() + STOP_DRAIN_S
            while time.monotonic() < deadline:
                if socket.poll(STOP_DRAIN_QUIET_MS):
                    sender, *frames = socket.recv_multipart()
                    manager.receive(frames, time.monotonic(), sender)
                elif not manager.streaming():
                    break
        for _attempt in range(3):  # everything received is committed before returning
            if manager.flush(time.monotonic()):
                manager.send_acks(socket)
                break
            time.sleep(RETRY_S)
        else:
            log.error("%d received messages could not be stored before exit",
                      len(manager.pending))
        if stop.is_set():
            manager.stop_runs(time.monotonic())
    finally:
        socket.close(linger=0)
        terminate(context)
    stats = manager.stats
    log.info("management done: %d messages, %d results stored, %d duplicates, %d malformed, "
             "%d refused by the database", stats.messages, stats.stored, stats.duplicates,
             stats.malformed, stats.rejected)
    return list(manager.finished)
