"""The frame-source factory: ``open_source(spec, config)`` turns a ``--source`` string into a
:class:`~acquisition.frames.FrameSource`; the one module that imports every implementation:

    drive.mp4 (any video OpenCV decodes)   frames/ (an image folder, sorted by name)
    DIR (a recording made with --record)   synthetic, synthetic:SECONDS (acquisition.synth)
    camera:N, /dev/videoN, rtsp://..., gst:PIPELINE (live: acquisition.cameras)
    rig (the cameras of config.rig, each from its own source: acquisition.rig)

A video or folder may come with a per-frame metadata CSV (``camera.metadata``, ``--metadata``)
that gives each frame's capture time and chainage (``acquisition.metadata``).
"""

from __future__ import annotations

import math
import re
from pathlib import Path

from acquisition.files import (
    IMAGE_EXTENSIONS,
    SYNTHETIC_DEFAULT_S,
    ImageFolderSource,
    MetadataSource,
    SyntheticSource,
    VideoFileSource,
)
from acquisition.frames import FrameSource, SourceError
from crackscan.config import PipelineConfig

_NOT_SUPPORTED = re.compile(r"^(https?://|udp://|rtmp://|v4l2:)", re.IGNORECASE)


def open_source(spec: str, config: PipelineConfig) -> FrameSource:
    """The source a ``--source`` string names (``config.camera`` is its camera: scale, capture
    settings, metadata file); raises :class:`SourceError` with what to do."""
    text = spec.strip()
    if text == "rig":
        from acquisition.rig import open_rig

        return open_rig(config, open_source)
    source = _open_one(text, config)
    if config.camera.metadata is not None:
        if not isinstance(source, VideoFileSource | ImageFolderSource):
            source.close()
            raise SourceError(f"a metadata file belongs to a video or an image folder, not to "
                              f"{source.description}")
        return MetadataSource(source, config.camera.metadata)
    return source


def _open_one(text: str, config: PipelineConfig) -> FrameSource:
    from acquisition.cameras import CaptureSettings, is_capture_spec, open_capture
    from acquisition.recording import RecordingError, RecordingSource, is_recording

    spec = text
    if text == "synthetic" or text.startswith("synthetic:"):
        seconds_text = text.partition(":")[2] or str(SYNTHETIC_DEFAULT_S)
        try:
            seconds = float(seconds_text)
        except ValueError:
            seconds = math.nan
        if not (math.isfinite(seconds) and seconds > 0):
            raise SourceError(f"bad source {spec!r}: use 'synthetic' or 'synthetic:SECONDS' "
                              "with SECONDS a positive number, e.g. synthetic:30")
        return SyntheticSource(seconds, config)
    if is_capture_spec(text):
        return open_capture(text, CaptureSettings(**config.camera.capture.model_dump()))
    if _NOT_SUPPORTED.match(text):
        raise SourceError(f"source {spec!r} is not supported: use camera:N, a device path, "
                          "rtsp://..., gst:PIPELINE, a video file, an image folder, a "
                          "recording or 'synthetic'")
    path = Path(text).expanduser()
    if not path.exists():
        raise SourceError(f"source {spec!r} not found: no such file or folder; give a video "
                          "file, an image folder, a recording, camera:N, rtsp://..., "
                          "'synthetic' or 'synthetic:SECONDS'")
    if is_recording(path):
        try:
            return RecordingSource(path)
        except RecordingError as exc:
            raise SourceError(str(exc)) from None
    if path.is_dir() or path.suffix.lower() in IMAGE_EXTENSIONS:
        return ImageFolderSource(path, config)
    return VideoFileSource(path, config)
