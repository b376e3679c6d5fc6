"""The command's contract: its one-line help, exit statuses (0 ok, 1 run incomplete, 2 user
error, 3 internal error) and read commands that never create a database."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from support import crackscan

from crackscan import cli
from crackscan.errors import EXIT_INTERNAL_ERROR, EXIT_INTERRUPTED, EXIT_USER_ERROR

READ_COMMANDS = (
    ("runs",),
    ("query", "--min-width-mm", "0.2"),
    ("compare", "run-a", "run-b"),
    ("report", "--run", "run-a", "--out", "REPORT"),
    ("db", "current"),
    ("db", "merge"),
)


def test_top_level_help_says_what_crackscan_is_in_one_line():
    done = crackscan("--help", check=False)
    assert done.returncode == 0
    description = done.stdout.split("\n\n")[1]
    assert description.replace("\n", " ").startswith("crackscan: real-time crack inspection")
    assert description.rstrip().endswith(".")


@pytest.mark.parametrize("command", READ_COMMANDS, ids=" ".join)
def test_read_commands_never_create_a_missing_database(tmp_path, command):
    url = f"sqlite:///{tmp_path}/no/such/dir/x.db"
    args = [part.replace("REPORT", str(tmp_path / "r.html")) for part in command]
    done = crackscan(*args, "--db", url, check=False)
    assert done.returncode == EXIT_USER_ERROR, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "does not exist" in lines[0] and "Traceback" not in done.stderr
    assert done.stdout == ""
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the file


def test_read_command_refuses_a_file_without_crackscan_tables(tmp_path):
    empty = tmp_path / "empty.db"
    empty.touch()
    done = crackscan("query", "--db", f"sqlite:///{empty}", check=False)
    assert done.returncode == EXIT_USER_ERROR
    assert "holds no crackscan tables" in done.stderr.strip().splitlines()[-1]
    assert empty.stat().st_size == 0  # nothing was created in it


def test_writers_still_create_the_database(tmp_path):
    db = tmp_path / "new" / "x.db"
    done = crackscan("db", "upgrade", "--db", f"sqlite:///{db}", check=False)
    assert done.returncode == 0, done.stderr
    assert db.is_file()
    assert crackscan("runs", "--db", f"sqlite:///{db}", check=False).returncode == 0
    # the command line skips the last garbage collection at exit (crackscan.__main__), and the
    # engine `runs` left open is still closed: SQLite's -wal and -shm files went with it
    assert sorted(path.name for path in db.parent.iterdir()) == ["x.db"]


def test_a_bad_flag_value_is_a_user_error():
    done = crackscan("synth", "--out", "unused.mp4", "--seconds", "0", check=False)
    assert done.returncode == EXIT_USER_ERROR
    assert done.stderr.strip() == "crackscan: error: seconds must be a positive number, got 0.0"


def test_an_unexpected_exception_is_an_internal_error(tmp_path, monkeypatch, capsys):
    import management.store

    url = f"sqlite:///{tmp_path}/x.db"
    assert cli.main(["db", "upgrade", "--db", url]) == 0

    def broken(session):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(management.store, "list_runs", broken)
    assert cli.main(["runs", "--db", url]) == EXIT_INTERNAL_ERROR
    assert "crackscan: error" not in capsys.readouterr().err  # not shown as the user's fault
    with pytest.raises(ValueError, match="a bug"):
        cli.main(["--debug", "runs", "--db", url])


def test_the_backend_flag_offers_every_backend_the_factory_knows():
    from crackscan.cli.common import BACKENDS
    from inference.backends import BACKENDS as FACTORY_BACKENDS

    assert BACKENDS == FACTORY_BACKENDS


def test_a_run_that_fails_midway_is_exit_1_in_one_line(monkeypatch, capsys):
    import crackscan.pipeline
    from crackscan.errors import EXIT_INCOMPLETE, RunIncomplete

    def stage_failed(**kwargs):
        raise RunIncomplete("run r1 failed: management exited with status 3")

    monkeypatch.setattr(crackscan.pipeline, "run_pipeline", stage_failed)
    assert cli.main(["run", "--source", "synthetic:1"]) == EXIT_INCOMPLETE
    assert capsys.readouterr().err.strip() == (
        "crackscan: error: run r1 failed: management exited with status 3")


def test_signals_stop_a_stage_then_end_it_now():
    from crackscan.cli.common import stop_on_signals

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        again = threading.Event()
        stop = stop_on_signals(again=again)
        threading.Timer(0.05, os.kill, (os.getpid(), signal.SIGTERM)).start()
        assert stop.wait(10) and not again.is_set()  # signalled while waiting on the event
        os.kill(os.getpid(), signal.SIGINT)
        assert again.wait(10)
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_what_fails_after_a_stop_signal_is_reported_as_interrupted(monkeypatch, capsys):
    """A signal that cuts an import of a C extension short surfaces as that extension's own
    ImportError (onnxruntime prints the interrupt and raises "import numpy failed"): after a
    stop signal the command is interrupted (130), not broken (3)."""

    def runs_cut_short(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)  # the handler raises here
        except KeyboardInterrupt:
            raise ImportError("import numpy failed") from None

    monkeypatch.setattr(cli.records, "cmd_runs", runs_cut_short)
    assert cli.main(["runs"]) == EXIT_INTERRUPTED
    assert capsys.readouterr().err.strip().splitlines()[-1] == "crackscan: interrupted"

    def runs_broken(args):
        raise ImportError("no module named x")

    monkeypatch.setattr(cli.records, "cmd_runs", runs_broken)
    assert cli.main(["runs"]) == EXIT_INTERNAL_ERROR


def swallowed_sigterm():
    """A SIGTERM whose Interrupted is lost where it landed, as when C code (numpy, Cython's set-up
    of a module being imported) clears the exception of a Python call-back it made."""
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    except KeyboardInterrupt:
        pass


def test_a_run_whose_stop_signal_was_swallowed_during_its_checks_starts_no_stage(
        tmp_path, monkeypatch, capsys):
    from crackscan import pipeline

    real_open_source = pipeline.open_source

    def open_source(*args):
        swallowed_sigterm()
        return real_open_source(*args)

    spawned = []

    def spawn(stage, *args):
        spawned.append(stage)
        raise RuntimeError("no stage should start")

    monkeypatch.setattr(pipeline, "open_source", open_source)
    monkeypatch.setattr(pipeline, "_spawn", spawn)
    db_file = tmp_path / "x.db"
    assert cli.main(["run", "--source", "synthetic:1", "--db", f"sqlite:///{db_file}"]) == \
        EXIT_INTERRUPTED
    assert spawned == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "crackscan: interrupted"
    with sqlite3.connect(db_file) as connection:
        assert connection.execute("select count(*) from runs").fetchone()[0] == 0


def test_a_stage_stops_on_a_signal_swallowed_while_it_started():
    from crackscan.cli.common import stop_on_signals
    from crackscan.errors import signals_interrupt, signals_received

    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        with signals_interrupt() as received:
            swallowed_sigterm()
            assert received == signals_received() == [signal.SIGTERM]
            again = threading.Event()
            assert stop_on_signals(again=again).wait(10) and not again.is_set()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    assert signals_received() == []


def test_a_signal_swallowed_while_the_command_loaded_runs_no_command(monkeypatch, capsys):
    """``crackscan`` takes the signals before ``crackscan.cli`` loads (``crackscan.__main__``);
    one lost there is still the command's: ``main`` runs nothing."""
    from crackscan.errors import signals_interrupt

    ran = []
    monkeypatch.setattr(cli.records, "cmd_runs", ran.append)
    with signals_interrupt():
        swallowed_sigterm()
        assert cli.main(["runs"]) == EXIT_INTERRUPTED
    assert ran == []
    assert capsys.readouterr().err.strip().splitlines()[-1] == "crackscan: interrupted"


