"""Position along the tunnel: the chainage (metres) at which each frame was taken.

A :class:`ChainageModel` turns a frame time into a chainage. :func:`open_position` builds one:

    speed           constant speed: start_chainage_m + direction * speed_kmh / 3.6 * t
    odometer        an odometer / wheel-encoder log (CSV: time_s and distance_m, or time_s and
                    ticks with a ticks_per_m calibration): start_chainage_m + direction *
                    (distance(t) - distance at the log's first row)
    chainage_file   a CSV of time_s, chainage_m, interpolated as it is (start and direction are
                    not applied: the file already holds chainages)

Time: a model's ``clock`` says which time :meth:`ChainageModel.chainage_at` expects, and the
caller passes that time: "relative" is seconds since the first frame of the source (a frame's
``offset_s``), "unix" is absolute UNIX seconds (a frame's ``capture_time``). The ``time_s``
column of a position file is on that same clock. Constant speed is always "relative".

Between two rows of a file the value is interpolated linearly; outside the file's time range the
first or last value is held, with one warning per model (see :class:`_Interpolated`).

The CSV files have a header row; blank lines and lines starting with ``#`` are skipped but still
counted, so every error names the file and the 1-based line an editor shows (the header is line 1
in a file without leading comments). A quoted field may not span lines.
"""

from __future__ import annotations

import csv
import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from crackscan.errors import UserError

log = logging.getLogger(__name__)

KINDS = ("speed", "odometer", "chainage_file")
CLOCKS = ("relative", "unix")
# a time_s above this (1973-03-03 in UNIX seconds, or 3 years in relative seconds) is taken to be
# a UNIX time; it only decides whether to warn that a file's clock looks wrong
_UNIX_FROM_S = 1e8


class PositionError(UserError, ValueError):
    """A position file or setting that cannot be used; the message names the file, the line and
    what to do."""


@runtime_checkable
class ChainageModel(Protocol):
    clock: str  # "relative" or "unix": which time chainage_at expects
    description: str

    def chainage_at(self, t: float) -> float: ...


# --- CSV tables (shared with acquisition.metadata) ----------------------------------------------

@dataclass(frozen=True)
class CsvTable:
    """A CSV file read into cells, every row with its 1-based line number in the file."""

    path: Path
    header_line: int
    columns: dict[str, int]  # column name (stripped, lower case) -> index in a row
    rows: list[tuple[int, list[str]]]  # (line number, stripped cells), in file order


def read_table(path: Path, error: type[ValueError], expected: str) -> CsvTable:
    """Read a CSV file with a header row, skipping blank and ``#`` lines (they keep their line
    numbers). Every row must have as many cells as the header. ``expected`` (e.g.
    "time_s,chainage_m") is named in the message of an empty file; errors raise ``error``."""
    path = Path(path)
    header: list[str] | None = None
    header_line = 0
    rows: list[tuple[int, list[str]]] = []
    try:
        # utf-8-sig: a spreadsheet's byte-order mark must not become part of the first column name
        with path.open(encoding="utf-8-sig", newline="") as file:
            for number, line in enumerate(file, start=1):
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                try:
                    cells = [cell.strip() for cell in next(csv.reader((line,)))]
                except csv.Error as exc:
                    raise error(f"{path}, line {number}: not a valid CSV line ({exc}); "
                                "fix or remove the line") from None
                if header is None:
                    header, header_line = cells, number
                elif len(cells) != len(header):
                    raise error(f"{path}, line {number}: {len(cells)} cells, but the header "
                                f"(line {header_line}) has {len(header)} columns "
                                f"({','.join(header)}); fix the line")
                else:
                    rows.append((number, cells))
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}; check the path") from None
    except UnicodeDecodeError:
        raise error(f"{path} is not a UTF-8 text file; give a CSV file "
                    f"(header {expected})") from None
    if header is None:
        raise error(f"{path} is empty: it needs a header row ({expected}) and data rows")
    columns: dict[str, int] = {}
    for index, name in enumerate(header):
        key = name.lower()
        if key in columns:
            raise error(f"{path}, line {header_line}: column {name!r} appears twice in the "
                        "header; rename or remove one")
        columns[key] = index
    return CsvTable(path, header_line, columns, rows)


