"""End to end, as a user runs it: ``crackscan synth`` then ``crackscan run`` (real processes,
ZeroMQ sockets, SQLite, the bundled ONNX model), then ``runs`` / ``query`` read it back."""

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from support import crackscan, crackscan_concurrently

from management.truth import score_against_truth


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> tuple[Path, dict]:
    folder = tmp_path_factory.mktemp("drive")
    video, truth = folder / "drive.mp4", folder / "truth.json"
    crackscan("synth", "--out", str(video), "--seconds", "3", "--seed", "3", "--truth", str(truth))
    return video, json.loads(truth.read_text())


@pytest.fixture(scope="module")
def replay(drive, tmp_path_factory) -> dict:
    """One replay of the synthetic drive into SQLite, with everything a test reads back."""
    video, truth = drive
    db = f"sqlite:///{tmp_path_factory.mktemp('db') / 'cracks.db'}"
    summary = json.loads(crackscan("run", "--source", str(video), "--db", db, "--workers", "2",
                                   "--tunnel", "Gotthard north", "--vehicle", "V7",
                                   "--format", "json").stdout)
    runs, cracks, physical = (json.loads(done.stdout) for done in crackscan_concurrently(
        ("runs", "--db", db, "--format", "json"),
        ("query", "--db", db, "--detections", "--format", "json"),
        ("query", "--db", db, "--format", "json")))
    return {"db": db, "summary": summary, "runs": runs, "cracks": cracks, "physical": physical,
            "truth": truth}


@pytest.mark.slow
def test_every_frame_of_the_drive_is_stored_exactly_once(replay):
    truth, runs = replay["truth"], replay["runs"]
    assert len(runs) == 1
    run = runs[0]
    assert run["frames"] == truth["frames"] == replay["summary"]["frames"]
    assert run["frames_dropped"] == 0 and run["status"] == "complete"
    assert run["id"] == replay["summary"]["id"]
    assert (run["tunnel"], run["vehicle"]) == ("Gotthard north", "V7")
    for key in ("id", "source", "frames", "frames_dropped", "cracks", "started_at", "ended_at"):
        assert key in run


@pytest.mark.slow
def test_true_cracks_are_found_near_their_chainage(replay):
    cracks, truth = replay["cracks"], replay["truth"]
    assert cracks, "no crack detected in a drive with cracks"
    found = [t for t in truth["cracks"] if any(
        c["chainage_start_m"] - 0.05 <= t["chainage_m"] <= c["chainage_end_m"] + 0.05
        for c in cracks)]
    assert len(found) >= 0.6 * len(truth["cracks"]), (len(found), len(truth["cracks"]))


@pytest.mark.slow
def test_every_true_crack_is_one_physical_crack_measured_within_the_bars(replay):
    """Issue 6's acceptance on the test drive (3 true cracks, one cut by the first frame): each
    found as one physical crack, merged lengths within 15 % and mean widths within 30 %."""
    score = score_against_truth(replay["truth"]["cracks"], replay["physical"])
    assert score["found"] == score["true_cracks"] == 3, score["cracks"]
    assert score["physical_per_found_crack"] <= 1.2, score["cracks"]
    assert score["median_abs_length_error"] <= 0.15, score["cracks"]
    assert score["median_abs_width_error"] <= 0.30, score["cracks"]


@pytest.mark.slow
def test_physical_cracks_account_for_every_detection(replay):
    physical, cracks = replay["physical"], replay["cracks"]
    assert replay["runs"][0]["physical_cracks"] == len(physical) < len(cracks)
    assert [p["number"] for p in physical] == list(range(1, len(physical) + 1))
    assert all(p["merged"] for p in physical)  # stored when the run finished
    assert sum(p["detections"] for p in physical) == len(cracks)
    members = {}
    for crack in cracks:
        members.setdefault(crack["physical"], []).append(crack)
    for crack in physical:
        group = members[crack["number"]]
        assert len(group) == crack["detections"]
        # the median full view's maximum width (management.merge), one of the detections'
        assert crack["width_max_mm"] in {c["width_max_mm"] for c in group}
        assert crack["length_mm"] >= max(c["length_mm"] for c in group)
        assert crack["chainage_start_m"] == min(c["chainage_start_m"] for c in group)
        assert crack["chainage_end_m"] == max(c["chainage_end_m"] for c in group)


