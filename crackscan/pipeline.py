"""``crackscan run``: the three stages as separate processes wired over ZeroMQ.

    acquisition --frames (bind)--> N x inference --results--> management (bind)
         ^ \\------------------ run_start / end -------------------------^  |
         +-------------------------- stored ---------------------------------+

Every stage is started as ``python -m crackscan <stage>`` (exactly what a user runs to start a
stage alone) in its own process session, so a Ctrl-C at the terminal reaches only this
supervisor, which then stops the stages in order: acquisition first (it sends the end of stream
with its counts), management next (it stores everything still in flight and closes the run), the
workers last. SIGTERM stops a run the same way. Inputs are checked here before any process
starts, so a bad source, model or database is one clear error, not three crashed processes.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from acquisition.service import new_run_id, position_model
from acquisition.sources import open_source
from crackscan.config import PipelineConfig, load_pipeline_config
from crackscan.errors import Interrupted, RunIncomplete, UserError, signals_received
from crackscan.metrics import offset, parse_address
from inference.backends import bundled_model_path, open_segmenter
from management.db import make_engine, resolve_url, session_factory
from management.store import close_interrupted_run, reopen_run, run_summary, stored_frames

log = logging.getLogger(__name__)

STAGE_RESTARTS = 3  # restarts of management, of acquisition, and per worker slot, before the
# run is abandoned
STOP_GRACE_S = 30.0  # on Ctrl-C, management gets its drain timeout and this much more
RECORDING_CLOSE_S = 600.0  # how long a recording acquisition may take to write its last frames


class StageFailed(RuntimeError):
    pass


PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when the thread that forked it dies


def _die_with_supervisor(supervisor: int) -> None:
    """In a stage, between fork and exec: SIGTERM when the supervisor dies (kill -9 included), so
    no stage outlives it; exit at once if it died before this was set. Linux; elsewhere a no-op.
    A stage has its own session (a Ctrl-C at the terminal reaches the supervisor alone, which
    stops the stages in order), so the process group cannot do this."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() != supervisor:
        os._exit(1)


def _spawn(stage: str, args: list[str], verbose: bool) -> subprocess.Popen:
    command = [sys.executable, "-m", "crackscan"] + (["-v"] if verbose else []) + [stage] + args
    log.debug("starting %s", " ".join(command))
    supervisor = os.getpid()
    return subprocess.Popen(command, start_new_session=True, stdin=subprocess.DEVNULL,
                            preexec_fn=lambda: _die_with_supervisor(supervisor))


def _stop(process: subprocess.Popen, timeout: float) -> int:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return process.returncode