def cell_number(table: CsvTable, line: int, cells: list[str], column: str,
                error: type[ValueError]) -> float:
    """The finite number in ``column`` of a row, or ``error`` naming the file, line and column."""
    text = cells[table.columns[column]]
    try:
        value = float(text)
    except ValueError:
        value = math.nan
        if not text:
            raise error(f"{table.path}, line {line}: column {column} is empty; "
                        "give a number or remove the line") from None
    if not math.isfinite(value):
        raise error(f"{table.path}, line {line}: column {column} is {text!r}, not a finite "
                    "number; fix the value or remove the line")
    return value


# --- models -------------------------------------------------------------------------------------

def _check_clock(clock: str) -> str:
    if clock not in CLOCKS:
        raise PositionError(f"unknown clock {clock!r}: use 'relative' (seconds since the first "
                            "frame) or 'unix' (UNIX seconds)")
    return clock


def _check_direction(direction: int) -> int:
    if direction not in (1, -1):
        raise PositionError(f"direction must be 1 (chainage grows) or -1 (chainage shrinks), "
                            f"not {direction!r}")
    return int(direction)


def _check_finite(name: str, value: float) -> float:
    if not (isinstance(value, numbers.Real) and math.isfinite(value)):
        raise PositionError(f"{name} must be a finite number, not {value!r}")
    return float(value)


class ConstantSpeed:
    """Chainage from a constant speed: ``start_chainage_m + direction * speed_kmh / 3.6 * t``,
    ``t`` in seconds since the first frame (clock "relative")."""

    clock = "relative"

    def __init__(self, speed_kmh: float, start_chainage_m: float = 0.0,
                 direction: int = 1) -> None:
        speed_kmh = _check_finite("speed_kmh", speed_kmh)
        if speed_kmh < 0:
            raise PositionError(f"speed_kmh must be >= 0, not {speed_kmh:g}; "
                                "for a drive towards falling chainage use direction -1")
        self.start_chainage_m = _check_finite("start_chainage_m", start_chainage_m)
        self.direction = _check_direction(direction)
        self.speed_mps = speed_kmh / 3.6
        self.description = (f"constant speed {speed_kmh:g} km/h from chainage "
                            f"{self.start_chainage_m:g} m, direction {self.direction:+d}")

    def chainage_at(self, t: float) -> float:
        return self.start_chainage_m + self.direction * self.speed_mps * t

    def __repr__(self) -> str:
        return f"<ConstantSpeed {self.description}>"


class _Interpolated:
    """Chainage interpolated linearly in a table of (time, chainage) loaded once.

    Outside the table's time range the first or last chainage is held, not extrapolated: before
    the first row and after the last the vehicle is most likely standing (logging starts before
    the drive and stops after it), and extrapolating the last speed would invent distance that
    was never driven. The first frame outside the range logs one warning per model.
    """

    def __init__(self, path: Path, clock: str, times: np.ndarray, chainages: np.ndarray,
                 description: str) -> None:
        self.path = path
        self.clock = clock
        self.description = description
        self._times = times
        self._chainages = chainages
        self._warned = False
        first, last = float(times[0]), float(times[-1])
        if clock == "relative" and first > _UNIX_FROM_S:
            log.warning("%s: time_s starts at %.0f, which looks like UNIX seconds, but the clock "
                        "is 'relative' (seconds since the first frame); set clock 'unix' if the "
                        "file uses UNIX time", path, first)
        elif clock == "unix" and last < _UNIX_FROM_S:
            log.warning("%s: time_s ends at %g, which looks like seconds since the start, but "
                        "the clock is 'unix'; set clock 'relative' if the file counts from the "
                        "first frame", path, last)

    @property
    def time_range(self) -> tuple[float, float]:
        """The first and last time of the file, on the model's clock."""
        return float(self._times[0]), float(self._times[-1])

    def chainage_at(self, t: float) -> float:
        if not math.isfinite(t):
            raise PositionError(f"{self.description}: frame time {t!r} is not a finite number")
        first, last = self.time_range
        if not self._warned and not first <= t <= last:
            self._warned = True
            log.warning("%s: frame time %.3f s (clock %s) is outside the file's time range "
                        "%.3f .. %.3f s; holding the %s value for such frames (warned once)",
                        self.description, t, self.clock, first, last,
                        "first" if t < first else "last")
        # np.interp holds the end values outside the range, which is what we want
        return float(np.interp(t, self._times, self._chainages))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description}>"


