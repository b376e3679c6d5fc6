"""Crack management: storing runs, frames and cracks idempotently, querying them, rendering the
answers, and the management loop over real ZeroMQ sockets. Database tests run on SQLite and on
Postgres through the ``db_url`` fixture."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone

import pytest
import zmq
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session
from support import (
    MODEL,
    T0,
    crack_record,
    end_message,
    result_message,
    run_start_message,
)

from crackscan.config import ManagementConfig
from crackscan.sockets import SocketSpec
from crackscan.wire import (
    HeartbeatMessage,
    ResultMessage,
    RunStartMessage,
    StoredMessage,
    decode,
)
from management import store
from management.db import DEFAULT_URL, DatabaseError, make_engine, resolve_url, session_factory
from management.formats import render
from management.models import Crack, Frame, Run, Tunnel
from management.service import ManagementStats, run_management

RUN_A = "20261121-100000-aaaa"
RUN_B = "20261121-110000-bbbb"


def populate(session: Session) -> None:
    """Two runs; B's run_start is written first but A started earlier.

    A (cam0): seq 0 at 100 m: a fine longitudinal crack and a 0.35 mm circumferential one;
              seq 1 at 101 m: a 0.5 mm diagonal crack spanning 100.8..101.3 m; seq 2: none.
    B (cam0): seq 0 at 100.5 m: a 3.2 mm network; seq 1 at 250 m: a 0.25 mm longitudinal.
    """
    store.start_run(session, run_start_message(RUN_B, started_at=T0 + 3600))
    store.start_run(session, run_start_message(RUN_A))
    store.store_results(session, [
        result_message(RUN_A, 0, (crack_record(0, 100.0, 0.1, 20.0),
                                  crack_record(1, 100.2, 0.35, 120.0, "circumferential"))),
        result_message(RUN_A, 1, (crack_record(0, 101.0, 0.5, 300.0, "diagonal",
                                               span_m=(100.8, 101.3)),)),
        result_message(RUN_A, 2),
        result_message(RUN_B, 0, (crack_record(0, 100.5, 3.2, 800.0, "network"),),
                       chainage_m=100.5),
        result_message(RUN_B, 1, (crack_record(0, 250.0, 0.25, 60.0),), chainage_m=250.0),
    ])
    session.commit()


def frame_with_a_crack(seq: int) -> ResultMessage:
    """Frame ``seq`` of run A: one 0.3 mm wide, 80 mm long crack at its chainage, 100 + seq m."""
    return result_message(RUN_A, seq, (crack_record(0, 100.0 + seq, 0.3, 80.0),))


def keys(records: list[dict]) -> list[tuple[str, int, int]]:
    return [(r["run"], r["seq"], r["index"]) for r in records]


# --- store -------------------------------------------------------------------------------------

def test_results_round_trip_with_every_crack_field(session):
    store.start_run(session, run_start_message(RUN_A))
    first = crack_record(0, 100.0, 0.35, 120.0, "circumferential")
    assert store.store_results(session, [result_message(RUN_A, 0, (first,)),
                                         result_message(RUN_A, 1)]) == (2, 0)
    session.commit()

    [record] = store.query_cracks(session, run=RUN_A)
    for name, value in first.to_dict().items():  # floats are stored as doubles: exact
        assert record[name] == value, name
    assert (record["run"], record["camera"], record["seq"]) == (RUN_A, "cam0", 0)
    assert record["polyline"] == [[99.95, 1498.0], [100.0, 1500.0], [100.05, 1501.5]]
    assert datetime.fromisoformat(record["capture_time"]) == datetime.fromtimestamp(
        T0, tz=timezone.utc)
    frame = session.scalars(select(Frame).where(Frame.seq == 0)).one()
    assert (frame.width, frame.height, frame.crack_count, frame.worker) == (48, 32, 1, "worker-0")
    [run] = store.list_runs(session)
    assert (run["source"], run["mode"], run["model"], run["frames"], run["cracks"]) == (
        "drive.mp4", "replay", MODEL, 2, 1)


def test_a_duplicate_result_is_stored_once_and_counted(session):
    store.start_run(session, run_start_message(RUN_A))
    cracks = (crack_record(0, 100.0, 0.4, 50.0), crack_record(1, 100.1, 0.2, 30.0))
    assert store.store_results(session, [result_message(RUN_A, 0, cracks),
                                         result_message(RUN_A, 0, cracks)]) == (1, 1)
    session.commit()
    assert store.store_results(session, [result_message(RUN_A, 0, cracks),
                                         result_message(RUN_A, 1)]) == (1, 1)
    session.commit()

    assert session.scalar(select(func.count(Frame.id))) == 2
    assert session.scalar(select(func.count(Crack.id))) == 2
    [run] = store.list_runs(session)
    assert (run["frames"], run["cracks"], run["frames_duplicate"]) == (2, 2, 2)


def test_a_result_before_its_run_start_creates_the_run_lazily(session):
    store.store_results(session, [result_message(RUN_A, 0, (crack_record(0, 100.0, 0.4, 50.0),))])
    session.commit()
    [run] = store.list_runs(session)
    assert (run["id"], run["source"], run["status"], run["frames"]) == (
        RUN_A, "unknown", "running", 1)
    assert store.run_progress(session, RUN_A)["expected"] is None

    store.start_run(session, run_start_message(RUN_A, started_at=T0 - 5))
    session.commit()
    [run] = store.list_runs(session)
    assert (run["source"], run["mode"], run["cameras"], run["frames"]) == (
        "drive.mp4", "replay", ["cam0"], 1)
    assert datetime.fromisoformat(run["started_at"]).timestamp() == T0 - 5


def test_end_counts_each_camera_once_and_expected_waits_for_all_cameras(session):
    store.start_run(session, run_start_message(RUN_A, cameras=("cam0", "cam1")))
    store.store_results(session, [result_message(RUN_A, 0),
                                  result_message(RUN_A, 0, camera="cam1")])
    assert store.end_stream(session, end_message(RUN_A, "cam0", frames_sent=3))
    session.commit()
    assert store.run_progress(session, RUN_A)["expected"] is None

    assert not store.end_stream(session, end_message(RUN_A, "cam0", frames_sent=3))
    assert store.end_stream(session, end_message(RUN_A, "cam1", frames_sent=2, reason="stopped"))
    session.commit()
    progress = store.run_progress(session, RUN_A)
    assert (progress["expected"], progress["stored"], progress["missing"]) == (5, 2, 3)
    assert progress["end_reasons"] == ["end_of_source", "stopped"]
    [run] = store.list_runs(session)
    assert (run["frames_sent"], run["frames_read"], run["frames_bad"]) == (5, 7, 2)


def test_finish_run_sets_status_and_end_time(session):
    store.start_run(session, run_start_message(RUN_A))
    session.commit()
    store.finish_run(session, RUN_A, "incomplete")
    session.commit()
    [run] = store.list_runs(session)
    assert run["status"] == "incomplete"
    assert abs(datetime.fromisoformat(run["ended_at"]).timestamp() - time.time()) < 60
    with pytest.raises(ValueError, match="bad run status"):
        store.finish_run(session, RUN_A, "done")


def test_a_run_left_running_by_its_pipeline_is_closed_as_interrupted_and_merged(session):
    store.start_run(session, run_start_message(RUN_A))
    store.store_results(session, [frame_with_a_crack(seq) for seq in range(3)])
    session.commit()
    assert store.close_interrupted_run(session, RUN_A)
    session.commit()
    [run] = store.list_runs(session)
    assert run["status"] == "interrupted" and run["ended_at"] is not None
    assert run["physical_cracks"] >= 1
    assert session.scalar(select(func.count(Crack.id)).where(Crack.physical_id.is_(None))) == 0
    assert not store.close_interrupted_run(session, RUN_A)  # closed runs stay as they are
    assert not store.close_interrupted_run(session, "no-such-run")


def test_list_runs_oldest_first_with_counts(session):
    populate(session)
    store.end_stream(session, end_message(RUN_A, frames_sent=3))
    store.finish_run(session, RUN_A, "complete")
    session.commit()

    runs = store.list_runs(session)
    assert [run["id"] for run in runs] == [RUN_A, RUN_B]
    a, b = runs
    assert (a["status"], a["frames"], a["cracks"], a["frames_sent"], a["frames_read"]) == (
        "complete", 3, 3, 3, 4)
    assert (a["chainage_start_m"], a["chainage_end_m"]) == (100.0, 102.0)
    assert a["ended_at"] is not None and datetime.fromisoformat(a["ended_at"]).tzinfo
    assert (b["status"], b["frames"], b["cracks"], b["ended_at"]) == ("running", 2, 2, None)
    assert (b["chainage_start_m"], b["chainage_end_m"]) == (100.5, 250.0)
    assert datetime.fromisoformat(b["started_at"]).timestamp() == T0 + 3600


def test_one_run_s_summary_is_its_row_of_the_list(session):
    """``run_summary`` counts one run through its own rows: the same dict as its row of
    ``list_runs`` (merged and not, with gaps and a live run's latency), None for no run."""
    populate(session)
    store.start_run(session, run_start_message("live-run", mode="live"))
    store.store_results(session, [result_message("live-run", seq) for seq in (0, 1, 4)])
    store.merge_run(session, RUN_A)
    session.commit()
    runs = store.list_runs(session)
    assert {run["id"] for run in runs} == {RUN_A, RUN_B, "live-run"}
    for run in runs:
        assert store.run_summary(session, run["id"]) == run
    live = store.run_summary(session, "live-run")
    assert live["seq_gaps"] == 2 and live["latency_ms_p50"] is not None
    assert store.run_summary(session, RUN_A)["physical_cracks"] >= 1
    assert store.run_summary(session, "no-such-run") is None


# --- queries -----------------------------------------------------------------------------------

def test_query_without_filters_orders_by_run_then_chainage(session):
    populate(session)
    assert keys(store.query_cracks(session)) == [
        (RUN_A, 0, 0), (RUN_A, 0, 1), (RUN_A, 1, 0), (RUN_B, 0, 0), (RUN_B, 1, 0)]


def test_query_by_run(session):
    populate(session)
    assert keys(store.query_cracks(session, run=RUN_B)) == [(RUN_B, 0, 0), (RUN_B, 1, 0)]
    assert store.query_cracks(session, run="no-such-run") == []


def test_query_by_min_width_uses_max_width_inclusive(session):
    populate(session)
    assert keys(store.query_cracks(session, min_width_mm=0.3)) == [
        (RUN_A, 0, 1), (RUN_A, 1, 0), (RUN_B, 0, 0)]
    assert keys(store.query_cracks(session, min_width_mm=0.5)) == [(RUN_A, 1, 0), (RUN_B, 0, 0)]
    assert keys(store.query_cracks(session, run=RUN_B, min_width_mm=0.3)) == [(RUN_B, 0, 0)]


def test_query_by_min_length(session):
    populate(session)
    assert keys(store.query_cracks(session, min_length_mm=100)) == [
        (RUN_A, 0, 1), (RUN_A, 1, 0), (RUN_B, 0, 0)]
    assert store.query_cracks(session, min_length_mm=1000) == []


def test_query_by_chainage_keeps_cracks_overlapping_the_range(session):
    populate(session)
    assert keys(store.query_cracks(session, chainage=(100.0, 100.5))) == [
        (RUN_A, 0, 0), (RUN_A, 0, 1), (RUN_B, 0, 0)]
    # The diagonal crack's centroid (101.0 m) is outside, but it reaches 101.3 m.
    assert keys(store.query_cracks(session, chainage=(101.2, 200.0))) == [(RUN_A, 1, 0)]
    assert store.query_cracks(session, chainage=(300.0, 400.0)) == []


def test_query_by_type(session):
    populate(session)
    assert keys(store.query_cracks(session, crack_type="longitudinal")) == [
        (RUN_A, 0, 0), (RUN_B, 1, 0)]
    assert keys(store.query_cracks(session, crack_type="network")) == [(RUN_B, 0, 0)]


def test_query_limit(session):
    populate(session)
    assert keys(store.query_cracks(session, limit=2)) == [(RUN_A, 0, 0), (RUN_A, 0, 1)]
    assert store.query_cracks(session, limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        store.query_cracks(session, limit=-1)
    with pytest.raises(ValueError, match="min_width_mm"):
        store.query_cracks(session, min_width_mm=-0.1)


def test_parse_chainage():
    assert store.parse_chainage("1200:1500") == (1200.0, 1500.0)
    assert store.parse_chainage("-5.5:10") == (-5.5, 10.0)
    for bad in ("1500:1200", "1200", "a:b", "1:2:3", "nan:5", ""):
        with pytest.raises(ValueError, match="chainage range"):
            store.parse_chainage(bad)


# --- formats -----------------------------------------------------------------------------------

@pytest.fixture
def crack_records(tmp_path) -> Iterator[list[dict]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'formats.db'}")
    with session_factory(engine)() as session:
        populate(session)
        yield store.query_cracks(session)
    engine.dispose()


def test_render_csv_has_every_scalar_field(crack_records):
    rows = list(csv.DictReader(io.StringIO(render(crack_records, "csv"))))
    assert len(rows) == len(crack_records) == 5
    for row, record in zip(rows, crack_records, strict=True):
        assert (row["run"], int(row["seq"]), row["type"]) == (
            record["run"], record["seq"], record["type"])
        assert float(row["width_max_mm"]) == record["width_max_mm"]
        assert float(row["chainage_start_m"]) == record["chainage_start_m"]
    assert "polyline" not in rows[0] and "capture_time" in rows[0]
    picked = render(crack_records, "csv", columns=["run", "width_max_mm"])
    assert picked.splitlines()[:2] == ["run,width_max_mm", f"{RUN_A},0.1"]


def test_render_json_is_one_document_of_all_fields(crack_records):
    assert json.loads(render(crack_records, "json")) == crack_records
    assert json.loads(render([], "json")) == []


def test_render_geojson_linestrings_in_tunnel_coordinates(crack_records):
    collection = json.loads(render(crack_records, "geojson"))
    assert collection["type"] == "FeatureCollection"
    assert "chainage" in collection["properties"]["coordinates"]
    assert len(collection["features"]) == 5
    diagonal = collection["features"][2]
    assert diagonal["geometry"] == {"type": "LineString",
                                    "coordinates": [[100.8, 1498.0], [101.0, 1500.0],
                                                    [101.3, 1501.5]]}
    assert diagonal["properties"]["width_max_mm"] == 0.5
    assert diagonal["properties"]["type"] == "diagonal"
    assert "polyline" not in diagonal["properties"]


def test_render_table_aligns_columns(crack_records):
    lines = render(crack_records, "table").splitlines()
    assert len(lines) == 1 + 5
    header = lines[0].split()
    assert header[:4] == ["run", "camera", "seq", "index"] and "width_max_mm" in header
    column = lines[0].index("width_max_mm") + len("width_max_mm")
    assert [line[:column].split()[-1] for line in lines[1:]] == [
        "0.100", "0.350", "0.500", "3.200", "0.250"]
    assert render([], "table").strip() == "(no records)"


def test_render_runs_table_and_unknown_format(crack_records, tmp_path):
    runs = [{"id": RUN_A, "status": "complete", "mode": "replay", "source": "drive.mp4",
             "model": MODEL, "frames": 3, "cracks": 3, "started_at": "2026-11-18T00:00:00+00:00",
             "cameras": ["cam0"]}]
    table = render(runs, "table")
    assert table.splitlines()[0].split()[:2] == ["id", "status"]
    assert RUN_A in table and "complete" in table
    with pytest.raises(ValueError, match="unknown format 'xml'"):
        render(runs, "xml")


# --- engines -----------------------------------------------------------------------------------

def test_resolve_url(monkeypatch):
    monkeypatch.delenv("CRACKSCAN_DB", raising=False)
    assert resolve_url(None) == DEFAULT_URL == "sqlite:///crackscan.db"
    monkeypatch.setenv("CRACKSCAN_DB", "sqlite:///from-env.db")
    assert resolve_url(None) == "sqlite:///from-env.db"
    assert resolve_url("sqlite:///given.db") == "sqlite:///given.db"


def test_sqlite_engine_makes_directories_and_uses_wal(tmp_path):
    path = tmp_path / "deep" / "er" / "crackscan.db"
    engine = make_engine(f"sqlite:///{path}")
    try:
        with engine.connect() as connection:
            assert connection.execute(text("PRAGMA journal_mode")).scalar() == "wal"
            assert connection.execute(text("PRAGMA foreign_keys")).scalar() == 1
    finally:
        engine.dispose()
    assert path.is_file()


@pytest.mark.parametrize("url, says", [
    ("not a url", "bad database URL"),
    ("nosuchdialect://host/db", "unsupported database URL"),
    ("postgresql+psycopg://postgres:hunter2@127.0.0.1:1/test", "cannot connect to database"),
])
def test_bad_or_unreachable_database_is_one_clear_line(url, says):
    with pytest.raises(DatabaseError) as caught:
        make_engine(url)
    message = str(caught.value)
    assert message.startswith(says) and "\n" not in message
    assert "hunter2" not in message


def test_a_file_that_is_not_a_database_is_one_clear_line(tmp_path):
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are not the tables you are looking for" * 100)
    with pytest.raises(DatabaseError, match="cannot connect to database") as caught:
        make_engine(f"sqlite:///{path}")
    assert "\n" not in str(caught.value)


# --- the management loop over ZeroMQ -----------------------------------------------------------

def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.02)


class Management:
    """``run_management`` in a thread, with PUSH sockets for acquisition and workers."""

    def __init__(self, endpoint: str, engine: Engine, config: ManagementConfig,
                 exit_after_runs: int | None) -> None:
        self.endpoint = endpoint
        self.stop = threading.Event()
        self.stats = ManagementStats()
        self.finished_calls: list[tuple[str, str]] = []
        self.returned: list[str] | None = None
        self.context = zmq.Context()
        self.sockets: list[zmq.Socket] = []

        def target() -> None:
            self.returned = run_management(
                f"pull+bind:{endpoint}", engine, config, self.stop,
                exit_after_runs=exit_after_runs, stats=self.stats,
                on_run_finished=lambda run_id, status: self.finished_calls.append(
                    (run_id, status)))

        self.thread = threading.Thread(target=target, daemon=True)
        self.thread.start()

    def pusher(self) -> zmq.Socket:
        socket = SocketSpec.parse(f"push+connect:{self.endpoint}").open(self.context)
        socket.setsockopt(zmq.SNDTIMEO, 5000)
        self.sockets.append(socket)
        return socket

    def join(self, timeout: float = 10.0) -> list[str]:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "run_management did not return"
        assert self.returned is not None
        return self.returned

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for socket in self.sockets:
            socket.close(linger=0)
        self.context.term()


@pytest.fixture
def management(engine, tmp_path) -> Iterator[Callable[..., Management]]:
    started: list[Management] = []

    def start(config: ManagementConfig, exit_after_runs: int | None = 1) -> Management:
        started.append(Management(f"ipc://{tmp_path}/results", engine, config,
                                  exit_after_runs))
        return started[-1]

    yield start
    for each in started:
        each.close()


def runs_by_id(engine: Engine) -> dict[str, dict]:
    with session_factory(engine)() as session:
        return {run["id"]: run for run in store.list_runs(session)}


def test_management_stores_each_frame_once_and_completes_the_run(engine, management):
    service = management(ManagementConfig(batch_size=3, batch_seconds=0.05))
    acquisition, worker_a, worker_b = service.pusher(), service.pusher(), service.pusher()
    acquisition.send_multipart(run_start_message(RUN_A, cameras=("cam0", "cam1")).to_frames())
    wait_for(lambda: RUN_A in runs_by_id(engine))

    cam0 = [result_message(RUN_A, seq, (crack_record(0, 100.0 + seq, 0.3, 80.0),), worker="a")
            for seq in range(4)]
    cam1 = [result_message(RUN_A, seq, camera="cam1", worker="b") for seq in range(3)]
    for message in cam0[:2] + cam1[:1]:
        worker_a.send_multipart(message.to_frames())
    # Both ends arrive while results are still in flight; the run must wait for them.
    acquisition.send_multipart(end_message(RUN_A, "cam0", frames_sent=4).to_frames())
    acquisition.send_multipart(end_message(RUN_A, "cam1", frames_sent=3).to_frames())
    broken = cam0[2].to_frames()
    header = json.loads(broken[0])
    header["seq"] = "two"
    worker_b.send_multipart([json.dumps(header).encode(), broken[1]])  # names its run
    worker_b.send_multipart([b"\xff not a header"])  # names nothing
    worker_b.send_multipart(cam0[0].to_frames())  # a duplicate
    for message in cam0[2:] + cam1[1:]:
        worker_b.send_multipart(message.to_frames())

    assert service.join() == [RUN_A]
    assert service.finished_calls == [(RUN_A, "complete")]
    run = runs_by_id(engine)[RUN_A]
    assert (run["status"], run["frames"], run["cracks"], run["frames_sent"]) == (
        "complete", 7, 4, 7)
    assert (run["frames_duplicate"], run["frames_malformed"]) == (1, 1)
    assert (service.stats.stored, service.stats.duplicates, service.stats.malformed,
            service.stats.malformed_unattributed) == (7, 1, 2, 1)
    with session_factory(engine)() as session:
        assert session.scalar(select(func.count(Frame.id))) == 7
        assert [r["seq"] for r in store.query_cracks(session, run=RUN_A)] == [0, 1, 2, 3]
    # the run's acquisition (the peer that sent its run_start and ends), and only it, was told
    # of every frame once committed (the duplicate twice); the workers heard nothing
    reported = []
    while acquisition.poll(500):
        message = decode(acquisition.recv_multipart())
        assert isinstance(message, StoredMessage) and message.run_id == RUN_A
        reported += message.frames
    assert sorted(reported) == sorted([("cam0", 0)] + [("cam0", s) for s in range(4)]
                                      + [("cam1", s) for s in range(3)])
    assert not worker_a.poll(0) and not worker_b.poll(0)


def test_management_finishes_a_run_with_a_missing_result_as_incomplete(engine, management):
    service = management(ManagementConfig(batch_size=50, batch_seconds=0.05,
                                          drain_timeout_s=0.5))
    push = service.pusher()
    push.send_multipart(run_start_message(RUN_A).to_frames())
    for seq in (0, 1, 3):  # seq 2 never comes
        push.send_multipart(result_message(RUN_A, seq).to_frames())
    # Out of the 64-bit range: refused by the wire checks, counted as malformed, the rest kept.
    push.send_multipart(result_message(RUN_A, 2**70).to_frames())
    started = time.monotonic()
    push.send_multipart(end_message(RUN_A, frames_sent=4).to_frames())

    assert service.join() == [RUN_A]
    assert time.monotonic() - started >= 0.5
    run = runs_by_id(engine)[RUN_A]
    assert (run["status"], run["frames"], run["frames_sent"]) == ("incomplete", 3, 4)
    assert run["ended_at"] is not None
    assert (service.stats.stored, service.stats.malformed, service.stats.rejected) == (3, 1, 0)


def test_management_marks_a_run_stopped_by_the_operator(engine, management):
    service = management(ManagementConfig(batch_seconds=0.05))
    push = service.pusher()
    push.send_multipart(run_start_message(RUN_A).to_frames())
    for seq in range(2):
        push.send_multipart(result_message(RUN_A, seq).to_frames())
    push.send_multipart(end_message(RUN_A, frames_sent=2, reason="stopped").to_frames())

    assert service.join() == [RUN_A]
    assert runs_by_id(engine)[RUN_A]["status"] == "stopped"


def test_stop_stores_every_buffered_result_and_leaves_a_streaming_run_running(engine,
                                                                              management):
    # Batches far larger and slower than the test: only the stop can write these results.
    service = management(ManagementConfig(batch_size=1000, batch_seconds=600),
                         exit_after_runs=None)
    push = service.pusher()
    push.send_multipart(run_start_message(RUN_A).to_frames())
    wait_for(lambda: RUN_A in runs_by_id(engine))
    for seq in range(5):
        push.send_multipart(frame_with_a_crack(seq).to_frames())
    wait_for(lambda: service.stats.results == 5)
    assert runs_by_id(engine)[RUN_A]["frames"] == 0

    service.stop.set()
    assert service.join() == []
    run = runs_by_id(engine)[RUN_A]
    assert (run["status"], run["frames"], run["cracks"]) == ("running", 5, 5)


def test_a_run_whose_end_comes_just_after_management_s_stop_is_closed_as_stopped(engine,
                                                                                 management):
    """The whole pipeline stopped at once (a service manager, the supervisor killed): management
    has its stop a moment before acquisition's end of the run arrives, and still closes it."""
    service = management(ManagementConfig(batch_seconds=0.05), exit_after_runs=None)
    push = service.pusher()
    push.send_multipart(run_start_message(RUN_A).to_frames())
    for seq in range(2):
        push.send_multipart(result_message(RUN_A, seq).to_frames())
    wait_for(lambda: service.stats.results == 2)
    service.stop.set()
    time.sleep(0.5)
    push.send_multipart(end_message(RUN_A, frames_sent=2, reason="stopped").to_frames())
    assert service.join() == [RUN_A]
    assert runs_by_id(engine)[RUN_A]["status"] == "stopped"


def test_a_live_run_s_results_are_committed_as_they_come(engine, management):
    """Group commit for live runs: a result does not wait for the batch clock (600 s here, under
    which a replay's results wait: the test above), so the capture-to-stored latency of a live
    run is the pipeline's own."""
    service = management(ManagementConfig(batch_size=1000, batch_seconds=600),
                         exit_after_runs=None)
    push = service.pusher()
    push.send_multipart(run_start_message(RUN_A, mode="live").to_frames())
    wait_for(lambda: RUN_A in runs_by_id(engine))
    for seq in range(3):
        push.send_multipart(frame_with_a_crack(seq).to_frames())
        wait_for(lambda seq=seq: runs_by_id(engine)[RUN_A]["frames"] == seq + 1)
    assert runs_by_id(engine)[RUN_A]["status"] == "running"


# --- faults: the database going away, management restarted ------------------------------------

def test_a_database_outage_mid_run_loses_nothing_and_the_run_says_so(db_url, engine, tmp_path):
    """The database is taken away mid-run for real: on SQLite another process holds an exclusive
    lock, on Postgres the network to the server is cut (a TCP proxy drops every connection and
    refuses new ones). Results keep arriving; management buffers and retries them, and when the
    database is back every frame is stored once and the run counts the retries."""
    from netfault import TcpProxy
    from sqlalchemy import make_url

    url = make_url(db_url)
    proxy = None
    if url.get_backend_name() == "sqlite":
        service_url = url.update_query_dict({"timeout": "0.1"})  # fail fast on the lock

        def outage() -> Callable[[], None]:
            import sqlite3

            holder = sqlite3.connect(url.database, isolation_level=None)
            holder.execute("BEGIN EXCLUSIVE")
            return lambda: (holder.execute("ROLLBACK"), holder.close())
    else:
        proxy = TcpProxy((url.host, url.port or 5432))
        service_url = url.set(host="127.0.0.1", port=proxy.port)

        def outage() -> Callable[[], None]:
            proxy.cut()
            return proxy.restore

    service_engine = make_engine(service_url.render_as_string(hide_password=False))
    service = Management(f"ipc://{tmp_path}/results", service_engine,
                         ManagementConfig(batch_size=2, batch_seconds=0.05), exit_after_runs=1)
    try:
        push = service.pusher()
        push.send_multipart(run_start_message(RUN_A).to_frames())
        for seq in range(4):
            push.send_multipart(frame_with_a_crack(seq).to_frames())
        wait_for(lambda: runs_by_id(engine).get(RUN_A, {}).get("frames") == 4)

        back = outage()
        for seq in range(4, 10):
            push.send_multipart(frame_with_a_crack(seq).to_frames())
        push.send_multipart(end_message(RUN_A, frames_sent=10).to_frames())
        wait_for(lambda: service.stats.database_errors >= 2, timeout=20)
        assert service.thread.is_alive() and service.finished_calls == []
        back()

        assert service.join(timeout=30) == [RUN_A]
    finally:
        service.close()
        service_engine.dispose()
        if proxy is not None:
            proxy.close()
    run = runs_by_id(engine)[RUN_A]
    assert (run["status"], run["frames"], run["cracks"]) == ("complete", 10, 10)
    # a batch whose COMMIT reached the server just before the cut, its answer lost, is written
    # again and found stored: at most one batch counted duplicate, never stored twice
    assert run["frames_duplicate"] <= 2
    assert run["database_retries"] >= 2 and service.stats.rejected == 0
    assert run["physical_cracks"] >= 1  # merged once the database was back


def test_a_restarted_management_resumes_the_run(engine, management):
    """Management stopped mid-run and started again: the run carries on (not a new run), results
    sent twice around the restart are stored once, and it completes."""
    config = ManagementConfig(batch_size=2, batch_seconds=0.05)
    first = management(config, exit_after_runs=None)
    push = first.pusher()
    push.send_multipart(run_start_message(RUN_A).to_frames())
    for seq in range(5):
        push.send_multipart(frame_with_a_crack(seq).to_frames())
    wait_for(lambda: first.stats.stored == 5)
    first.close()
    assert runs_by_id(engine)[RUN_A]["status"] == "running"

    second = management(config, exit_after_runs=1)
    push = second.pusher()
    for seq in range(3, 8):  # 3 and 4 again: a worker re-sending what it was not sure of
        push.send_multipart(frame_with_a_crack(seq).to_frames())
    push.send_multipart(end_message(RUN_A, frames_sent=8).to_frames())
    assert second.join() == [RUN_A]
    run = runs_by_id(engine)[RUN_A]
    assert (run["status"], run["frames"], run["frames_duplicate"]) == ("complete", 8, 2)


@pytest.mark.slow
def test_a_killed_management_process_is_restarted_and_the_run_completes(tmp_path):
    """``crackscan manage`` killed with SIGKILL mid-run and started again on the same endpoint:
    what it had committed stays; a sender blocks while nobody listens (back-pressure, nothing
    dropped) and its results reach the new process."""
    import signal
    import subprocess
    import sys

    db = f"sqlite:///{tmp_path / 'cracks.db'}"
    endpoint = f"ipc://{tmp_path}/results"

    def start() -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "crackscan", "manage", "--results",
                                 f"pull+bind:{endpoint}", "--db", db, "--exit-after-runs", "1"],
                                stderr=subprocess.PIPE, text=True)

    reader = make_engine(db)
    context = zmq.Context()
    push = SocketSpec.parse(f"push+connect:{endpoint}").open(context)
    push.setsockopt(zmq.SNDTIMEO, 30_000)
    process = start()
    try:
        push.send_multipart(run_start_message(RUN_A).to_frames())
        for seq in range(5):
            push.send_multipart(frame_with_a_crack(seq).to_frames())
        wait_for(lambda: runs_by_id(reader).get(RUN_A, {}).get("frames") == 5, timeout=30)
        process.send_signal(signal.SIGKILL)
        process.wait(10)

        def send_the_rest() -> None:
            for seq in range(5, 9):
                push.send_multipart(frame_with_a_crack(seq).to_frames())
            push.send_multipart(end_message(RUN_A, frames_sent=9).to_frames())

        sender = threading.Thread(target=send_the_rest)
        sender.start()
        sender.join(1.0)
        assert sender.is_alive(), "a send to a dead management process should block"
        process = start()
        sender.join(30)
        assert not sender.is_alive()
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, stderr[-2000:]
    finally:
        if process.poll() is None:
            process.kill()
        push.close(linger=0)
        context.term()
    run = runs_by_id(reader)[RUN_A]
    assert (run["status"], run["frames"], run["frames_duplicate"]) == ("complete", 9, 0)
    reader.dispose()