@contextlib.contextmanager
def _counted_stop_signals() -> Iterator[list[int]]:
    """While the stages run, SIGINT (Ctrl-C) and SIGTERM are only counted: the list yielded
    grows by one signal number per signal, and the supervisor looks at it between its own steps.

    Why not KeyboardInterrupt: it is raised wherever the main thread happens to be, and in the
    supervisor that is mostly inside ``Popen.poll()``. Raised between poll's ``acquire`` of the
    Popen's waitpid lock and the ``try`` that releases it, it leaves the lock held for good:
    that stage then polls as running for ever, and ``_stop``'s final ``wait()`` blocks for ever
    (a run that never ends after Ctrl-C, more likely on a busy machine). A handler that appends
    to a list takes no lock and raises nothing, so no step can be cut in half.

    The list starts with the signals the command received before (``signals_received``): one
    that C code swallowed during the checks still stops the run before a stage starts.

    Signals are handled in the main thread only; called from another thread, nothing is
    installed."""
    received = signals_received()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return

    def count(signum, frame):  # noqa: ARG001 - signal handler signature
        received.append(signum)

    previous = {signum: signal.signal(signum, count) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@dataclass
class _Stages:
    """The processes of one run and how to start each again."""

    manager: subprocess.Popen
    acquirer: subprocess.Popen
    pool: list[subprocess.Popen]
    start_manager: Callable[[], subprocess.Popen]
    start_worker: Callable[[], subprocess.Popen]
    # None: the source cannot be read again (a camera, a live run, a recording being written)
    start_acquirer: Callable[[], subprocess.Popen] | None


def _supervise(stages: _Stages, signals: list[int], finish_s: float) -> None:
    """Wait for management to finish the run, or for a stop signal to be counted in
    ``signals``; restart a stage that dies: an inference worker (acquisition sends the frames it
    held to the others), management (acquisition sends again what it was not told is stored),
    acquisition of a replay (the new one reads the source again and skips the frames stored).
    Gives up on a run whose acquisition ended ``finish_s`` ago without management closing it
    (its end was lost with a management that died)."""
    worker_restarts = manager_restarts = acquirer_restarts = 0
    acquisition_ended = None
    while (code := stages.manager.poll()) != 0:
        if signals:
            return
        if code is not None:
            manager_restarts += 1
            if manager_restarts > STAGE_RESTARTS:
                raise StageFailed(f"management exited with status {code}, "
                                  f"{manager_restarts} times")
            log.warning("management exited (%s); starting another: acquisition sends again "
                        "what it was not told is stored", code)
            stages.manager = stages.start_manager()
        if (status := stages.acquirer.poll()) not in (None, 0):
            acquirer_restarts += 1
            if stages.start_acquirer is None or acquirer_restarts > STAGE_RESTARTS:
                raise StageFailed(f"acquisition exited with status {status}")
            log.warning("acquisition exited (%s); starting another, which reads the source "
                        "again and skips the frames stored", status)
            stages.acquirer = stages.start_acquirer()
        elif status == 0:
            acquisition_ended = acquisition_ended or time.monotonic()
            if time.monotonic() - acquisition_ended > finish_s:
                log.warning("acquisition ended %.0f s ago and management has not closed the "
                            "run; stopping", finish_s)
                return
        for i, worker in enumerate(stages.pool):
            if worker.poll() is not None:
                worker_restarts += 1
                if worker_restarts > STAGE_RESTARTS * len(stages.pool):
                    raise StageFailed(f"inference workers keep failing (last status "
                                      f"{worker.returncode})")
                log.warning("inference worker exited (%s); starting another", worker.returncode)
                stages.pool[i] = stages.start_worker()
        time.sleep(0.1)


def _stored_frames(db_url: str, run_id: str) -> list[tuple[str, int]]:
    """(camera, seq) of every frame ``run_id`` has stored."""
    engine = make_engine(db_url)
    try:
        with session_factory(engine)() as session:
            return stored_frames(session, run_id)
    finally:
        engine.dispose()


def _without_flags(args: list[str], *flags: str) -> list[str]:
    """``args`` without each of ``flags`` and its value."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        else:
            out.append(arg)
    return out


def _wait_for_management(manager: subprocess.Popen, acquirer: subprocess.Popen, timeout: float,
                         signals: list[int]) -> None:
    """After the first stop signal: wait until management has finished the run (or given up on
    it after its drain timeout), ``timeout`` passes, a second stop signal is counted, or
    acquisition ends without sending its end of stream (stopped while it was still starting:
    management then has nothing to wait for)."""
    deadline = time.monotonic() + timeout
    while manager.poll() is None:
        if len(signals) > 1:
            log.info("stopped again: ending every stage now")
            return
        if acquirer.poll() not in (None, 0):
            log.info("acquisition ended before its end of stream (status %s): ending every "
                     "stage now", acquirer.returncode)
            return
        if time.monotonic() >= deadline:
            log.warning("management did not finish the run in time; stopping every stage")
            return
        time.sleep(0.1)


def run_pipeline(source: str, db_url: str | None, model: str | None, backend: str, workers: int,
                 mode: str, config_path: str | None, record: str | None,
                 verbose: bool = False, config: PipelineConfig | None = None,
                 acquire_args: list[str] | None = None, resume: str | None = None,
                 metrics_address: str | None = None) -> dict:
    """Run one source through the pipeline; returns the run summary (as ``runs`` reports it,
    plus wall time, fps, backend and workers). ``config``: the run's config when the caller
    changed it (source flags); ``acquire_args``: those flags, passed on to acquisition (which
    also takes ``--record``). ``resume``: complete that run (a replay of ``source`` that was
    interrupted): the frames it stored are skipped, the rest stored under its id.
    ``metrics_address``: HOST:PORT; each stage serves its metrics (acquisition on PORT,
    management PORT+1, worker N PORT+2+N)."""
    if workers < 1:
        raise UserError("--workers must be at least 1")
    if metrics_address:
        parse_address(metrics_address)  # a bad address is one line here, not a stage's death
    if config is None:
        config = load_pipeline_config(Path(config_path) if config_path else None)
    acquire_args = list(acquire_args or [])
    if resume and (record or mode != "replay"):
        raise UserError("--resume completes a replay: it takes neither --record nor --mode live")
    if record:
        if Path(record).exists() and (not Path(record).is_dir() or any(Path(record).iterdir())):
            raise UserError(f"--record {record}: the folder exists and is not empty; give a new "
                            "folder for the recording")
        if "--record" not in acquire_args:
            acquire_args += ["--record", record]
    db_url = resolve_url(db_url)
    # fail fast, in this process, on everything the user typed
    open_source(source, config).close()
    position_model(config)
    model_path = (Path(model) if model
                  else bundled_model_path(config.inference.precision, backend))
    segmenter = open_segmenter(model_path, backend, tta=config.inference.tta)
    backend_name = segmenter.backend
    del segmenter
    engine = make_engine(db_url)
    stored: list[tuple[str, int]] = []
    if resume:
        with session_factory(engine).begin() as session:
            stored = reopen_run(session, resume, source)
        log.info("resuming run %s: %d frames stored before are skipped", resume, len(stored))
    engine.dispose()

    run_id = resume or new_run_id()
    config_args = ["--config", str(config_path)] if config_path else []
    with tempfile.TemporaryDirectory(prefix="crackscan-") as sockets_dir:
        if resume:
            skip_file = Path(sockets_dir) / "stored.json"
            skip_file.write_text(json.dumps(stored))
            acquire_args += ["--skip-stored", str(skip_file)]
        frames = f"ipc://{sockets_dir}/frames"
        results = f"ipc://{sockets_dir}/results"
        # threads per worker: share the cores instead of oversubscribing them
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        worker_args = ["--frames", f"pull+connect:{frames}", "--results",
                       f"push+connect:{results}", "--model", str(model_path), "--backend",
                       backend, "--threads", threads] + config_args
        manager: subprocess.Popen | None = None
        acquirer: subprocess.Popen | None = None
        pool: list[subprocess.Popen] = []
        stages: _Stages | None = None  # once every stage has started
        failure: StageFailed | None = None
        started = time.monotonic()
        with _counted_stop_signals() as signals:
            try:
                if signals:  # a stop signal the checks swallowed: start nothing
                    raise Interrupted
                manager_args = ["--results", f"pull+bind:{results}", "--db", db_url,
                                "--exit-after-runs", "1"] + config_args
                acquirer_args = ["--source", source, "--frames", f"push+bind:{frames}",
                                 "--control", f"push+connect:{results}", "--run-id", run_id,
                                 "--mode", mode] + config_args + acquire_args
                ports = itertools.count(1)  # acquisition has PORT, the others PORT+1, +2...
                restarts = itertools.count(1)

                def metrics_args() -> list[str]:
                    # a restarted stage takes the next number: its predecessor's may be held
                    return (["--metrics", offset(metrics_address, next(ports))]
                            if metrics_address else [])

                def restart_acquirer() -> subprocess.Popen:
                    skip = Path(sockets_dir) / f"stored-{next(restarts)}.json"
                    skip.write_text(json.dumps(_stored_frames(db_url, run_id)))
                    return _spawn("acquire", _without_flags(acquirer_args, "--skip-stored",
                                                            "--metrics")
                                  + ["--skip-stored", str(skip)] + metrics_args(), verbose)

                manager = _spawn("manage", manager_args + metrics_args(), verbose)
                pool = [_spawn("infer", worker_args + metrics_args(), verbose)
                        for _ in range(workers)]
                acquirer = _spawn("acquire", acquirer_args + (
                    ["--metrics", metrics_address] if metrics_address else []), verbose)
                stages = _Stages(
                    manager, acquirer, pool,
                    start_manager=lambda: _spawn("manage", manager_args + metrics_args(),
                                                 verbose),
                    start_worker=lambda: _spawn("infer", worker_args + metrics_args(), verbose),
                    start_acquirer=restart_acquirer if mode == "replay" and not record else None)
                _supervise(stages, signals, config.management.drain_timeout_s + STOP_GRACE_S)
                if signals:
                    log.info("stopping: acquisition first, then management stores what is in "
                             "flight")
                    if stages.acquirer.poll() is None:
                        # it stops reading, sends its end, and keeps the frames it sent flowing
                        # to the workers until management has them (the second SIGTERM, below)
                        # or 8 s pass
                        stages.acquirer.send_signal(signal.SIGTERM)
                    # a second Ctrl-C while management drains ends everything at once (finally)
                    _wait_for_management(stages.manager, stages.acquirer,
                                         config.management.drain_timeout_s + STOP_GRACE_S,
                                         signals)
            except StageFailed as exc:
                failure = exc
            finally:
                if stages is not None:  # the stages running now, restarted ones included
                    acquirer, pool, manager = stages.acquirer, stages.pool, stages.manager
                for process in [acquirer, *pool, manager]:
                    if process is not None:
                        # acquisition finishes writing its recording before it exits
                        _stop(process, RECORDING_CLOSE_S if process is acquirer and record
                              else 10)
            stopping = bool(signals)
        wall_s = time.monotonic() - started

    engine = make_engine(db_url)
    with session_factory(engine).begin() as session:
        # every stage has ended: a run still "running" will never be closed by management
        if close_interrupted_run(session, run_id):
            log.warning("run %s was left running by its pipeline: closed as interrupted", run_id)
    with session_factory(engine)() as session:
        summary = run_summary(session, run_id)
    engine.dispose()
    if failure is not None:
        raise RunIncomplete(f"run {run_id} failed: {failure}")
    if summary is None:
        if stopping:  # stopped while the stages were starting: the run never began
            raise Interrupted
        raise RunIncomplete(f"run {run_id} left no record in {db_url}")
    summary.update(wall_s=wall_s, fps=summary["frames"] / wall_s if wall_s else 0.0,
                   backend=backend_name, workers=workers, db=db_url, interrupted=stopping)
    return summary