@pytest.mark.slow
@pytest.mark.postgres
@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
def test_postgres_and_sqlite_store_identical_records(replay, drive, db_url):
    """The same drive replayed into Postgres gives the records the SQLite replay gave: every
    field of every detection and physical crack but the run id and the wall-clock capture time
    (the same relative to the run's first frame, to the millisecond)."""
    video, _ = drive
    crackscan("run", "--source", str(video), "--db", db_url, "--workers", "2", "--format", "json")

    def comparable(records: list[dict]) -> list[dict]:
        first = min((r["capture_time"] for r in records if "capture_time" in r), default=None)
        out = []
        for record in records:
            record = {k: v for k, v in record.items() if k != "run"}
            if "capture_time" in record:
                # to the ms: each run's start time rounds to the microsecond its own way
                record["capture_time"] = round((datetime.fromisoformat(record["capture_time"])
                                                - datetime.fromisoformat(first)).total_seconds(), 3)
            out.append(record)
        return out

    queries = crackscan_concurrently(("query", "--db", db_url, "--detections", "--format", "json"),
                                     ("query", "--db", db_url, "--format", "json"))
    for done, sqlite_records in zip(queries, (replay["cracks"], replay["physical"]), strict=True):
        assert comparable(json.loads(done.stdout)) == comparable(sqlite_records)


@pytest.mark.slow
def test_db_merge_rebuilds_physical_cracks_with_another_link_distance(replay, tmp_path):
    db = f"sqlite:///{tmp_path / 'copy.db'}"
    with sqlite3.connect(replay["db"].removeprefix("sqlite:///")) as source, \
            sqlite3.connect(db.removeprefix("sqlite:///")) as copy:
        source.backup(copy)
    run = replay["runs"][0]["id"]
    assert len(replay["physical"]) >= 2
    # a link wider than the 8 m drive joins every detection into one physical crack
    wide = crackscan("db", "merge", "--db", db, "--run", run, "--link-mm", "20000").stdout
    merged = json.loads(crackscan("query", "--db", db, "--format", "json").stdout)
    assert wide.strip() == f"run {run}: {len(merged)} physical cracks"
    assert len(merged) == 1 < len(replay["physical"])
    assert sum(c["detections"] for c in merged) == len(replay["cracks"])
    again = crackscan("db", "merge", "--db", db).stdout  # every run, the default distance
    assert again.strip() == f"run {run}: {len(replay['physical'])} physical cracks"
    missing = crackscan("db", "merge", "--db", db, "--run", "nope", check=False)
    assert missing.returncode != 0 and "no run 'nope'" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1


@pytest.mark.slow
def test_query_json_carries_geometry_in_mm(replay):
    record = replay["cracks"][0]
    for key in ("run", "seq", "chainage_m", "length_mm", "width_mean_mm", "width_max_mm",
                "orientation_deg", "type"):
        assert key in record
    assert record["run"] == replay["runs"][0]["id"]
    assert record["length_mm"] > 0 and 0 < record["width_mean_mm"] <= record["width_max_mm"]