def _require(table: CsvTable, columns: tuple[str, ...], expected: str) -> None:
    missing = [name for name in columns if name not in table.columns]
    if missing:
        raise PositionError(f"{table.path}, line {table.header_line}: no column "
                            f"{', '.join(missing)} in the header "
                            f"({','.join(table.columns) or 'nothing'}); expected columns "
                            f"{expected}")


def _times_and(table: CsvTable, column: str, expected: str) -> tuple[np.ndarray, np.ndarray,
                                                                     list[int]]:
    """time_s and ``column`` of every row as arrays, with line numbers; times strictly
    increasing, at least two rows."""
    if len(table.rows) < 2:
        raise PositionError(f"{table.path}: {len(table.rows)} data row(s) after the header "
                            f"(line {table.header_line}); at least 2 rows ({expected}) are "
                            "needed to interpolate")
    times = np.empty(len(table.rows))
    values = np.empty(len(table.rows))
    lines = []
    for i, (line, cells) in enumerate(table.rows):
        times[i] = cell_number(table, line, cells, "time_s", PositionError)
        values[i] = cell_number(table, line, cells, column, PositionError)
        if i and times[i] <= times[i - 1]:
            raise PositionError(f"{table.path}, line {line}: time_s {times[i]:g} is not after "
                                f"{times[i - 1]:g} (line {lines[-1]}); times must strictly "
                                "increase: sort the file or remove the repeated row")
        lines.append(line)
    return times, values, lines


