"""Acquisition on a vehicle, end to end: a rig of two cameras, recording and replaying a run,
live mode against a slow consumer, per-frame metadata and odometer positions, CURVE keys.

Real processes (``crackscan run`` as a user types it), ZeroMQ sockets, SQLite, OpenCV videos and
the bundled ONNX model; inputs kept small (1-2 s synthetic drives at 640x360)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
import zmq
from support import (
    Consumer,
    crackscan,
    crackscan_concurrently,
    frame_image,
    run_in_thread,
    write_video,
)

from acquisition.frames import SourceError
from acquisition.recording import Recorder, RecordingSource, is_recording
from acquisition.sources import open_source
from crackscan.config import AcquisitionConfig, PipelineConfig, PositionConfig
from crackscan.sockets import KeyRing, SocketSpec, create_keys, terminate

CRACK_FIELDS = ("camera", "seq", "index", "chainage_m", "arc_mm", "length_mm", "width_max_mm",
                "width_mean_mm", "orientation_deg", "type", "severity")


@pytest.fixture(scope="module")
def drive(tmp_path_factory) -> Path:
    """A 1.2 s synthetic tunnel drive (30 frames of 640x360) with cracks."""
    video = tmp_path_factory.mktemp("vehicle") / "drive.mp4"
    crackscan("synth", "--out", str(video), "--seconds", "1.2", "--seed", "5")
    return video


def sqlite_rows(db: str, sql: str) -> list[tuple]:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        return connection.execute(sql).fetchall()


def crack_records(*dbs: str) -> list[list[tuple]]:
    """The detections stored in each database, as sorted tuples of CRACK_FIELDS."""
    queries = crackscan_concurrently(*(("query", "--db", db, "--detections", "--format", "json")
                                       for db in dbs))
    return [sorted(tuple(record[f] for f in CRACK_FIELDS) for record in json.loads(done.stdout))
            for done in queries]


# --- recording and replay -----------------------------------------------------------------------

@pytest.mark.slow
def test_a_recorded_run_replays_to_identical_crack_records(drive, tmp_path):
    recording = tmp_path / "recording"
    first, second = (f"sqlite:///{tmp_path / name}" for name in ("first.db", "second.db"))
    original = json.loads(crackscan("run", "--source", str(drive), "--record", str(recording),
                                    "--db", first, "--format", "json").stdout)
    assert original["status"] == "complete" and original["frames"] == 30
    assert is_recording(recording)
    manifest = json.loads((recording / "manifest.json").read_text())
    assert manifest["complete"] and manifest["frames"] == 30
    # the office replays the recording with another position setting: the recording's own
    # timestamps and chainages win
    runs, replayed = crackscan_concurrently(
        ("runs", "--db", first, "--format", "json"),
        ("run", "--source", recording, "--db", second, "--chainage-file",
         write_chainage_file(tmp_path), "--format", "json"))
    (run,) = json.loads(runs.stdout)
    assert run["frames_recorded"] == 30

    replayed = json.loads(replayed.stdout)
    assert replayed["status"] == "complete" and replayed["frames"] == 30
    assert replayed["id"] != original["id"]
    frames_sql = "select camera_id, seq, capture_time, chainage_m from frames order by seq"
    assert sqlite_rows(second, frames_sql) == sqlite_rows(first, frames_sql)
    records, replayed_records = crack_records(first, second)
    assert records, "the synthetic drive has cracks"
    assert replayed_records == records


def write_chainage_file(folder: Path) -> Path:
    path = folder / "chainage.csv"
    path.write_text("time_s,chainage_m\n0,5000\n10,5100\n")
    return path


def test_record_refuses_a_folder_that_is_not_empty(drive, tmp_path):
    (tmp_path / "old.txt").write_text("x")
    result = crackscan("run", "--source", str(drive), "--record", str(tmp_path), check=False)
    assert result.returncode == 2 and "not empty" in result.stderr
    assert "Traceback" not in result.stderr


def test_live_run_against_a_slow_consumer_drops_frames_but_records_them_all(tmp_path):
    """The acceptance's live case at the service level: a camera-paced source, a consumer that
    takes 0.2 s a frame, a recording that keeps every frame the stream drops."""
    count, fps = 30, 60.0
    video = write_video(tmp_path / "fast.mp4", count, size=(160, 120), fps=fps)
    config = PipelineConfig()
    consumer = Consumer(tmp_path, delay_s=0.2)
    recording = tmp_path / "rec"
    try:
        with open_source(str(video), config) as source, Recorder(
                recording, source=str(video), run_id="run-1", fps=source.fps,
                cameras=("cam0",), writers=1) as recorder:
            end = run_in_thread(consumer, source, "live", config, recorder=recorder)
    finally:
        consumer.close()
    # 0.5 s of frames, 0.2 s each: a frame goes out only when the worker's hands are free
    assert end.frames_read == count and 0 < end.frames_sent <= 4
    assert end.frames_sent + end.frames_dropped == count and end.frames_recorded == count
    replay = list(RecordingSource(recording))
    assert [frame.index for frame in replay] == list(range(count))
    for frame in replay:
        assert np.abs(frame.image.astype(int) - frame_image(frame.index, (160, 120))).mean() < 8


@pytest.mark.parametrize("mode", ["live", "replay"])
def test_a_full_recording_disk_ends_the_run_with_true_counts(tmp_path, caplog, mode):
    """The recording's disk fills up at frame 4 (writes fail with ENOSPC, from /dev/full): the
    run ends at once with reason recording_error and one error line, its frames_recorded is
    what is on disk, and the recording says it is incomplete and why."""
    video = write_video(tmp_path / "drive.mp4", 12, size=(64, 48), fps=100.0)
    recording = tmp_path / "rec"
    consumer = Consumer(tmp_path)
    try:
        with open_source(str(video), PipelineConfig()) as source:
            recorder = Recorder(recording, source=str(video), run_id="run-1", fps=source.fps,
                                cameras=("cam0",), writers=1)
            for seq in range(4, 12):  # from frame 4 on, every write meets a full disk
                (recording / "cam0" / f".{seq:08d}.png.tmp").symlink_to("/dev/full")
            end = run_in_thread(consumer, source, mode, PipelineConfig(), recorder=recorder)
    finally:
        consumer.close()
    assert end.reason == "recording_error"
    on_disk = sorted(path.name for path in (recording / "cam0").glob("*.png"))
    assert end.frames_recorded == len(on_disk) == 4
    assert end.frames_read == end.frames_sent + end.frames_dropped + end.frames_bad < 12
    manifest = json.loads((recording / "manifest.json").read_text())
    assert manifest["complete"] is False and "No space left on device" in manifest["error"]
    assert manifest["frames"] == 4
    assert "Traceback" not in caplog.text and "could not be written" in caplog.text
    assert [frame.index for frame in RecordingSource(recording)] == [0, 1, 2, 3]


@pytest.mark.slow
def test_live_realtime_run_counts_drops_with_bounded_latency_and_a_complete_recording(
        tmp_path):
    """``crackscan run --mode live --realtime --record`` on a 30 fps video (no CPU keeps up):
    stored + dropped = captured, every captured frame recorded, latency bounded."""
    video = tmp_path / "fast.mp4"
    crackscan("synth", "--out", str(video), "--seconds", "3", "--fps", "30", "--seed", "2")
    db, recording = f"sqlite:///{tmp_path / 'live.db'}", tmp_path / "rec"
    summary = json.loads(crackscan("run", "--source", str(video), "--mode", "live",
                                   "--realtime", "--record", str(recording), "--db", db,
                                   "--format", "json").stdout)
    (run,) = json.loads(crackscan("runs", "--db", db, "--format", "json").stdout)
    assert run["mode"] == "live" and run["frames_read"] == 90  # 3 s at 30 fps
    assert run["frames"] > 0 and run["frames_dropped"] > 0, "a CPU worker is slower than 30 fps"
    assert run["frames"] + run["frames_dropped"] == run["frames_read"]
    assert run["frames_recorded"] == 90 and len(list(RecordingSource(recording))) == 90
    # bounded: a live frame goes only to a worker with nothing in hand
    assert 0 < run["latency_ms_p50"] <= run["latency_ms_p99"] <= run["latency_ms_max"] < 5000
    assert summary["latency_ms_max"] == run["latency_ms_max"]


# --- a rig of two cameras -----------------------------------------------------------------------

@pytest.mark.slow
def test_rig_of_two_cameras_measures_each_with_its_own_scale(drive, tmp_path):
    """The same drive seen by two cameras, the second with twice the mm per pixel: one run,
    both cameras stored, and the second camera's cracks twice as long in mm."""
    rig = tmp_path / "rig.yaml"
    rig.write_text(yaml.safe_dump({"rig": [
        {"id": "crown", "source": str(drive), "mm_per_px_along": 0.5, "mm_per_px_across": 0.5},
        {"id": "shoulder", "source": str(drive), "mm_per_px_along": 1.0,
         "mm_per_px_across": 1.0, "arc_offset_mm": 2000.0},
    ]}))
    db = f"sqlite:///{tmp_path / 'rig.db'}"
    summary = json.loads(crackscan("run", "--source", "rig", "--config", str(rig), "--db", db,
                                   "--workers", "2", "--format", "json").stdout)
    assert summary["status"] == "complete" and summary["cameras"] == ["crown", "shoulder"]
    assert summary["frames"] == 60 and summary["frames_read"] == 60
    per_camera = dict(sqlite_rows(db, "select camera_id, count(*) from frames group by 1"))
    assert per_camera == {"crown": 30, "shoulder": 30}
    lengths: dict[str, dict[tuple[int, int], float]] = {"crown": {}, "shoulder": {}}
    for camera, seq, index, length, arc in sqlite_rows(
            db, "select camera_id, seq, \"index\", length_mm, arc_mm from cracks"):
        lengths[camera][(seq, index)] = length
        assert (arc >= 2000.0) == (camera == "shoulder")
    common = sorted(set(lengths["crown"]) & set(lengths["shoulder"]))
    assert len(common) >= 3
    ratios = [lengths["shoulder"][key] / lengths["crown"][key] for key in common]
    assert np.median(ratios) == pytest.approx(2.0, rel=0.01)