@pytest.mark.slow
def test_query_filters_and_formats(replay):
    db, cracks = replay["db"], replay["cracks"]
    lo, hi = sorted(c["chainage_m"] for c in cracks)[len(cracks) // 2] + np.array([-0.5, 0.5])
    wide, window, tunnel, elsewhere, geojson, csv_lines = crackscan_concurrently(
        ("query", "--db", db, "--detections", "--min-width-mm", "2", "--format", "json"),
        ("query", "--db", db, "--detections", "--chainage", f"{lo}:{hi}", "--format", "json"),
        ("query", "--db", db, "--tunnel", "Gotthard north", "--format", "json"),
        ("query", "--db", db, "--tunnel", "Gotthard south", "--format", "json"),
        ("query", "--db", db, "--format", "geojson"),
        ("query", "--db", db, "--detections", "--format", "csv"))
    wide = json.loads(wide.stdout)
    assert len(wide) == sum(c["width_max_mm"] >= 2 for c in cracks)
    window = json.loads(window.stdout)
    # a crack is in the window when its extent overlaps it (one crossing a bound counts)
    assert window and all(c["chainage_start_m"] <= hi and c["chainage_end_m"] >= lo
                          for c in window)
    assert len(window) == sum(c["chainage_start_m"] <= hi and c["chainage_end_m"] >= lo
                              for c in cracks)
    tunnel = json.loads(tunnel.stdout)
    assert tunnel == replay["physical"]
    assert json.loads(elsewhere.stdout) == []
    geojson = json.loads(geojson.stdout)
    assert geojson["type"] == "FeatureCollection"
    assert len(geojson["features"]) == len(replay["physical"])
    csv_lines = csv_lines.stdout.strip().splitlines()
    assert len(csv_lines) == len(cracks) + 1


@pytest.mark.slow
def test_image_folder_with_a_corrupt_image_stores_every_good_frame(drive, tmp_path):
    video, _ = drive
    folder = tmp_path / "frames"
    folder.mkdir()
    capture = cv2.VideoCapture(str(video))
    for i in range(6):
        ok, frame = capture.read()
        assert ok
        cv2.imwrite(str(folder / f"{i:04d}.jpg"), frame)
    capture.release()
    (folder / "0003.jpg").write_bytes(b"not a jpeg at all")
    db = f"sqlite:///{tmp_path / 'f.db'}"
    summary = json.loads(crackscan("run", "--source", str(folder), "--db", db, "--format",
                                   "json").stdout)
    assert summary["frames"] == 5 and summary["frames_bad"] == 1 and summary["frames_read"] == 6


@pytest.mark.parametrize("args, message", [
    (["run", "--source", "/no/such/video.mp4"], "not found"),
    (["run", "--source", "synthetic:1", "--model", "/no/such/model.onnx"], "model"),
    (["run", "--source", "synthetic:1", "--db", "nonsense://x"], "database"),
    (["query", "--db", "sqlite:///:memory:", "--chainage", "5:1"], "chainage"),
    (["eval", "--data", "/no/such/dataset"], "does not exist"),
])
def test_bad_input_is_one_clear_line_and_a_nonzero_exit(args, message, tmp_path):
    result = crackscan(*args, check=False, timeout=60)
    assert result.returncode == 2  # a user error
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(error_lines) == 1 and message in error_lines[0].lower(), result.stderr


def test_a_model_file_that_is_not_onnx_is_refused(tmp_path):
    fake = tmp_path / "model.onnx"
    fake.write_bytes(np.random.default_rng(0).bytes(1000))
    result = crackscan("run", "--source", "synthetic:1", "--model", str(fake), check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "not a usable onnx model" in result.stderr.lower()


def live(pids: list[str]) -> list[str]:
    """The processes of ``pids`` that still run (zombies, dead but not yet reaped, do not)."""
    alive = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, IndexError):
            continue
        if state != "Z":
            alive.append(pid)
    return alive


@pytest.mark.slow
def test_ctrl_c_stops_the_run_cleanly_and_keeps_every_frame_sent(tmp_path):
    """SIGINT mid-run (the operator's Ctrl-C): acquisition stops reading, everything already
    sent is stored, the run is closed as 'stopped', and no stage is left behind."""
    db_file = tmp_path / "stop.db"
    # output to files, not pipes: a pipe nobody reads while the run goes would block its
    # logging, and a stage that outlived the run would hold the pipe open and hang the reader
    out_file, err_file = tmp_path / "out.json", tmp_path / "err.log"
    with out_file.open("w") as out, err_file.open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "crackscan", "run", "--source", "synthetic:120", "--db",
             f"sqlite:///{db_file}", "--format", "json"], stdout=out, stderr=err, text=True)
    deadline = time.monotonic() + 120
    stored = 0
    while stored < 3 and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.5)
        if db_file.exists():
            try:
                with sqlite3.connect(db_file, timeout=1) as connection:
                    stored = connection.execute("select count(*) from frames").fetchone()[0]
            except sqlite3.OperationalError:  # tables not created yet
                pass
    assert stored >= 3, f"the run stored no frames before the deadline:\n{err_file.read_text()}"
    stages = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True,
                            text=True).stdout.split()
    assert len(stages) == 3, stages  # management, one worker, acquisition
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=240)
    except subprocess.TimeoutExpired:  # seen twice in full-suite runs, never alone: show why
        process.kill()
        process.wait()
        raise AssertionError(f"crackscan run did not end after SIGINT:\n"
                             f"{err_file.read_text()[-4000:]}") from None
    err = err_file.read_text()
    assert process.returncode == 0, err[-2000:]
    summary = json.loads(out_file.read_text())
    assert summary["status"] == "stopped" and summary["interrupted"]
    assert 3 <= summary["frames"] == summary["frames_sent"] < 120 * 25
    assert summary["frames_read"] == (summary["frames_sent"] + summary["frames_dropped"]
                                      + summary["frames_bad"])
    assert live(stages) == [], f"a pipeline stage outlived the run:\n{err[-2000:]}"