class OdometerLog(_Interpolated):
    """Chainage from an odometer / wheel-encoder log: CSV with ``time_s`` and ``distance_m``
    (metres), or ``time_s`` and ``ticks`` (encoder counts, converted with ``ticks_per_m`` > 0;
    ``distance_m`` is used when a file has both).

    ``chainage = start_chainage_m + direction * (distance(t) - distance at the first row)``.

    The distance must not fall: a drop of more than ``reverse_tolerance_m`` below the largest
    distance so far is an error (a reversing vehicle, a counter reset or wrap-around are not
    supported); a smaller drop is encoder jitter while standing and is held at that largest
    distance, so the distance used is monotone.
    """

    def __init__(self, path: Path, start_chainage_m: float = 0.0, direction: int = 1,
                 ticks_per_m: float | None = None, clock: str = "relative",
                 reverse_tolerance_m: float = 0.05) -> None:
        path = Path(path)
        clock = _check_clock(clock)
        start_chainage_m = _check_finite("start_chainage_m", start_chainage_m)
        direction = _check_direction(direction)
        if ticks_per_m is not None:
            ticks_per_m = _check_finite("ticks_per_m", ticks_per_m)
            if ticks_per_m <= 0:
                raise PositionError(f"ticks_per_m must be > 0, not {ticks_per_m:g}")
        tolerance = _check_finite("reverse_tolerance_m", reverse_tolerance_m)
        if tolerance < 0:
            raise PositionError(f"reverse_tolerance_m must be >= 0, not {tolerance:g}")
        expected = "time_s,distance_m or time_s,ticks"
        table = read_table(path, PositionError, expected)
        if "distance_m" in table.columns:
            column, scale, unit = "distance_m", 1.0, "m"
        elif "ticks" in table.columns:
            if ticks_per_m is None:
                raise PositionError(f"{path}, line {table.header_line}: the log counts ticks but "
                                    "no ticks_per_m calibration is set; give ticks_per_m (encoder "
                                    "ticks per metre) or a distance_m column")
            column, scale, unit = "ticks", 1.0 / ticks_per_m, "ticks"
        else:
            column, scale, unit = "distance_m", 1.0, "m"
        _require(table, ("time_s", column), expected)
        times, raw, lines = _times_and(table, column, expected)
        distances = raw * scale
        # hold jitter at the running maximum; refuse a real reversal
        highest = np.maximum.accumulate(distances)
        drops = highest - distances
        if np.any(drops > tolerance):
            i = int(np.argmax(drops > tolerance))
            j = int(np.argmax(distances[:i] == highest[i]))  # the row that set the maximum
            raise PositionError(f"{path}: odometer goes backwards at line {lines[i]}: {column} "
                                f"{raw[i]:g} {unit} after {raw[j]:g} {unit} at line {lines[j]} "
                                f"({drops[i]:.3f} m back, tolerance {tolerance:g} m); a "
                                "reversing vehicle is not supported; cut the log into parts "
                                "that each drive one way")
        chainages = start_chainage_m + direction * (highest - highest[0])
        self.ticks_per_m = ticks_per_m if column == "ticks" else None
        super().__init__(path, clock, times, chainages,
                         f"odometer log {path} ({column}, clock {clock}, from chainage "
                         f"{start_chainage_m:g} m, direction {direction:+d})")


class ChainageFile(_Interpolated):
    """Chainage read from a CSV of ``time_s``, ``chainage_m``, interpolated linearly in time. The
    chainages are used as they are (no start chainage, no direction); they may rise or fall."""

    def __init__(self, path: Path, clock: str = "relative") -> None:
        path = Path(path)
        clock = _check_clock(clock)
        expected = "time_s,chainage_m"
        table = read_table(path, PositionError, expected)
        _require(table, ("time_s", "chainage_m"), expected)
        times, chainages, _ = _times_and(table, "chainage_m", expected)
        super().__init__(path, clock, times, chainages, f"chainage file {path} (clock {clock})")


# --- the one entry point ------------------------------------------------------------------------

def open_position(kind: str, *, file: Path | None, speed_kmh: float, start_chainage_m: float,
                  direction: int, ticks_per_m: float | None, clock: str) -> ChainageModel:
    """The chainage model ``kind`` names ("speed", "odometer", "chainage_file").

    Settings a kind does not use are ignored (speed for the files, ticks_per_m except for an
    odometer log, start_chainage_m and direction for a chainage file), except that "speed" takes
    no file and only the "relative" clock: both would mean a position file is silently unused.
    Raises :class:`PositionError` with what to do.
    """
    clock = _check_clock(clock)
    if kind == "speed":
        if file is not None:
            raise PositionError(f"position kind 'speed' takes no file, but {file} was given; "
                                "use kind 'odometer' or 'chainage_file' for a position file")
        if clock != "relative":
            raise PositionError("position kind 'speed' counts from the first frame: use clock "
                                "'relative' (clock 'unix' applies to position files)")
        return ConstantSpeed(speed_kmh, start_chainage_m, direction)
    if kind not in KINDS:
        raise PositionError(f"unknown position kind {kind!r}: use one of {', '.join(KINDS)}")
    if file is None:
        raise PositionError(f"position kind {kind!r} needs a file; give the position file "
                            "or use kind 'speed'")
    path = Path(file).expanduser()
    if not path.is_file():
        raise PositionError(f"position file {path} not found (or not a file); check the path")
    if kind == "odometer":
        return OdometerLog(path, start_chainage_m, direction, ticks_per_m, clock)
    return ChainageFile(path, clock)
