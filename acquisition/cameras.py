"""Live capture sources: USB / V4L2 cameras, RTSP streams and GStreamer pipelines via OpenCV.

Specs (see :func:`is_capture_spec`)::

    camera:N                      OpenCV camera index N (any backend; V4L2 on Linux)
    /dev/video0, /dev/v4l/by-id/...   a V4L2 device path (by-id names survive replugging)
    rtsp://[user:pass@]host/...   an RTSP(S) stream through FFmpeg
    gst:PIPELINE                  a GStreamer pipeline ending in appsink (needs an OpenCV built
                                  with GStreamer; the pip wheels are not)

A capture source opens at construction and fails fast: no first frame within
``open_timeout_s`` is a :class:`SourceError`. Once running, a lost stream (a failed read, an
unplugged USB camera) is reopened with exponential back-off; the frames that never arrived show as
a jump in ``index`` (frame periods since the first frame) and are listed in ``gaps``. After
``reconnect_timeout_s`` without a frame the source logs an error and ends, so the acquisition
service closes the run with the counts so far.

Limits. Within one connection frames are numbered as read: a frame the driver or camera drops
internally is not visible. Timeouts are checked between reads; a read that blocks is bounded by
the backend (FFmpeg: the read timeout set here; V4L2: its own select timeout, 10 s by default).
Drivers ignore settings they do not support without an error, so what the driver reports back is
logged when it differs from what was asked.
"""

from __future__ import annotations

import functools
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from acquisition.frames import SourceBase, SourceError, SourceFrame, as_bgr

log = logging.getLogger(__name__)

DEFAULT_FPS = 25.0  # when neither the driver nor the settings give a frame rate
MAX_PLAUSIBLE_FPS = 1000.0  # RTSP streams sometimes report their RTP clock (90000) as fps
FIRST_FRAME_POLL_S = 0.05  # wait between failed reads while waiting for a first frame
V4L2_MANUAL_EXPOSURE = 1  # V4L2_EXPOSURE_MANUAL: drivers ignore an exposure while auto is on

_CAPTURE_SPEC = re.compile(r"^(camera:|rtsps?://|gst:|/dev/video|/dev/v4l/)", re.IGNORECASE)
_CREDENTIALS = re.compile(r"^(rtsps?://[^/@:]*:)[^/@]*@", re.IGNORECASE)
_SETTING_PROPS = (("width", cv2.CAP_PROP_FRAME_WIDTH), ("height", cv2.CAP_PROP_FRAME_HEIGHT),
                  ("fps", cv2.CAP_PROP_FPS), ("exposure", cv2.CAP_PROP_EXPOSURE))


@dataclass(frozen=True)
class CaptureSettings:
    """What to ask of a camera or stream, and how to ride out a lost stream."""

    width: int | None = None  # requested resolution; None: the driver's default
    height: int | None = None
    fps: float | None = None  # requested frame rate
    exposure: float | None = None  # driver units (CAP_PROP_EXPOSURE); None: the driver's (auto)
    reconnect_initial_s: float = 0.5  # first wait before reopening a lost stream
    reconnect_max_s: float = 10.0  # the wait doubles up to this
    reconnect_timeout_s: float = 60.0  # no frame for this long: give up, end the source
    open_timeout_s: float = 10.0  # no first frame in this long: SourceError; also FFmpeg's
    #                               open and read timeouts for rtsp://


class _ConnectFailed(Exception):
    """One (re)connection attempt failed; the message says how (for logs and SourceError)."""


def is_capture_spec(spec: str) -> bool:
    """Whether ``spec`` names a live capture (``camera:N``, ``/dev/video*``, ``/dev/v4l/...``,
    ``rtsp://``, ``rtsps://``, ``gst:``) rather than a file, a folder or ``synthetic``."""
    return bool(_CAPTURE_SPEC.match(spec.strip()))


@functools.lru_cache(maxsize=1)
def gstreamer_available() -> bool:
    """Whether this OpenCV build has the GStreamer video I/O backend ("GStreamer: YES")."""
    return bool(re.search(r"^\s*GStreamer:\s*YES", cv2.getBuildInformation(), re.MULTILINE))


def redact(spec: str) -> str:
    """``spec`` without an RTSP password, for logs, errors and the run's source label."""
    return _CREDENTIALS.sub(r"\1***@", spec.strip())


def open_capture(spec: str, settings: CaptureSettings | None = None) -> CaptureSource:
    """The live source ``spec`` names, opened and with its first frame read; raises
    :class:`SourceError` with what to do for a bad spec or a camera / stream that does not open."""
    return CaptureSource(spec, settings or CaptureSettings())


