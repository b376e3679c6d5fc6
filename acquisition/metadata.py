"""Per-frame metadata of a recording: the capture time and/or chainage another system recorded.

A video or an image folder from another system may come with a CSV that keeps each frame's
position. The header names one key column and at least one value column:

    frame   the frame index in the video (0, 1, ...): for a video source
    file    the image's file name, without folder: for an image folder
    time_s      capture time, UNIX seconds
    chainage_m  chainage of the image centre, metres

e.g. ``frame,time_s,chainage_m`` or ``file,chainage_m``. Other columns are ignored; an empty value
cell means "not known for this frame" (None). Frames without a row have no metadata (None), so
the caller falls back to its own clock and position model for them.

Blank lines and lines starting with ``#`` are skipped but counted: every error names the file and
the 1-based line an editor shows. ``time_s`` must strictly increase in the order frames are read:
by frame index, or by file name (plain string order, as an image folder is read).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from acquisition.position import CsvTable, cell_number, read_table
from crackscan.errors import UserError

log = logging.getLogger(__name__)

KEYS = ("frame", "file")
VALUES = ("time_s", "chainage_m")
_EXPECTED = "frame or file, then time_s and/or chainage_m, e.g. frame,time_s,chainage_m"
# a time_s below this (1973-03-03) is not a plausible UNIX capture time: a relative clock
_UNIX_FROM_S = 1e8


class MetadataError(UserError, ValueError):
    """A metadata file that cannot be used; the message names the file, the line and what to
    do."""


@dataclass(frozen=True)
class FrameMeta:
    capture_time: float | None  # UNIX seconds; None: not in the file for this frame
    chainage_m: float | None  # None: not in the file for this frame


class FrameMetadata:
    """The rows of a per-frame metadata file, looked up by frame index or file name."""

    def __init__(self, path: Path, key: str, rows: dict[int | str, FrameMeta]) -> None:
        self.path = path
        self.key = key  # "frame" (look-up by index) or "file" (look-up by name)
        self._rows = rows

    @classmethod
    def load(cls, path: Path) -> FrameMetadata:
        """Read and check a metadata file; raises :class:`MetadataError` with what to do."""
        path = Path(path)
        table = read_table(path, MetadataError, _EXPECTED)
        where = f"{path}, line {table.header_line}"
        keys = [name for name in KEYS if name in table.columns]
        if not keys:
            raise MetadataError(f"{where}: no key column (frame or file) in the header "
                                f"({','.join(table.columns)}); expected columns {_EXPECTED}")
        if len(keys) > 1:
            raise MetadataError(f"{where}: both frame and file columns; keep the one the source "
                                "needs (frame for a video, file for an image folder)")
        if not any(name in table.columns for name in VALUES):
            raise MetadataError(f"{where}: no value column (time_s or chainage_m) in the header "
                                f"({','.join(table.columns)}); expected columns {_EXPECTED}")
        if not table.rows:
            raise MetadataError(f"{path}: no data rows after the header (line "
                                f"{table.header_line}); add one row per frame or drop the file")
        key = keys[0]
        rows: dict[int | str, FrameMeta] = {}
        lines: dict[int | str, int] = {}
        for line, cells in table.rows:
            frame_key = _key(table, line, cells, key)
            if frame_key in rows:
                raise MetadataError(f"{path}, line {line}: {key} {frame_key!r} again (first at "
                                    f"line {lines[frame_key]}); keep one row per frame")
            rows[frame_key] = FrameMeta(_value(table, line, cells, "time_s"),
                                        _value(table, line, cells, "chainage_m"))
            lines[frame_key] = line
        _check_times(path, key, rows, lines)
        return cls(path, key, rows)

    def for_frame(self, index: int, name: str | None = None) -> FrameMeta | None:
        """The metadata of a frame: by its index for a "frame" file, by its file name (the
        image's ``Path.name``) for a "file" file; None when the file has no row for it. A "file"
        file asked without a name (a video frame) raises :class:`MetadataError`."""
        if self.key == "frame":
            return self._rows.get(index)
        if name is None:
            raise MetadataError(f"{self.path} is keyed by file name (column file) but frame "
                                f"{index} has none (a video?); use a frame column for a video")
        return self._rows.get(name)

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"<FrameMetadata {self.path} ({len(self)} rows by {self.key})>"


def _key(table: CsvTable, line: int, cells: list[str], key: str) -> int | str:
    text = cells[table.columns[key]]
    where = f"{table.path}, line {line}"
    if key == "file":
        if not text:
            raise MetadataError(f"{where}: the file cell is empty; give the image's file name")
        if "/" in text or "\\" in text:
            raise MetadataError(f"{where}: file {text!r} has a folder; give the file name only "
                                "(images are matched by name within the source folder)")
        return text
    try:
        index = int(text)
    except ValueError:
        raise MetadataError(f"{where}: frame {text!r} is not a whole number; give the frame "
                            "index (0 for the first frame)") from None
    if index < 0:
        raise MetadataError(f"{where}: frame {index} is negative; frame indices start at 0")
    return index


def _value(table: CsvTable, line: int, cells: list[str], column: str) -> float | None:
    if column not in table.columns or not cells[table.columns[column]]:
        return None
    return cell_number(table, line, cells, column, MetadataError)


def _check_times(path: Path, key: str, rows: dict[int | str, FrameMeta],
                 lines: dict[int | str, int]) -> None:
    """time_s strictly increasing in the order frames are read (rows without a time skipped)."""
    previous: tuple[int | str, float] | None = None  # (key, time) of the last row with a time
    for frame_key in sorted(rows):  # all int or all str: one key column
        time_s = rows[frame_key].capture_time
        if time_s is None:
            continue
        if previous is not None and time_s <= previous[1]:
            before, before_s = previous
            raise MetadataError(f"{path}, line {lines[frame_key]}: time_s {time_s:.6f} of "
                                f"{key} {frame_key!r} is not after {before_s:.6f} of {key} "
                                f"{before!r} (line {lines[before]}); times must strictly "
                                f"increase in {key} order: fix the times or the {key}s")
        previous = frame_key, time_s
    if previous is not None and previous[1] < _UNIX_FROM_S:
        log.warning("%s: time_s ends at %g, which is not a UNIX time (before 1973); time_s must "
                    "be absolute UNIX seconds, or capture times will be wrong", path, previous[1])