def test_stop_signals_during_a_run_are_counted_between_the_supervisors_steps():
    """While the stages run, Ctrl-C and SIGTERM only count: a KeyboardInterrupt raised inside the
    supervisor's ``Popen.poll()`` could leave that Popen's lock held, and the run would then
    never end. Afterwards the previous handlers are back."""
    from crackscan.pipeline import _counted_stop_signals

    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with _counted_stop_signals() as signals:
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while len(signals) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(signals) == [signal.SIGINT, signal.SIGTERM]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def start_run(tmp_path: Path, db_file: Path, source: str = "synthetic:200", *args: str
              ) -> tuple[subprocess.Popen, Path]:
    """``crackscan run`` on a (by default long) synthetic source, its temporary files (the
    socket folder) in their own folder; output to files (a stage that outlived the run would
    hold a pipe)."""
    temp = tmp_path / "temp"
    temp.mkdir()
    with (tmp_path / "out.txt").open("w") as out, (tmp_path / "err.txt").open("w") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "crackscan", "run", "--source", source, "--db",
             f"sqlite:///{db_file}", "--format", "json", *args], stdout=out, stderr=err,
            text=True, env={**os.environ, "TMPDIR": str(temp), "OMP_NUM_THREADS": "1"})
    return process, temp


def runs_in(db_file: Path) -> int:
    """Runs in ``db_file`` (0 before management has created it)."""
    try:
        with sqlite3.connect(db_file, timeout=1) as connection:
            return connection.execute("select count(*) from runs").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet
        return 0


def wait_for_stored(db_file: Path, count: int, process: subprocess.Popen,
                    timeout_s: float = 120) -> int:
    """Frames stored in ``db_file`` once at least ``count`` are (or the run ended)."""
    deadline = time.monotonic() + timeout_s
    stored = 0
    while stored < count and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.3)
        try:
            with sqlite3.connect(db_file, timeout=1) as connection:
                stored = connection.execute("select count(*) from frames").fetchone()[0]
        except sqlite3.OperationalError:  # not created yet
            pass
    return stored