def test_rig_camera_that_cannot_be_opened_is_named(tmp_path):
    rig = tmp_path / "rig.yaml"
    rig.write_text(yaml.safe_dump({"rig": [
        {"id": "left", "source": "synthetic:1"},
        {"id": "right", "source": str(tmp_path / "missing.mp4")}]}))
    result = crackscan("run", "--source", "rig", "--config", str(rig), check=False)
    assert result.returncode == 2 and "rig camera right" in result.stderr
    assert "Traceback" not in result.stderr


def test_rig_without_cameras_in_the_config_is_a_clear_error():
    with pytest.raises(SourceError, match="rig_two_cameras.yaml"):
        open_source("rig", PipelineConfig())


# --- positions: metadata files and odometer logs -----------------------------------------------

def test_video_with_a_metadata_file_keeps_its_times_and_chainages(tmp_path):
    video = write_video(tmp_path / "other_system.mp4", 6)
    metadata = tmp_path / "frames.csv"
    metadata.write_text("frame,time_s,chainage_m\n"
                        + "".join(f"{i},{1_800_000_000 + i * 0.5},{700 - i * 1.5}\n"
                                  for i in range(5)))  # frame 5 is not listed
    config = PipelineConfig(camera={"metadata": metadata},
                            acquisition={"speed_kmh": 36.0, "start_chainage_m": 0.0})
    consumer = Consumer(tmp_path)
    try:
        with open_source(str(video), config) as source:
            run_in_thread(consumer, source, "replay", config)
    finally:
        consumer.close()
    got = {m.seq: (m.capture_time, m.chainage_m) for m in consumer.received}
    for i in range(5):
        assert got[i] == (pytest.approx(1_800_000_000 + i * 0.5), pytest.approx(700 - i * 1.5))
    assert got[5][1] == pytest.approx(10.0 * 5 / 12.5)  # unlisted: the run's clock and speed