INTERRUPTED_IN_EXEC = """
import sys

from crackscan.cli import records


def runs(args):
    # SIGTERM lands while a string is executed, as while dataclasses make a class's methods
    exec("import os, signal\\nos.kill(os.getpid(), signal.SIGTERM)\\nwhile True: pass")


records.cmd_runs = runs
sys.argv = ["crackscan", "runs"]
from crackscan.__main__ import run

raise SystemExit(run())
"""


def test_sigterm_inside_exec_still_exits_130(tmp_path):
    """CPython 3.11 marks a builtin KeyboardInterrupt that passed through ``exec`` as unhandled
    even once caught, and an interpreter started with ``-m`` (as the stages and ``crackscan run``
    are) would then die by SIGINT (-2) instead of exiting 130; crackscan's own ``Interrupted``
    is never marked."""
    (tmp_path / "interrupted.py").write_text(INTERRUPTED_IN_EXEC)
    done = subprocess.run([sys.executable, "-m", "interrupted"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == EXIT_INTERRUPTED, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "crackscan: interrupted"
    assert "Traceback" not in done.stderr


def test_demo_draws_and_runs_a_drive_with_the_given_config(tmp_path):
    config = tmp_path / "slow.yaml"
    config.write_text("acquisition: {speed_kmh: 5.0}\ninference: {line_min_share: 0.0}\n")
    out = tmp_path / "demo"
    done = crackscan("demo", "--seconds", "0.4", "--out", str(out), "--config", str(config))
    assert "true cracks in the synthetic drive" in done.stdout
    truth = json.loads((out / "tunnel_drive_truth.json").read_text())
    assert truth["speed_kmh"] == 5.0 and truth["frames"] == 10
    bad = crackscan("demo", "--out", str(out), "--config", str(tmp_path / "none.yaml"),
                    check=False)
    assert bad.returncode == EXIT_USER_ERROR and "Traceback" not in bad.stderr