def test_list_runs_counts_sequence_gaps_per_camera(session):
    store.start_run(session, run_start_message(RUN_A, cameras=("cam0", "cam1")))
    store.store_results(session, [result_message(RUN_A, seq) for seq in (0, 1, 3, 4, 7)]
                        + [result_message(RUN_A, seq, camera="cam1") for seq in (5, 7)])
    session.commit()
    (run,) = store.list_runs(session)
    assert run["seq_gaps"] == 3 + 1  # cam0 misses 2, 5, 6; cam1 misses 6


def test_runs_name_their_tunnel_and_vehicle_and_queries_filter_by_tunnel(session):
    north = RunStartMessage(run_id=RUN_A, source="a.mp4", mode="replay", started_at=T0,
                            config={"acquisition": {"tunnel": "North", "vehicle": "V1"}})
    south = RunStartMessage(run_id=RUN_B, source="b.mp4", mode="replay", started_at=T0 + 1,
                            config={"acquisition": {"tunnel": "South", "vehicle": None}})
    store.start_run(session, north)
    store.start_run(session, south)
    store.start_run(session, north)  # again: still one tunnel of that name
    store.store_results(session, [result_message(RUN_A, 0, (crack_record(0, 100.0, 0.3, 80.0),)),
                                  result_message(RUN_B, 0, (crack_record(0, 100.0, 0.3, 80.0),))])
    session.commit()
    runs = {run["id"]: run for run in store.list_runs(session)}
    assert (runs[RUN_A]["tunnel"], runs[RUN_A]["vehicle"]) == ("North", "V1")
    assert (runs[RUN_B]["tunnel"], runs[RUN_B]["vehicle"]) == ("South", None)
    assert {c["run"] for c in store.query_cracks(session, tunnel="North")} == {RUN_A}
    assert {c["run"] for c in store.query_physical(session, tunnel="South")} == {RUN_B}
    assert store.query_physical(session, tunnel="East") == []
    assert session.scalar(select(func.count()).select_from(Tunnel)) == 2


