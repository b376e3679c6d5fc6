"""Recording a vehicle run to disk (``--record DIR``) and replaying it (``--source DIR``).

The recorder writes every captured frame with its metadata, whether or not inference keeps up: in
live mode the frame stream drops frames, the recording does not. Replaying the recording yields the
same frames with their original capture times, chainages and cameras, so a replay gives the same
crack records as the run did.

Layout of a recording directory::

    DIR/manifest.json      {"format": "crackscan-recording", "version": 1, "source": "...",
                            "run_id": "...", "started_at": UNIX s, "fps": float,
                            "cameras": ["cam0", ...], "encoding": "png" | "jpeg",
                            "jpeg_quality": int, "frames": N, "complete": bool}
    DIR/frames.csv         camera,seq,capture_time,chainage_m,file  (one row per frame)
    DIR/<camera>/<seq:08d>.png   (or .jpg)

``manifest.json`` is written when recording starts (``frames`` 0, ``complete`` false) and again by
:meth:`Recorder.close` (``frames`` = rows in frames.csv, ``complete`` true; false plus ``error``
when a frame could not be written). Both writes are atomic (temporary file, then ``os.replace``).

``frames.csv`` is appended and flushed one row at a time, in the order the images were finished
(about the order of ``write()``, not sorted); a frame's row is written only after its image file
exists under its final name, and ``file`` is relative to DIR. Times and chainages are written with
``repr`` precision, so they replay exactly.

Images are written atomically (a hidden temporary name in the same folder, then ``os.replace``), so
a crashed process never leaves a half image under a final name. Nothing is fsynced (one fsync per
frame would cost more than the camera allows): after a power loss the newest rows and images may be
lost or damaged on disk. Replay copes: an incomplete recording replays what frames.csv lists, a cut
last line is skipped, and an image that is missing or does not decode is a bad frame (``None``).

Images are lossless PNG by default; ``encoding="jpeg"`` (``jpeg_quality``) saves space.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import queue
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import cv2
import numpy as np

from acquisition.frames import SourceBase, SourceFrame, read_image
from crackscan.errors import UserError

log = logging.getLogger(__name__)

FORMAT = "crackscan-recording"
VERSION = 1
MANIFEST = "manifest.json"
FRAMES_CSV = "frames.csv"
CSV_HEADER = ("camera", "seq", "capture_time", "chainage_m", "file")
ENCODINGS = {"png": ".png", "jpeg": ".jpg"}
_CAMERA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # used as a folder name
_RESERVED = {MANIFEST, FRAMES_CSV}


class RecordingError(UserError, ValueError):
    """A recording that cannot be written or read; the message says what failed and what to do."""


def is_recording(path: Path) -> bool:
    """Whether ``path`` is a recording directory: its manifest.json has format crackscan-recording.

    A manifest.json that cannot be parsed next to a frames.csv also counts, so that opening it
    says what is wrong with the manifest instead of reading the folder as an image folder."""
    path = Path(path)
    manifest = path / MANIFEST
    if not (path.is_dir() and manifest.is_file()):
        return False
    try:
        data = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return (path / FRAMES_CSV).is_file()
    return isinstance(data, dict) and data.get("format") == FORMAT


def _write_json_atomically(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# --- recording ----------------------------------------------------------------------------------

class _Frame(NamedTuple):
    camera_id: str
    seq: int
    capture_time: float
    chainage_m: float
    image: np.ndarray


class Recorder:
    """Writes frames to a new recording directory (layout in the module docstring).

    ``write()`` queues a frame for a pool of ``writers`` threads that encode it (``cv2.imencode``
    releases the GIL) and write it; it returns at once unless ``queue_frames`` frames are already
    waiting, in which case it waits for room: a recorder never drops a frame. The queue holds
    references, not copies: do not modify an image in place after passing it to ``write()``.

    A frame that cannot be written (disk full, permissions) is remembered: the next ``write()``
    and ``close()`` raise :class:`RecordingError`, and so does every later ``write()`` (the
    recording is no longer complete). Frames already queued are still attempted.

    ``close()`` (or leaving the ``with`` block) must be called: it waits for the queued frames and
    marks the manifest complete. Writer threads are daemons, so a process that exits without
    closing loses the frames still queued, and the recording stays incomplete. ``write()`` and
    ``close()`` may be called from different threads; a ``write()`` after ``close()`` raises.
    """

    def __init__(self, directory: Path, *, source: str, run_id: str, fps: float,
                 cameras: tuple[str, ...], encoding: str = "png", jpeg_quality: int = 95,
                 queue_frames: int = 256, writers: int = 2) -> None:
        self.directory = Path(directory)
        cameras = tuple(cameras)
        self._check_arguments(fps, cameras, encoding, jpeg_quality, queue_frames, writers)
        self._check_directory()
        self._extension = ENCODINGS[encoding]
        self._params = [cv2.IMWRITE_JPEG_QUALITY, jpeg_quality] if encoding == "jpeg" else []
        self._manifest: dict[str, Any] = {
            "format": FORMAT, "version": VERSION, "source": source, "run_id": run_id,
            "started_at": time.time(), "fps": float(fps), "cameras": list(cameras),
            "encoding": encoding, "jpeg_quality": int(jpeg_quality), "frames": 0,
            "complete": False}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            for camera in cameras:
                (self.directory / camera).mkdir()
            self._csv_file = open(self.directory / FRAMES_CSV, "w", newline="", encoding="utf-8")
            self._csv = csv.writer(self._csv_file)
            self._csv.writerow(CSV_HEADER)
            self._csv_file.flush()
            _write_json_atomically(self.directory / MANIFEST, self._manifest)
        except OSError as exc:
            raise RecordingError(f"cannot create recording {self.directory}: {exc}; check the "
                                 "path, its permissions and free space") from exc
        self._cameras = cameras
        self._last_seq: dict[str, int] = {}
        # _submit: queuing (write, close) and the per-camera seqs; _lock: frames.csv, the counters
        # and the error. Writer threads take only _lock, so write() may wait for room in _submit.
        self._submit = threading.Lock()
        self._lock = threading.Lock()
        self._written = 0
        self._written_by_camera = {camera: 0 for camera in cameras}
        self._failed = 0
        self._error: str | None = None
        self._closed = False
        self._warned_full = False
        self._queue: queue.Queue[_Frame | None] = queue.Queue(maxsize=queue_frames)
        self._threads = [threading.Thread(target=self._work, name=f"recorder-{n}", daemon=True)
                         for n in range(writers)]
        for thread in self._threads:
            thread.start()
        log.info("recording run %s to %s (%s, cameras %s)", run_id, self.directory, encoding,
                 ", ".join(cameras))

    @staticmethod
    def _check_arguments(fps: float, cameras: tuple[str, ...], encoding: str, jpeg_quality: int,
                         queue_frames: int, writers: int) -> None:
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise RecordingError(f"fps must be a positive number, got {fps!r}")
        if not cameras or len(set(cameras)) != len(cameras):
            raise RecordingError(f"cameras must name each camera once, got {cameras!r}")
        for camera in cameras:
            if not (isinstance(camera, str) and _CAMERA_NAME.match(camera)
                    and camera not in _RESERVED):
                raise RecordingError(f"camera id {camera!r} cannot be a folder name: use letters, "
                                     "digits, '_', '-' and '.', starting with a letter or digit")
        if encoding not in ENCODINGS:
            raise RecordingError(f"encoding must be one of {sorted(ENCODINGS)}, got {encoding!r}")
        if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
            raise RecordingError(f"jpeg_quality must be 1..100, got {jpeg_quality!r}")
        if not (isinstance(queue_frames, int) and queue_frames >= 1):
            raise RecordingError(f"queue_frames must be at least 1, got {queue_frames!r}")
        if not (isinstance(writers, int) and writers >= 1):
            raise RecordingError(f"writers must be at least 1, got {writers!r}")

    def _check_directory(self) -> None:
        """Refuse anything but a new or empty directory: a recording is never mixed or replaced."""
        path = self.directory
        if path.exists() and not path.is_dir():
            raise RecordingError(f"cannot record to {path}: it is a file; choose a new DIR")
        if not path.is_dir():
            return
        if is_recording(path):
            raise RecordingError(f"cannot record to {path}: it already holds a recording; choose "
                                 "a new DIR (recordings are never overwritten)")
        if any(path.iterdir()):
            raise RecordingError(f"cannot record to {path}: the folder is not empty; choose a "
                                 "new or empty DIR")

    @property
    def frames_written(self) -> int:
        """Frames whose image and frames.csv row are on disk."""
        with self._lock:
            return self._written

    def written_by_camera(self) -> dict[str, int]:
        """Frames on disk (image and row) per camera."""
        with self._lock:
            return dict(self._written_by_camera)

    def write(self, camera_id: str, seq: int, capture_time: float, chainage_m: float,
              image: np.ndarray) -> None:
        """Queue one frame (BGR uint8 HxWx3) for writing; waits only while the queue is full.

        ``seq`` must grow per camera (each frame is recorded once). Raises
        :class:`RecordingError` for a bad argument, after ``close()``, or once any frame could
        not be written."""
        if camera_id not in self._cameras:
            raise RecordingError(f"camera {camera_id!r} is not one of this recording's cameras "
                                 f"{self._cameras}")
        if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
                and image.shape[2] == 3):
            raise RecordingError("a recorded image must be a BGR uint8 HxWx3 array, got "
                                 f"{getattr(image, 'dtype', type(image).__name__)} "
                                 f"{getattr(image, 'shape', '')}")
        if not (math.isfinite(capture_time) and math.isfinite(chainage_m)):
            raise RecordingError(f"frame {camera_id}/{seq}: capture_time and chainage_m must be "
                                 f"finite, got {capture_time!r}, {chainage_m!r}")
        with self._submit:
            with self._lock:
                self._raise_if_failed()
            if self._closed:
                raise RecordingError(f"recording {self.directory} is closed")
            last = self._last_seq.get(camera_id, -1)
            if not (isinstance(seq, (int, np.integer)) and seq > last):
                raise RecordingError(f"frame {camera_id}/{seq}: seq must be a whole number after "
                                     f"the camera's last one ({last}); each frame is recorded "
                                     "once, in order")
            self._last_seq[camera_id] = int(seq)
            frame = _Frame(camera_id, int(seq), float(capture_time), float(chainage_m), image)
            try:
                self._queue.put_nowait(frame)
            except queue.Full:
                if not self._warned_full:
                    self._warned_full = True
                    log.warning("recording %s: %d frames are waiting to be written; the disk is "
                                "slower than the camera, so capture now waits for the disk "
                                "(nothing is dropped from the recording)", self.directory,
                                self._queue.maxsize)
                self._queue.put(frame)

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise RecordingError(f"recording {self.directory}: {self._failed} frame(s) could not "
                                 f"be written, the first: {self._error}; check free space and "
                                 "permissions, and record again to a new DIR")

    def _work(self) -> None:
        """One writer thread: encode, write under a temporary name, rename, then add the row."""
        while True:
            frame = self._queue.get()
            if frame is None:
                return
            name = f"{frame.seq:08d}{self._extension}"
            relative = f"{frame.camera_id}/{name}"
            try:
                ok, data = cv2.imencode(self._extension, frame.image, self._params)
                if not ok:
                    raise RecordingError("OpenCV cannot encode the image")
                final = self.directory / frame.camera_id / name
                temporary = final.with_name(f".{name}.tmp")
                with open(temporary, "wb") as file:
                    file.write(data)
                os.replace(temporary, final)
                with self._lock:
                    self._csv.writerow((frame.camera_id, frame.seq, repr(frame.capture_time),
                                        repr(frame.chainage_m), relative))
                    self._csv_file.flush()
                    self._written += 1
                    self._written_by_camera[frame.camera_id] += 1
            except (OSError, ValueError, cv2.error) as exc:
                with self._lock:
                    self._failed += 1
                    first = self._error is None
                    if first:
                        self._error = f"{relative}: {exc}"
                if first:
                    log.error("recording %s: frame %s could not be written: %s", self.directory,
                              relative, exc)

    def close(self) -> None:
        """Wait for every queued frame, then write the manifest (frames, complete). Raises
        :class:`RecordingError` if any frame could not be written (the manifest then says
        complete false and why). Calling it again does nothing."""
        with self._submit:
            if self._closed:
                return
            self._closed = True
            if self._queue.qsize():
                log.info("recording %s: writing the last %d queued frames", self.directory,
                         self._queue.qsize())
            for _ in self._threads:
                self._queue.put(None)
        for thread in self._threads:
            thread.join()
        with self._lock:
            self._manifest["frames"] = self._written
            self._manifest["complete"] = self._error is None
            if self._error is not None:
                self._manifest["error"] = f"{self._failed} frame(s) not written: {self._error}"
            try:
                self._csv_file.close()
                _write_json_atomically(self.directory / MANIFEST, self._manifest)
            except OSError as exc:
                raise RecordingError(f"recording {self.directory}: cannot finish the manifest: "
                                     f"{exc}; the frames.csv rows are still replayable") from exc
            log.info("recording %s closed: %d frames", self.directory, self._written)
            self._raise_if_failed()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        if exc is None:
            self.close()
            return
        try:  # an exception is already on its way: report the recording's, do not replace it
            self.close()
        except RecordingError as error:
            log.error("%s", error)

    def __repr__(self) -> str:
        return f"<Recorder {self.directory} ({self.frames_written} frames written)>"


# --- replaying ----------------------------------------------------------------------------------

class _Row(NamedTuple):
    capture_time: float
    camera_order: int
    seq: int
    camera_id: str
    chainage_m: float
    file: str


class RecordingSource(SourceBase):
    """Frames of a recording, in capture-time order (across cameras), with their original
    capture_time, chainage_m and camera_id.

    ``index`` is the frame's ``seq`` (per camera: a two-camera recording repeats indices, so key
    frames by ``(camera_id, index)``); ``offset_s`` is the capture time since the recording's
    first frame. An image that is missing or does not decode is yielded as ``None`` (a bad
    frame). An incomplete recording (never closed) replays what frames.csv lists, with a warning.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.manifest = self._read_manifest()
        self.fps = float(self.manifest["fps"])
        self.cameras: tuple[str, ...] = tuple(self.manifest["cameras"])
        self.run_id = self.manifest.get("run_id")
        self._rows = self._read_rows()
        if not self._rows:
            raise RecordingError(f"recording {self.directory} holds no frames ({FRAMES_CSV} "
                                 "lists none); nothing to replay")
        if not self.manifest.get("complete"):
            error = self.manifest.get("error")
            log.warning("recording %s is incomplete (%s); replaying the %d frames %s lists",
                        self.directory, f"error: {error}" if error else
                        "never closed: the recorder stopped or the vehicle PC lost power",
                        len(self._rows), FRAMES_CSV)
        elif self.manifest.get("frames") != len(self._rows):
            log.warning("recording %s: the manifest counts %s frames, %s lists %d; replaying "
                        "those listed", self.directory, self.manifest.get("frames"), FRAMES_CSV,
                        len(self._rows))
        self._rows.sort()
        self.description = (f"recording {self.directory} ({len(self._rows)} frames, cameras "
                            f"{', '.join(self.cameras)})")

    def _read_manifest(self) -> dict[str, Any]:
        path = self.directory / MANIFEST
        fix = "point --source at a recording made with --record DIR"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise RecordingError(f"{path} not found: not a recording; {fix}") from exc
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise RecordingError(f"{path} cannot be read ({exc}); the recording's manifest is "
                                 f"damaged: restore it from a backup or {fix}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RecordingError(f"{path} is not a crackscan recording manifest (format must be "
                                 f"{FORMAT!r}); {fix}")
        if data.get("version") != VERSION:
            raise RecordingError(f"{path}: recording version {data.get('version')!r} is not "
                                 f"supported (this crackscan reads version {VERSION}); replay it "
                                 "with the crackscan release that recorded it")
        fps, cameras = data.get("fps"), data.get("cameras")
        if not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise RecordingError(f"{path}: fps must be a positive number, got {fps!r}; fix the "
                                 "manifest (the camera's frame rate)")
        if not (isinstance(cameras, list) and cameras
                and all(isinstance(camera, str) and camera for camera in cameras)):
            raise RecordingError(f"{path}: cameras must be a list of camera ids, got "
                                 f"{cameras!r}; fix the manifest (the folders next to it)")
        return data

    def _read_rows(self) -> list[_Row]:
        path = self.directory / FRAMES_CSV
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise RecordingError(f"{path} not found: the recording's frame list is missing; the "
                                 "recording cannot be replayed (record again)") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise RecordingError(f"{path} cannot be read ({exc}); the recording's frame list is "
                                 "damaged") from exc
        if text and not text.endswith("\n"):
            # rows are written whole, line end included: a last line without one was cut short
            log.warning("%s line %d is cut short (the recording was interrupted); ignoring it",
                        path, text.count("\n") + 1)
            text = text[:text.rfind("\n") + 1]
        order = {camera: n for n, camera in enumerate(self.cameras)}
        rows: list[_Row] = []
        seen: set[tuple[str, int]] = set()
        reader = csv.reader(io.StringIO(text, newline=""))
        for fields in reader:
            number = reader.line_num
            if number == 1:
                if tuple(fields) != CSV_HEADER:
                    raise RecordingError(f"{path} line 1: the header must be "
                                         f"{','.join(CSV_HEADER)}; the frame list is damaged")
                continue
            if not fields:
                continue
            row = self._parse_row(fields, order, f"{path} line {number}")
            key = (row.camera_id, row.seq)
            if key in seen:
                raise RecordingError(f"{path} line {number}: frame {row.camera_id}/{row.seq} is "
                                     "listed twice; delete one of the two lines")
            seen.add(key)
            rows.append(row)
        return rows

    def _parse_row(self, fields: list[str], order: dict[str, int], where: str) -> _Row:
        fix = "fix or delete that line (the frame is then not replayed)"
        if len(fields) != len(CSV_HEADER):
            raise RecordingError(f"{where}: expected {len(CSV_HEADER)} fields "
                                 f"({','.join(CSV_HEADER)}), got {len(fields)}; {fix}")
        camera, seq_text, time_text, chainage_text, file = fields
        if camera not in order:
            raise RecordingError(f"{where}: camera {camera!r} is not in the manifest's cameras "
                                 f"{list(self.cameras)}; {fix}")
        try:
            seq = int(seq_text)
            if seq < 0:
                raise ValueError(seq_text)
        except ValueError:
            raise RecordingError(f"{where}: seq {seq_text!r} is not a whole number >= 0; "
                                 f"{fix}") from None
        values = []
        for name, value_text in (("capture_time", time_text), ("chainage_m", chainage_text)):
            try:
                value = float(value_text)
            except ValueError:
                value = math.nan
            if not math.isfinite(value):
                raise RecordingError(f"{where}: {name} {value_text!r} is not a number; {fix}")
            values.append(value)
        relative = Path(file)
        if not file or relative.is_absolute() or ".." in relative.parts:
            raise RecordingError(f"{where}: file {file!r} must be a path inside the recording; "
                                 f"{fix}")
        return _Row(values[0], order[camera], seq, camera, values[1], file)

    def __iter__(self) -> Iterator[SourceFrame]:
        first = self._rows[0].capture_time
        for row in self._rows:
            image = read_image(self.directory / row.file)
            yield SourceFrame(row.seq, row.capture_time - first, image,
                              capture_time=row.capture_time, chainage_m=row.chainage_m,
                              camera_id=row.camera_id)