def test_metadata_keyed_by_file_name_belongs_to_a_folder(tmp_path):
    video = write_video(tmp_path / "drive.mp4", 3)
    metadata = tmp_path / "frames.csv"
    metadata.write_text("file,chainage_m\na.png,1\n")
    with pytest.raises(SourceError, match="keyed by 'file'"):
        open_source(str(video), PipelineConfig(camera={"metadata": metadata}))


def test_chainage_comes_from_the_odometer_log(tmp_path):
    video = write_video(tmp_path / "drive.mp4", 20, fps=10.0)
    log_file = tmp_path / "odometer.csv"
    log_file.write_text("time_s,ticks\n0,0\n0.5,1000\n1.0,1000\n2.0,5000\n")  # stops, then goes
    config = PipelineConfig(acquisition=AcquisitionConfig(
        start_chainage_m=1200.0,
        position=PositionConfig(source="odometer", file=log_file, ticks_per_m=1000.0,
                                direction=-1)))
    consumer = Consumer(tmp_path)
    try:
        with open_source(str(video), config) as source:
            run_in_thread(consumer, source, "replay", config)
    finally:
        consumer.close()
    chainage = {m.seq: m.chainage_m for m in consumer.received}
    # t = seq / 10 s; distance 2 m/s to 0.5 s, standing to 1.0 s, then 4 m/s; driving backwards
    expected = {0: 1200.0, 2: 1199.6, 5: 1199.0, 9: 1199.0, 15: 1199.0 - 2.0}
    for seq, value in expected.items():
        assert chainage[seq] == pytest.approx(value), seq