def stages_of(pid: int) -> list[str]:
    return subprocess.run(["pgrep", "-P", str(pid)], capture_output=True,
                          text=True).stdout.split()


@pytest.mark.parametrize("after_s", [0.3, 1.5, 3.0])
def test_sigterm_while_the_run_starts_leaves_no_stage_and_no_socket_folder(tmp_path, after_s):
    """What a service manager sends, at any moment of the start-up (modules loading, checks,
    stages starting): the run ends within seconds as interrupted (130) or, once acquisition was
    running, stopped (0); no stage or socket folder is left behind."""
    process, temp = start_run(tmp_path, tmp_path / "x.db")
    time.sleep(after_s)
    stages = stages_of(process.pid)
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"crackscan run did not end after SIGTERM:\n"
                             f"{(tmp_path / 'err.txt').read_text()[-3000:]}") from None
    err = (tmp_path / "err.txt").read_text()
    if process.returncode == -signal.SIGTERM:  # the interpreter had not reached crackscan yet
        assert err == ""
    else:
        assert process.returncode in (0, 130), err[-2000:]
    if process.returncode == 0:
        assert json.loads((tmp_path / "out.txt").read_text())["status"] == "stopped"
    time.sleep(0.5)
    assert live(stages) == [], err[-2000:]
    assert list(temp.glob("crackscan-*")) == []  # the socket folder went with the run


