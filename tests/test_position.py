"""Position models (acquisition.position) and per-frame metadata (acquisition.metadata) on real
CSV files: values worked out by hand, and every error naming its file and line."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from acquisition.metadata import FrameMeta, FrameMetadata, MetadataError
from acquisition.position import (
    ChainageFile,
    ChainageModel,
    ConstantSpeed,
    OdometerLog,
    PositionError,
    open_position,
)


def write(tmp_path: Path, text: str, name: str = "log.csv") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def settings(**changes: object) -> dict[str, object]:
    """open_position's keyword settings, with ``changes``."""
    return {"file": None, "speed_kmh": 36.0, "start_chainage_m": 0.0, "direction": 1,
            "ticks_per_m": None, "clock": "relative"} | changes


# --- constant speed -----------------------------------------------------------------------------

def test_constant_speed_by_hand() -> None:
    model = ConstantSpeed(36.0)  # 10 m/s
    assert model.clock == "relative"
    assert model.chainage_at(0.0) == 0.0
    assert model.chainage_at(2.5) == pytest.approx(25.0)
    assert ConstantSpeed(36.0, start_chainage_m=1000.0).chainage_at(2.0) == pytest.approx(1020.0)
    backwards = ConstantSpeed(18.0, start_chainage_m=1000.0, direction=-1)  # 5 m/s
    assert backwards.chainage_at(4.0) == pytest.approx(980.0)
    assert isinstance(backwards, ChainageModel)


@pytest.mark.parametrize("kwargs", [{"speed_kmh": -1.0}, {"speed_kmh": float("nan")},
                                    {"speed_kmh": 10.0, "direction": 0}])
def test_constant_speed_refuses_bad_settings(kwargs: dict) -> None:
    with pytest.raises(PositionError):
        ConstantSpeed(**kwargs)


# --- odometer log -------------------------------------------------------------------------------