def _opener_for(spec: str, settings: CaptureSettings) -> Callable[[], cv2.VideoCapture]:
    """How to open ``spec`` with OpenCV; a bad spec or a missing backend is a SourceError."""
    text = spec.strip()
    lower = text.lower()
    if lower.startswith("camera:"):
        number = text.partition(":")[2].strip()
        if not number.isdigit():
            raise SourceError(f"bad source {spec!r}: use camera:N with N the camera's index, "
                              "e.g. camera:0 (list cameras with `v4l2-ctl --list-devices`)")
        return lambda: cv2.VideoCapture(int(number))
    if lower.startswith("/dev/"):
        return lambda: cv2.VideoCapture(text, cv2.CAP_V4L2)
    if lower.startswith(("rtsp://", "rtsps://")):
        timeout_ms = round(settings.open_timeout_s * 1000)
        params: list[int] = []
        # the FFmpeg timeouts only take effect when given at open, not through set()
        for name in ("CAP_PROP_OPEN_TIMEOUT_MSEC", "CAP_PROP_READ_TIMEOUT_MSEC"):
            if hasattr(cv2, name):
                params += [getattr(cv2, name), timeout_ms]
        return lambda: cv2.VideoCapture(text, cv2.CAP_FFMPEG, params)
    if lower.startswith("gst:"):
        pipeline = text[4:].strip()
        if not pipeline:
            raise SourceError(f"bad source {spec!r}: use gst:PIPELINE with a pipeline ending in "
                              "appsink, e.g. 'gst:v4l2src ! videoconvert ! appsink'")
        if not gstreamer_available():
            raise SourceError(f"source {spec!r} needs GStreamer, but this OpenCV build has no "
                              "GStreamer (the pip opencv-python wheels are built without it); use "
                              "an OpenCV built with GStreamer, or an rtsp:// URL or camera:N")
        return lambda: cv2.VideoCapture(pipeline, cv2.CAP_GSTREAMER)
    raise SourceError(f"source {spec!r} is not a camera or stream: use camera:N, /dev/videoN, "
                      "rtsp://... or gst:PIPELINE")


def _what_to_do(spec: str) -> str:
    """The advice for a camera / stream that does not open, by kind."""
    lower = spec.strip().lower()
    if lower.startswith("camera:"):
        return "no such camera or it is in use; list cameras with `v4l2-ctl --list-devices`"
    if lower.startswith("/dev/"):
        return ("no such device, it is in use, or no permission (is the user in the 'video' "
                "group?); list cameras with `v4l2-ctl --list-devices`")
    if lower.startswith(("rtsp://", "rtsps://")):
        return ("check the URL, the credentials and that the camera is reachable, e.g. "
                "`ffprobe URL`")
    if lower.startswith("gst:"):
        return "check the pipeline with `gst-launch-1.0 PIPELINE` (with fakesink for appsink)"
    return "check the camera or stream"