# --- runs whose pipeline died -------------------------------------------------------------------

def heartbeat_of(engine: Engine, run_id: str) -> datetime | None:
    with session_factory(engine)() as session:
        return session.get(Run, run_id).heartbeat_at


def test_management_writes_a_run_s_heartbeat_while_its_acquisition_is_heard(engine, management):
    service = management(ManagementConfig(batch_size=50, batch_seconds=0.05))
    acquisition = service.pusher()
    acquisition.send_multipart(run_start_message(RUN_A).to_frames())
    wait_for(lambda: RUN_A in runs_by_id(engine))
    old = datetime(2026, 1, 1, tzinfo=timezone.utc)
    with session_factory(engine).begin() as session:
        session.get(Run, RUN_A).heartbeat_at = old
    acquisition.send_multipart(HeartbeatMessage("acquisition", run_id=RUN_A).to_frames())
    wait_for(lambda: heartbeat_of(engine, RUN_A) > old)
    assert abs(heartbeat_of(engine, RUN_A).timestamp() - time.time()) < 60


def test_a_run_not_heard_from_is_closed_as_interrupted_when_the_database_is_next_opened(
        tmp_path):
    """A power cut leaves a run running with nobody to close it: the next command that opens
    the database closes it as interrupted (merged), once its heartbeat is STALE_RUN_S old; a
    run heard from recently is left running."""
    db = f"sqlite:///{tmp_path / 'x.db'}"
    engine = make_engine(db)
    with session_factory(engine).begin() as session:
        store.start_run(session, run_start_message(RUN_A))
        store.start_run(session, run_start_message(RUN_B))
        store.store_results(session, [frame_with_a_crack(seq) for seq in range(2)])
        session.get(Run, RUN_A).heartbeat_at = datetime.now(timezone.utc) - timedelta(
            seconds=store.STALE_RUN_S + 5)
    engine.dispose()
    engine = make_engine(db, create=False)  # any command: a read command too
    runs = runs_by_id(engine)
    assert runs[RUN_A]["status"] == "interrupted" and runs[RUN_A]["physical_cracks"] >= 1
    assert runs[RUN_B]["status"] == "running"
    engine.dispose()