def test_odometer_distance_interpolated_by_hand(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,distance_m\n0,0\n1,2\n2,6\n")
    model = OdometerLog(path)
    assert isinstance(model, ChainageModel)
    assert model.clock == "relative"
    assert model.chainage_at(1.5) == pytest.approx(4.0)
    assert model.chainage_at(0.5) == pytest.approx(1.0)
    assert model.chainage_at(2.0) == pytest.approx(6.0)
    placed = OdometerLog(path, start_chainage_m=500.0, direction=-1)
    assert placed.chainage_at(1.5) == pytest.approx(496.0)


def test_odometer_counts_from_the_first_row(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,distance_m\n10,1000\n12,1010\n")
    model = OdometerLog(path, start_chainage_m=200.0)
    assert model.chainage_at(11.0) == pytest.approx(205.0)


def test_odometer_ticks_with_calibration(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,ticks\n0,100\n1,300\n2,500\n")
    model = OdometerLog(path, start_chainage_m=10.0, ticks_per_m=100.0)
    assert model.chainage_at(1.5) == pytest.approx(10.0 + 3.0)  # (400 - 100) / 100 m


def test_odometer_ticks_without_calibration_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,ticks\n0,100\n1,300\n")
    with pytest.raises(PositionError, match="ticks_per_m") as error:
        OdometerLog(path)
    assert str(path) in str(error.value)
    with pytest.raises(PositionError, match="ticks_per_m"):
        OdometerLog(path, ticks_per_m=0.0)


def test_odometer_jitter_within_tolerance_is_held(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,distance_m\n0,0\n1,5\n2,4.97\n3,4.99\n4,7\n")
    model = OdometerLog(path)  # tolerance 0.05 m
    assert [model.chainage_at(t) for t in (1.0, 2.0, 2.5, 3.0)] == pytest.approx([5, 5, 5, 5])
    assert model.chainage_at(3.5) == pytest.approx(6.0)


def test_odometer_going_backwards_names_the_line(tmp_path: Path) -> None:
    # line 1 header, line 2 comment, line 3 blank: the reversal is on line 6
    path = write(tmp_path, "time_s,distance_m\n# drive 1\n\n0,0\n1,5\n2,4.5\n")
    with pytest.raises(PositionError, match="goes backwards at line 6") as error:
        OdometerLog(path)
    message = str(error.value)
    assert str(path) in message and "line 5" in message and "cut the log" in message
    assert OdometerLog(path, reverse_tolerance_m=1.0).chainage_at(2.0) == pytest.approx(5.0)


def test_odometer_ticks_backwards_is_measured_in_metres(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,ticks\n0,0\n1,1000\n2,990\n")
    # 10 ticks at 1000 ticks/m is 1 cm: jitter; at 100 ticks/m it is 10 cm: a reversal
    assert OdometerLog(path, ticks_per_m=1000.0).chainage_at(2.0) == pytest.approx(1.0)
    with pytest.raises(PositionError, match="line 4"):
        OdometerLog(path, ticks_per_m=100.0)


def test_time_not_increasing_names_the_line(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,distance_m\n0,0\n1,1\n1,2\n")
    with pytest.raises(PositionError, match=r"line 4: time_s 1 is not after 1 \(line 3\)"):
        OdometerLog(path)


@pytest.mark.parametrize("cell", ["abc", "nan", "inf", ""])
def test_bad_number_names_the_line(tmp_path: Path, cell: str) -> None:
    path = write(tmp_path, f"# odometer\ntime_s,distance_m\n0,0\n\n1,{cell}\n")
    with pytest.raises(PositionError, match="line 5: column distance_m") as error:
        OdometerLog(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(("text", "match"), [
    ("", "is empty"),
    ("# only a comment\n\n", "is empty"),
    ("time_s,distance_m\n", "0 data row"),
    ("time_s,distance_m\n0,0\n", "1 data row"),
    ("time_s,speed\n0,0\n1,1\n",
     "line 1: no column distance_m.*expected columns time_s,distance_m"),
    ("t,distance_m\n0,0\n1,1\n", "line 1: no column time_s"),
    ("time_s,distance_m\n0,0\n1,1,1\n", "line 3: 3 cells"),
    ("time_s,time_s\n0,0\n1,1\n", "line 1: column 'time_s' appears twice"),
])
def test_unusable_odometer_files(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(PositionError, match=match) as error:
        OdometerLog(path)
    assert str(path) in str(error.value)


def test_outside_the_range_holds_the_ends_and_warns_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write(tmp_path, "time_s,distance_m\n1,0\n2,3\n")
    model = OdometerLog(path, start_chainage_m=100.0)
    with caplog.at_level(logging.WARNING, logger="acquisition.position"):
        assert model.chainage_at(0.0) == pytest.approx(100.0)
        assert model.chainage_at(-5.0) == pytest.approx(100.0)
        assert model.chainage_at(9.0) == pytest.approx(103.0)
        assert model.chainage_at(1.5) == pytest.approx(101.5)
    warnings = [r for r in caplog.records if "outside" in r.getMessage()]
    assert len(warnings) == 1
    # the next model warns again: once per model, not once per process
    with caplog.at_level(logging.WARNING, logger="acquisition.position"):
        OdometerLog(path).chainage_at(9.0)
    assert len([r for r in caplog.records if "outside" in r.getMessage()]) == 2


# --- chainage file ------------------------------------------------------------------------------

def test_chainage_file_interpolated_as_it_is(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,chainage_m\n0,1200\n2,1190\n4,1170\n", "chainage.csv")
    model = ChainageFile(path)
    assert model.chainage_at(1.0) == pytest.approx(1195.0)
    assert model.chainage_at(3.0) == pytest.approx(1180.0)


def test_unix_clock_takes_unix_times(tmp_path: Path) -> None:
    t0 = 1_700_000_000.0
    path = write(tmp_path, f"time_s,chainage_m\n{t0},10\n{t0 + 10},30\n", "chainage.csv")
    model = ChainageFile(path, clock="unix")
    assert model.clock == "unix"
    assert model.chainage_at(t0 + 2.5) == pytest.approx(15.0)
    odometer = write(tmp_path, f"time_s,distance_m\n{t0},0\n{t0 + 10},30\n")
    assert OdometerLog(odometer, clock="unix").chainage_at(t0 + 5) == pytest.approx(15.0)


def test_chainage_file_names_expected_columns(tmp_path: Path) -> None:
    path = write(tmp_path, "time_s,distance_m\n0,0\n1,1\n")
    with pytest.raises(PositionError, match="expected columns time_s,chainage_m"):
        ChainageFile(path)


# --- open_position ------------------------------------------------------------------------------

def test_open_position_dispatches(tmp_path: Path) -> None:
    speed = open_position("speed", **settings(start_chainage_m=50.0, direction=-1))
    assert isinstance(speed, ConstantSpeed) and speed.chainage_at(1.0) == pytest.approx(40.0)
    log = write(tmp_path, "time_s,ticks\n0,0\n1,200\n")
    odometer = open_position("odometer", **settings(file=log, ticks_per_m=100.0,
                                                    start_chainage_m=5.0))
    assert isinstance(odometer, OdometerLog) and odometer.chainage_at(0.5) == pytest.approx(6.0)
    chainages = write(tmp_path, "time_s,chainage_m\n0,7\n1,9\n", "c.csv")
    # start and direction are not applied to a chainage file
    chainage = open_position("chainage_file", **settings(file=chainages, start_chainage_m=99.0,
                                                         direction=-1, clock="unix"))
    assert isinstance(chainage, ChainageFile) and chainage.clock == "unix"
    assert chainage.chainage_at(0.5) == pytest.approx(8.0)


@pytest.mark.parametrize(("kind", "changes", "match"), [
    ("gps", {}, "unknown position kind 'gps'"),
    ("odometer", {}, "needs a file"),
    ("chainage_file", {"file": Path("/nonexistent/c.csv")}, "c.csv not found"),
    ("speed", {"file": Path("x.csv")}, "takes no file"),
    ("speed", {"clock": "unix"}, "clock 'relative'"),
    ("speed", {"clock": "gps"}, "unknown clock"),
    ("speed", {"direction": 2}, "direction must be"),
])
def test_open_position_errors(kind: str, changes: dict, match: str) -> None:
    with pytest.raises(PositionError, match=match):
        open_position(kind, **settings(**changes))


# --- per-frame metadata -------------------------------------------------------------------------

def test_metadata_by_frame_index(tmp_path: Path) -> None:
    path = write(tmp_path, "frame,time_s,chainage_m\n2,1700000002.0,12\n0,1700000000.0,10\n"
                           "1,1700000001.0,\n", "meta.csv")
    meta = FrameMetadata.load(path)
    assert len(meta) == 3 and meta.key == "frame"
    assert meta.for_frame(0) == FrameMeta(1_700_000_000.0, 10.0)
    assert meta.for_frame(1) == FrameMeta(1_700_000_001.0, None)  # empty cell: not known
    assert meta.for_frame(7) is None


def test_metadata_by_file_name(tmp_path: Path) -> None:
    path = write(tmp_path, "file,chainage_m\n# from the other system\nb.jpg,5\na.jpg,4\n",
                 "meta.csv")
    meta = FrameMetadata.load(path)
    assert meta.key == "file" and len(meta) == 2
    assert meta.for_frame(0, "a.jpg") == FrameMeta(None, 4.0)
    assert meta.for_frame(0, "c.jpg") is None
    with pytest.raises(MetadataError, match="keyed by file name"):
        meta.for_frame(0)


@pytest.mark.parametrize(("text", "match"), [
    ("", "is empty"),
    ("time_s,chainage_m\n1,2\n", "line 1: no key column"),
    ("frame,speed\n0,1\n", "line 1: no value column"),
    ("frame,file,time_s\n0,a.jpg,1\n", "line 1: both frame and file"),
    ("frame,time_s\n", "no data rows"),
    ("frame,chainage_m\n0,1\n\n1,x\n", "line 4: column chainage_m"),
    ("frame,chainage_m\n# c\n0,1\n1.5,2\n", "line 4: frame '1.5' is not a whole number"),
    ("frame,chainage_m\n0,1\n-1,2\n", "line 3: frame -1 is negative"),
    ("frame,chainage_m\n0,1\n1,2\n0,3\n", r"line 4: frame 0 again \(first at line 2\)"),
    ("file,chainage_m\na.jpg,1\nA/b.jpg,2\n", "line 3: file 'A/b.jpg' has a folder"),
    ("file,chainage_m\na.jpg,1\n# x\na.jpg,2\n", r"line 4: file 'a.jpg' again \(first at line 2"),
    # by index: frame 1 (line 2) comes after frame 0 (line 3) but is not later
    ("frame,time_s\n1,1700000000\n0,1700000005\n", r"line 2: time_s .* of frame 1 .*\(line 3\)"),
    # by name: b.jpg (line 3) after a.jpg (line 2) is earlier
    ("file,time_s\na.jpg,1700000005\nb.jpg,1700000001\n", "line 3: time_s .* of file 'b.jpg'"),
])
def test_metadata_errors_name_the_line(tmp_path: Path, text: str, match: str) -> None:
    path = write(tmp_path, text, "meta.csv")
    with pytest.raises(MetadataError, match=match) as error:
        FrameMetadata.load(path)
    assert str(path) in str(error.value)