class CaptureSource(SourceBase):
    """camera:N, a device path (/dev/video0), rtsp://..., rtsps://, or gst:PIPELINE.

    Opens at construction (SourceError if there is no first frame within ``open_timeout_s``);
    iterating yields frames until the stream is lost for ``reconnect_timeout_s`` or the source is
    closed. ``gaps`` lists ``(first_missing_index, count)`` per reconnect that lost frames;
    ``reconnects`` counts successful reconnects.

    ``opener``, ``clock`` and ``sleep`` exist for tests: the default opener is built from the
    spec, the default sleep waits on the source's close event, so that ``close()`` from another
    thread (e.g. on a stop request) ends a back-off wait at once.
    """

    interruptible = True  # close() from another thread ends iteration (see acquisition.service)

    def __init__(self, spec: str, settings: CaptureSettings | None = None, *,
                 opener: Callable[[], cv2.VideoCapture] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] | None = None) -> None:
        self.spec = spec.strip()
        self.settings = settings or CaptureSettings()
        self._opener = opener or _opener_for(self.spec, self.settings)
        self._clock = clock
        self._closed = threading.Event()
        self._sleep = sleep or self._closed.wait
        self._lock = threading.Lock()  # a capture is never released while it is being read
        self._capture: cv2.VideoCapture | None = None
        self._first_connection = True
        self.gaps: list[tuple[int, int]] = []
        self.reconnects = 0
        self.label = redact(self.spec)

        try:
            image = self._connect(self._clock() + self.settings.open_timeout_s)
        except _ConnectFailed as exc:
            raise SourceError(f"{self.label} {exc}: {_what_to_do(self.spec)}") from None
        self._first = (image, self._clock(), time.time())
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        if math.isfinite(fps) and 0 < fps <= MAX_PLAUSIBLE_FPS:
            self.fps = float(fps)
        else:
            self.fps = float(self.settings.fps or DEFAULT_FPS)
            log.warning("%s reports no usable frame rate (%g); assuming %g fps", self.label, fps,
                        self.fps)
        height, width = image.shape[:2]
        self.description = f"capture {self.label} ({width}x{height})"
        self._frames = self._read()

    def __iter__(self) -> Iterator[SourceFrame]:
        return self._frames

    def close(self) -> None:
        """Release the capture; safe from another thread (waits for a read in progress)."""
        self._closed.set()
        self._release()

    # --- connecting -----------------------------------------------------------------------------

    def _connect(self, deadline: float) -> np.ndarray:
        """Open a capture, apply the settings and read its first frame by ``deadline``; on
        success ``self._capture`` is the open capture. Raises _ConnectFailed."""
        try:
            capture = self._opener()
        except cv2.error as exc:
            raise _ConnectFailed(f"did not open ({' '.join(str(exc).split())})") from None
        if not capture.isOpened():
            capture.release()
            raise _ConnectFailed("did not open")
        self._apply_settings(capture)
        while True:
            ok, image = capture.read()
            if ok and image is not None:
                break
            if self._closed.is_set() or self._clock() >= deadline:
                capture.release()
                raise _ConnectFailed(f"opened but gave no frame within "
                                     f"{self.settings.open_timeout_s:g}s")
            self._sleep(FIRST_FRAME_POLL_S)
        with self._lock:
            if self._closed.is_set():
                capture.release()
                raise _ConnectFailed("was closed")
            self._capture = capture
        return image

    def _apply_settings(self, capture: cv2.VideoCapture) -> None:
        """Ask for the settings, then log what the driver reports where it differs (drivers
        ignore what they do not support silently). Logged as a warning on the first connection
        only, so a flapping stream does not repeat it."""
        settings = self.settings
        asked = {name: float(getattr(settings, name)) for name, _ in _SETTING_PROPS
                 if getattr(settings, name) is not None}
        if not asked:
            return
        if "exposure" in asked:
            try:
                v4l2 = capture.getBackendName() == "V4L2"
            except cv2.error:
                v4l2 = False
            if v4l2:
                capture.set(cv2.CAP_PROP_AUTO_EXPOSURE, V4L2_MANUAL_EXPOSURE)
        props = dict(_SETTING_PROPS)
        for name, value in asked.items():
            capture.set(props[name], value)
        level = logging.WARNING if self._first_connection else logging.DEBUG
        self._first_connection = False
        for name, value in asked.items():
            got = capture.get(props[name])
            if not math.isclose(got, value, rel_tol=0.01, abs_tol=1e-6):
                log.log(level, "%s: asked for %s %g, the driver gives %g", self.label, name,
                        value, got)

    def _release(self) -> None:
        with self._lock:
            if self._capture is not None:
                self._capture.release()
                self._capture = None

    def _reconnect(self, last_frame_at: float) -> np.ndarray | None:
        """Reopen a lost stream with exponential back-off; the first frame of the new
        connection, or None after ``reconnect_timeout_s`` without a frame (or when closed)."""
        settings = self.settings
        deadline = last_frame_at + settings.reconnect_timeout_s
        wait = settings.reconnect_initial_s
        attempt = 0
        while not self._closed.is_set():
            left = deadline - self._clock()
            if left <= 0:
                return None
            self._sleep(min(wait, left))
            if self._closed.is_set():
                return None
            attempt += 1
            try:
                return self._connect(min(self._clock() + settings.open_timeout_s, deadline))
            except _ConnectFailed as exc:
                log.debug("%s: reconnect attempt %d %s", self.label, attempt, exc)
            wait = min(wait * 2, settings.reconnect_max_s)
        return None

    # --- reading --------------------------------------------------------------------------------

    def _read(self) -> Iterator[SourceFrame]:
        image, started_at, wall = self._first
        self._first = None
        index = 0
        last_frame_at = started_at
        try:
            yield SourceFrame(index, 0.0, _bgr(image, self.label), capture_time=wall)
            while not self._closed.is_set():
                with self._lock:
                    ok, image = self._capture.read() if self._capture else (False, None)
                now, wall = self._clock(), time.time()
                if ok and image is not None:
                    index += 1
                    last_frame_at = now
                    yield SourceFrame(index, now - started_at, _bgr(image, self.label),
                                      capture_time=wall)
                    continue
                if self._closed.is_set():
                    return
                self._release()
                log.warning("%s: stream lost after frame %d; reconnecting (giving up after "
                            "%gs without a frame)", self.label, index,
                            self.settings.reconnect_timeout_s)
                image = self._reconnect(last_frame_at)
                if image is None:
                    if not self._closed.is_set():
                        log.error("%s: no frame for %gs after frame %d; giving up, the source "
                                  "ends", self.label, self.settings.reconnect_timeout_s, index)
                    return
                now, wall = self._clock(), time.time()
                self.reconnects += 1
                step = max(1, round((now - last_frame_at) * self.fps))
                if step > 1:
                    self.gaps.append((index + 1, step - 1))
                missing = f"frames {index + 1}..{index + step - 1} missing" if step > 1 else (
                    "no frame period missed")
                log.warning("%s: reconnected after %.1fs (reconnect %d); %s", self.label,
                            now - last_frame_at, self.reconnects, missing)
                index += step
                last_frame_at = now
                yield SourceFrame(index, now - started_at, _bgr(image, self.label),
                                  capture_time=wall)
        finally:
            self._release()


def _bgr(image: np.ndarray, label: str) -> np.ndarray | None:
    """A frame as BGR uint8, or None (a bad frame) for one in a format that cannot convert."""
    try:
        return as_bgr(image)
    except SourceError as exc:
        log.warning("%s: %s", label, exc)
        return None