def test_manage_serves_its_prometheus_metrics(tmp_path):
    """``crackscan manage --metrics HOST:PORT``: what it received, stored, skipped as duplicate
    or malformed and finished is on /metrics, with the capture-to-stored latency."""
    import socket
    import subprocess
    import sys
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    endpoint = f"ipc://{tmp_path}/results"
    process = subprocess.Popen([sys.executable, "-m", "crackscan", "manage", "--results",
                                f"pull+bind:{endpoint}", "--db", f"sqlite:///{tmp_path / 'x.db'}",
                                "--metrics", f"127.0.0.1:{port}"], stderr=subprocess.PIPE,
                               text=True)
    context = zmq.Context()
    push = SocketSpec.parse(f"push+connect:{endpoint}").open(context)
    try:
        push.send_multipart(run_start_message(RUN_A).to_frames())
        for seq in (0, 1, 1):
            push.send_multipart(frame_with_a_crack(seq).to_frames())
        push.send_multipart([b"\xff not a header"])
        push.send_multipart(end_message(RUN_A, frames_sent=2).to_frames())

        def samples() -> dict[tuple, float]:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as page:
                text = page.read().decode()
            return {(s.name, tuple(sorted(s.labels.items()))): s.value
                    for family in text_string_to_metric_families(text)
                    for s in family.samples}

        def finished() -> bool:
            try:
                return samples().get(("crackscan_management_runs_finished_total",
                                      (("status", "complete"),))) == 1
            except OSError:  # not serving yet
                return False

        wait_for(finished, timeout=30)
        got = samples()
        assert got[("crackscan_management_messages_total", (("type", "result"),))] == 3
        assert got[("crackscan_management_messages_total", (("type", "malformed"),))] == 1
        assert got[("crackscan_management_results_total", (("outcome", "stored"),))] == 2
        assert got[("crackscan_management_results_total", (("outcome", "duplicate"),))] == 1
        assert got[("crackscan_management_capture_to_stored_seconds_count", ())] == 3
    finally:
        process.terminate()
        process.wait(10)
        push.close(linger=0)
        context.term()