def test_odometer_going_backwards_is_refused_by_run_with_the_line(drive, tmp_path):
    log_file = tmp_path / "odometer.csv"
    log_file.write_text("time_s,distance_m\n0,0\n1,5\n2,3\n")
    result = crackscan("run", "--source", str(drive), "--odometer", str(log_file), check=False)
    assert result.returncode == 2 and "line 4" in result.stderr and "backwards" in result.stderr
    assert "Traceback" not in result.stderr


# --- CURVE keys ---------------------------------------------------------------------------------

def test_binding_another_interface_needs_keys():
    with pytest.raises(ValueError, match="crackscan keys"):
        SocketSpec.parse("push+bind:tcp://0.0.0.0:5555")
    assert SocketSpec.parse("push+bind:tcp://0.0.0.0:5555", authenticated=True).bind


def test_crackscan_keys_writes_a_ring_and_never_overwrites(tmp_path):
    ring = tmp_path / "keys"
    crackscan("keys", "--out", str(ring), "--client", "worker1", "--client", "worker2")
    names = sorted(p.name for p in ring.iterdir())
    assert names == ["authorized", "server.key", "server.key_secret", "worker1.key",
                     "worker1.key_secret", "worker2.key", "worker2.key_secret"]
    assert sorted(p.name for p in (ring / "authorized").iterdir()) == ["worker1.key",
                                                                       "worker2.key"]
    assert (ring / "server.key_secret").stat().st_mode & 0o077 == 0
    again = crackscan("keys", "--out", str(ring), "--client", "worker1", check=False)
    assert again.returncode == 2 and "never overwritten" in again.stderr


def test_only_authorized_curve_clients_get_through(tmp_path):
    """A CURVE server on TCP: the authorized client's messages arrive; a client without keys
    and one with keys the server never authorized get nothing through."""
    create_keys(tmp_path / "ring")
    ring = KeyRing.load(tmp_path / "ring")
    stranger_dir = tmp_path / "stranger"
    create_keys(stranger_dir)  # a ring of its own: its client key is unknown to our server
    stranger = KeyRing(stranger_dir)
    # the stranger knows our server's public key, but not an authorized client key
    (stranger_dir / "server.key").write_bytes((tmp_path / "ring" / "server.key").read_bytes())

    context = zmq.Context()
    server = SocketSpec.parse("pull+bind:tcp://127.0.0.1:*", authenticated=True).open(
        context, keys=ring)
    endpoint = server.getsockopt(zmq.LAST_ENDPOINT).decode()
    try:
        senders = {
            "authorized": SocketSpec.parse(f"push+connect:{endpoint}").open(context, keys=ring),
            "no keys": SocketSpec.parse(f"push+connect:{endpoint}").open(context),
            "unauthorized": SocketSpec.parse(f"push+connect:{endpoint}").open(context,
                                                                               keys=stranger),
        }
        for name, sender in senders.items():
            sender.send_string(name, flags=zmq.NOBLOCK)  # queued on the connecting pipe
        received = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if server.poll(100):
                received.append(server.recv_multipart()[-1].decode())  # [peer, payload]
        assert received == ["authorized"]
    finally:
        for sender in senders.values():
            sender.close(linger=0)
        server.close(linger=0)
        terminate(context)