@pytest.mark.slow
def test_stages_die_with_a_killed_supervisor_and_close_the_run(tmp_path):
    """kill -9 of ``crackscan run`` itself: each stage gets SIGTERM from the kernel (parent-death
    signal), so none outlives it, and management closes the run as stopped."""
    db_file = tmp_path / "x.db"
    process, _ = start_run(tmp_path, db_file)
    deadline = time.monotonic() + 120
    while len(stages_of(process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.2)
    stages = stages_of(process.pid)
    assert len(stages) == 3, (tmp_path / "err.txt").read_text()[-2000:]
    # the run has begun: its run_start is stored (a fixed wait raced slow start-ups)
    while time.monotonic() < deadline and not runs_in(db_file):
        time.sleep(0.2)
    assert runs_in(db_file), (tmp_path / "err.txt").read_text()[-2000:]
    process.send_signal(signal.SIGKILL)
    process.wait()
    deadline = time.monotonic() + 30
    while live(stages) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert live(stages) == [], (tmp_path / "err.txt").read_text()[-2000:]
    with sqlite3.connect(db_file) as connection:
        assert [row[0] for row in connection.execute("select status from runs")] == ["stopped"]


def stage_pids(process: subprocess.Popen, stage: str) -> list[int]:
    return [int(pid) for pid in subprocess.run(
        ["pgrep", "-P", str(process.pid), "-f", f"crackscan {stage}"], capture_output=True,
        text=True).stdout.split()]


@pytest.mark.slow
def test_every_stage_killed_or_frozen_in_turn_mid_replay_loses_no_frame(tmp_path):
    """One replay of 100 frames with two workers, as it goes: one worker frozen (SIGSTOP: it
    hangs, and is only silent), the other killed (-9), then management (and the frozen worker
    wakes up), then acquisition. The frames a worker held go to the others; a new worker,
    management and acquisition are started; acquisition sends again what management lost
    (``ack_timeout_s`` 2 s here); the new acquisition reads the source again and skips what is
    stored. The run completes, exit 0, every source frame stored exactly once."""
    db_file = tmp_path / "x.db"
    config = tmp_path / "pipeline.yaml"
    config.write_text("acquisition:\n  ack_timeout_s: 2\n")
    process, _ = start_run(tmp_path, db_file, "synthetic:4", "--workers", "2", "--config",
                           str(config))
    frozen = None
    try:
        for stored, stage, signal_number in ((5, "infer", signal.SIGSTOP),
                                             (15, "infer", signal.SIGKILL),
                                             (35, "manage", signal.SIGKILL),
                                             (55, "acquire", signal.SIGKILL)):
            assert wait_for_stored(db_file, stored, process) >= stored, \
                (tmp_path / "err.txt").read_text()[-3000:]
            if stage == "manage":  # the frozen worker is declared dead first, however fast
                deadline = time.monotonic() + 60  # the others store (an INT8 model is quick)
                while ("silent for" not in (tmp_path / "err.txt").read_text()
                       and time.monotonic() < deadline):
                    time.sleep(0.2)
            pid = next(p for p in stage_pids(process, stage) if p != frozen)
            os.kill(pid, signal_number)
            if signal_number == signal.SIGSTOP:
                frozen = pid
            elif stage == "manage":  # the frozen worker wakes up, long declared dead
                os.kill(frozen, signal.SIGCONT)
        process.wait(timeout=240)
    finally:
        with contextlib.suppress(ProcessLookupError, TypeError):  # the run's stop killed it
            os.kill(frozen, signal.SIGKILL)
    err = (tmp_path / "err.txt").read_text()
    assert process.returncode == 0, err[-3000:]
    for line in ("silent for", "inference worker exited (-9); starting another",
                 "management exited (-9); starting another",
                 "acquisition exited (-9); starting another", "sent again"):
        assert line in err, line
    summary = json.loads((tmp_path / "out.txt").read_text())
    assert summary["status"] == "complete" and summary["frames"] == 100
    assert summary["frames_read"] == 100  # the last acquisition's one pass
    with sqlite3.connect(db_file) as connection:
        seqs = [row[0] for row in connection.execute("select seq from frames order by seq")]
        cracks, linked = connection.execute(
            "select count(*), count(physical_id) from cracks").fetchone()
    assert seqs == list(range(100)) and cracks == linked


@pytest.mark.slow
def test_a_run_lost_to_a_power_cut_is_completed_by_resume(tmp_path):
    """Every process of a replay killed at once (a power cut): the run is left running with part
    of its frames. ``run --resume RUN_ID`` on the same source stores only the missing frames and
    completes it: each source frame stored once, read counts those of one pass."""
    db_file = tmp_path / "x.db"
    db = f"sqlite:///{db_file}"
    process, _ = start_run(tmp_path, db_file, "synthetic:3")
    assert wait_for_stored(db_file, 10, process) >= 10, (tmp_path / "err.txt").read_text()[-2000:]
    stages = stages_of(process.pid)
    for pid in [process.pid, *stages]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    process.wait()
    with sqlite3.connect(db_file) as connection:
        (run_id, status), = connection.execute("select id, status from runs")
        (before,) = connection.execute("select count(*) from frames").fetchone()
    assert status == "running" and 10 <= before < 75

    refused = [crackscan("run", "--source", "synthetic:4", "--db", db, "--resume", run_id,
                         check=False),
               crackscan("run", "--source", "synthetic:3", "--db", db, "--resume", "nope",
                         check=False)]
    assert [r.returncode for r in refused] == [2, 2]
    assert "read 'synthetic:3', not 'synthetic:4'" in refused[0].stderr
    assert "no run 'nope'" in refused[1].stderr

    summary = json.loads(crackscan("run", "--source", "synthetic:3", "--db", db, "--resume",
                                   run_id, "--format", "json").stdout)
    assert summary["id"] == run_id and summary["status"] == "complete"
    assert summary["frames"] == summary["frames_read"] == 75
    with sqlite3.connect(db_file) as connection:
        seqs = [row[0] for row in connection.execute("select seq from frames order by seq")]
        cracks, linked = connection.execute(
            "select count(*), count(physical_id) from cracks").fetchone()
    assert seqs == list(range(75)) and cracks == linked
    again = crackscan("run", "--source", "synthetic:3", "--db", db, "--resume", run_id,
                      check=False)
    assert again.returncode == 2 and "is complete: nothing to resume" in again.stderr