def test_a_full_disk_under_the_database_loses_nothing_and_the_run_completes_once_freed(
        tmp_path):
    """``crackscan manage`` whose files may not grow (RLIMIT_FSIZE: SQLite's writes fail as on a
    full disk): each batch that fails stays buffered and is retried, with an error line and no
    traceback; once there is room again (the limit lifted from outside), everything received
    is stored once and the run completes, its database retries counted."""
    import resource
    import subprocess
    import sys

    db_file = tmp_path / "x.db"
    make_engine(f"sqlite:///{db_file}").dispose()  # the schema, so the limit leaves little room
    limit = db_file.stat().st_size + 40_000
    endpoint = f"ipc://{tmp_path}/results"

    def cap_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    with (tmp_path / "err.txt").open("w") as err:
        process = subprocess.Popen([sys.executable, "-m", "crackscan", "manage", "--results",
                                    f"pull+bind:{endpoint}", "--db", f"sqlite:///{db_file}",
                                    "--exit-after-runs", "1"], stderr=err,
                                   preexec_fn=cap_file_size)
    context = zmq.Context()
    push = SocketSpec.parse(f"push+connect:{endpoint}").open(context)
    try:
        push.send_multipart(run_start_message(RUN_A).to_frames())
        count = 60
        for seq in range(count):
            push.send_multipart(result_message(RUN_A, seq, tuple(
                crack_record(i, 100.0 + seq, 0.3, 80.0) for i in range(8))).to_frames())
        wait_for(lambda: "cannot write to the database" in (tmp_path / "err.txt").read_text(),
                 timeout=30)
        assert process.poll() is None  # still serving, holding what it received
        resource.prlimit(process.pid, resource.RLIMIT_FSIZE,
                         (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        push.send_multipart(end_message(RUN_A, frames_sent=count).to_frames())
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
        push.close(linger=0)
        context.term()
    log = (tmp_path / "err.txt").read_text()
    assert "Traceback" not in log
    engine = make_engine(f"sqlite:///{db_file}")
    run = runs_by_id(engine)[RUN_A]
    engine.dispose()
    assert (run["status"], run["frames"], run["frames_duplicate"]) == ("complete", count, 0)
    assert run["database_retries"] > 0


def test_a_credit_or_stored_message_sent_to_management_is_counted_not_fatal(engine, management):
    """Valid messages of the other links (a worker's credit, a stored report) arriving on the
    results socket are malformed there: counted, and management goes on (found by the socket
    fuzz test: they once made it exit)."""
    from crackscan.wire import CreditMessage

    service = management(ManagementConfig(batch_size=50, batch_seconds=0.05))
    push = service.pusher()
    push.send_multipart(CreditMessage("w", 2, 1, (("cam0", 0),)).to_frames())
    push.send_multipart(StoredMessage(RUN_A, (("cam0", 0),)).to_frames())
    push.send_multipart(run_start_message(RUN_A).to_frames())
    push.send_multipart(result_message(RUN_A, 0).to_frames())
    push.send_multipart(end_message(RUN_A, frames_sent=1).to_frames())
    assert service.join() == [RUN_A]
    assert runs_by_id(engine)[RUN_A]["status"] == "complete"
    assert service.stats.malformed == 2