# --- a camera lost mid-run ---------------------------------------------------------------------

def test_stop_ends_a_run_whose_camera_is_waiting_to_reconnect(tmp_path):
    """A stream that is lost and keeps failing to reopen yields nothing for up to its reconnect
    timeout (60 s); a stop must still end the run at once, with the frames counted."""
    import cv2

    from acquisition.cameras import CaptureSettings, CaptureSource

    video = write_video(tmp_path / "stream.mp4", 8)
    opens = []

    def opener() -> cv2.VideoCapture:  # the stream plays once, then the camera is gone
        opens.append(time.monotonic())
        return cv2.VideoCapture(str(video if len(opens) == 1 else tmp_path / "gone.mp4"))

    source = CaptureSource("rtsp://camera.test/stream", CaptureSettings(reconnect_timeout_s=60),
                           opener=opener)
    consumer = Consumer(tmp_path)
    stop = threading.Event()
    timer = threading.Timer(1.5, stop.set)
    timer.start()
    began = time.monotonic()
    try:
        end = run_in_thread(consumer, source, "live", PipelineConfig(), stop, finish=stop)
    finally:
        timer.cancel()
        consumer.close()
        source.close()
    assert time.monotonic() - began < 1.5 + 4.0
    assert end.reason == "stopped" and end.frames_read == 8 and len(opens) >= 2


class HiccupSource:
    """A 50 fps camera whose reader stalls for 0.5 s before frame 10 (a slow disk, a busy CPU):
    frames 10-14 are the ones the driver buffered during the stall, stamped with their capture
    times; from frame 15 on the frames are fresh again, stamped as they are read."""

    description, fps = "hiccup", 50.0

    def __iter__(self):
        from acquisition.frames import SourceFrame

        start = time.monotonic()
        for index in range(60):
            if index == 10:
                time.sleep(0.5)
            offset = index / self.fps if index < 15 else time.monotonic() - start
            yield SourceFrame(index, offset, frame_image(index))
            if index >= 15:
                time.sleep(1 / self.fps)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_live_mode_drops_frames_read_late_so_latency_stays_bounded(tmp_path):
    """The frames buffered during the stall are read at least 0.4 s after their capture times:
    live mode drops them (a camera would have overwritten them) instead of sending stale frames,
    goes on with the fresh ones, and records them all."""
    consumer = Consumer(tmp_path)  # takes frames as fast as it can
    recording = tmp_path / "rec"
    try:
        with Recorder(recording, source="hiccup", run_id="run-1", fps=50.0,
                      cameras=("cam0",)) as recorder:
            end = run_in_thread(consumer, HiccupSource(), "live", PipelineConfig(),
                                recorder=recorder)
    finally:
        consumer.close()
    sent = [message.seq for message in consumer.received]
    assert not set(sent) & set(range(10, 15))  # stale: read 0.4-0.5 s late
    assert [seq for seq in sent if seq >= 15], "fresh frames after the stall are sent"
    assert end.frames_dropped == 60 - len(sent) >= 5 and end.frames_recorded == 60
    assert len(list(RecordingSource(recording))) == 60


def test_image_folder_with_a_metadata_file_keyed_by_file_name(tmp_path):
    import cv2

    folder = tmp_path / "frames"
    folder.mkdir()
    for index, name in enumerate(("b_0001.png", "b_0002.png", "b_0003.png")):
        cv2.imwrite(str(folder / name), frame_image(index))
    metadata = tmp_path / "positions.csv"
    metadata.write_text("file,time_s,chainage_m\nb_0001.png,1800000000.0,12.5\n"
                        "b_0003.png,1800000001.0,13.5\n")  # b_0002 not listed
    with open_source(str(folder), PipelineConfig(camera={"metadata": metadata})) as source:
        frames = list(source)
    assert [(f.capture_time, f.chainage_m) for f in frames] == [
        (1800000000.0, 12.5), (None, None), (1800000001.0, 13.5)]
    assert "with metadata" in source.description
