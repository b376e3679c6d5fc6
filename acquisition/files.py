"""Frame sources read from files: video files, image folders, a synthetic drive, and per-frame
metadata beside a video or folder.

What a video source can and cannot detect, with OpenCV's FFmpeg backend:

- A frame whose data does not decode (e.g. a damaged JPEG in an MJPEG AVI) makes ``read()``
  fail once; the next ``read()`` goes on with the next frame. Also, the decoder may skip a bad
  packet internally; then the container timestamp of the next good frame jumps. Both are reported
  as bad frames at the right indices (indices come from the timestamps where they are usable).
- A truncated file whose container still announces the full frame count (AVI, MKV with an index
  or header count): the missing tail is reported as bad frames, up to ``MAX_FAILED_READS`` failed
  reads in a row, after which the rest is logged as missing and the video ends.
- Damage the codec conceals (a garbled MPEG-4 macroblock) is not detectable: the frame decodes.
- An MP4 cut short before its index (moov) was written does not open at all: SourceError.
- Timestamps assume a constant frame rate; indices come from ``round(timestamp * fps)``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import cv2

from acquisition.frames import FrameSource, SourceBase, SourceError, SourceFrame, as_bgr, read_image
from acquisition.synth import SyntheticDrive
from crackscan.config import PipelineConfig

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
MAX_FAILED_READS = 50  # failed reads in a row before the rest of a video counts as missing
SYNTHETIC_DEFAULT_S = 10.0
SYNTHETIC_FPS = 25.0
SYNTHETIC_SIZE = (640, 360)


class VideoFileSource(SourceBase):
    """Frames of a video file, decoded by OpenCV; see the module docstring for what a corrupt or
    truncated file does."""

    def __init__(self, path: Path, config: PipelineConfig) -> None:
        self.path = Path(path)
        self._capture = cv2.VideoCapture(str(self.path))
        if not self._capture.isOpened():
            self._capture.release()
            raise SourceError(f"cannot open video {self.path}: not a video OpenCV can read "
                              "(damaged, cut short, or an unknown format); check the file or "
                              "convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")
        fps = self._capture.get(cv2.CAP_PROP_FPS)
        if not (math.isfinite(fps) and fps > 0):
            fps = config.acquisition.folder_fps
            log.warning("video %s has no frame rate; assuming %g fps "
                        "(acquisition.folder_fps)", self.path, fps)
        self.fps = float(fps)
        count = self._capture.get(cv2.CAP_PROP_FRAME_COUNT)
        self.frame_count = int(count) if math.isfinite(count) and count > 0 else None
        self.description = f"video {self.path}"
        self._frames = self._read()
        # the first good frame proves the video decodes; what came before it is kept for iteration
        self._pending: list[SourceFrame] = []
        for frame in self._frames:
            self._pending.append(frame)
            if frame.image is not None:
                break
        else:
            self.close()
            raise SourceError(f"cannot decode any frame of video {self.path}; check the file or "
                              "convert it, e.g. ffmpeg -i IN -c:v libx264 OUT.mp4")

    def __iter__(self) -> Iterator[SourceFrame]:
        pending, self._pending = self._pending, []
        yield from pending
        yield from self._frames

    def _read(self) -> Iterator[SourceFrame]:
        capture, fps = self._capture, self.fps
        expected = 0  # index of the next frame
        failed = 0  # failed reads in a row
        base_ms = None  # container time of frame 0, from the first good frame
        last_ms = -math.inf
        timestamps = True  # container timestamps usable (strictly increasing) so far
        while True:
            ok, image = capture.read()
            if ok and image is not None:
                failed = 0
                index = expected
                position_ms = capture.get(cv2.CAP_PROP_POS_MSEC)
                if timestamps and math.isfinite(position_ms) and position_ms > last_ms:
                    if base_ms is None:
                        base_ms = position_ms - expected * 1000.0 / fps
                    index = max(expected, round((position_ms - base_ms) / 1000.0 * fps))
                    last_ms = position_ms
                elif timestamps:
                    timestamps = False
                    log.warning("video %s has no usable timestamps; numbering frames as read",
                                self.path)
                if index > expected:
                    log.warning("video %s: frames %d..%d were skipped by the decoder (corrupt)",
                                self.path, expected, index - 1)
                for skipped in range(expected, index):
                    yield SourceFrame(skipped, skipped / fps, None)
                yield SourceFrame(index, index / fps, as_bgr(image))
                expected = index + 1
                continue
            if self.frame_count is None or expected >= self.frame_count:
                return
            if failed >= MAX_FAILED_READS:
                log.warning("video %s: %d reads failed in a row at frame %d; frames %d..%d that "
                            "the container announces are missing (truncated file?)", self.path,
                            failed, expected, expected, self.frame_count - 1)
                return
            # a failed read before the announced end: a corrupt frame, or a truncated tail
            failed += 1
            if failed == 1:
                log.warning("video %s: frame %d cannot be decoded", self.path, expected)
            else:
                log.debug("video %s: frame %d cannot be decoded either", self.path, expected)
            yield SourceFrame(expected, expected / fps, None)
            expected += 1

    def close(self) -> None:
        self._capture.release()


# --- image folders ------------------------------------------------------------------------------

class ImageFolderSource(SourceBase):
    """Images of a folder sorted by file name (or one image file), at ``folder_fps``."""

    def __init__(self, path: Path, config: PipelineConfig) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            self.files = sorted((p for p in self.path.iterdir()
                                 if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS),
                                key=lambda p: p.name)
            if not self.files:
                raise SourceError(f"image folder {self.path} holds no images "
                                  f"({', '.join(IMAGE_EXTENSIONS)}); point --source at a folder "
                                  "of frames or at a video file")
            self.description = f"image folder {self.path} ({len(self.files)} images)"
        else:
            self.files = [self.path]
            self.description = f"image {self.path}"
        self.fps = config.acquisition.folder_fps

    def __iter__(self) -> Iterator[SourceFrame]:
        size = None
        for index, path in enumerate(self.files):
            image = read_image(path)
            if image is not None and size is None:
                size = image.shape
            elif image is not None and image.shape != size:
                log.warning("image %s is %dx%d, earlier images are %dx%d", path, image.shape[1],
                            image.shape[0], size[1], size[0])
            yield SourceFrame(index, index / self.fps, image)


class SyntheticSource(SourceBase):
    """Frames of :class:`acquisition.synth.SyntheticDrive` (seed 0), rendered as they are read."""

    def __init__(self, seconds: float, config: PipelineConfig) -> None:
        width, height = SYNTHETIC_SIZE
        self.drive = SyntheticDrive(seconds, seed=0, fps=SYNTHETIC_FPS, width=width,
                                    height=height, config=config)
        self.fps = SYNTHETIC_FPS
        self.description = f"synthetic drive ({seconds:g} s, {self.drive.frames} frames, seed 0)"

    def __iter__(self) -> Iterator[SourceFrame]:
        for index in range(self.drive.frames):
            yield SourceFrame(index, index / self.fps, self.drive.frame(index))


# --- the one entry point ------------------------------------------------------------------------

class MetadataSource(SourceBase):
    """A video or folder source whose frames take capture time and chainage from a per-frame
    metadata file; a frame the file does not list keeps the run's clock and position."""

    def __init__(self, source: FrameSource, metadata_path: Path) -> None:
        from acquisition.metadata import FrameMetadata, MetadataError

        try:
            self.metadata = FrameMetadata.load(Path(metadata_path))
        except (MetadataError, OSError) as exc:
            source.close()
            raise SourceError(str(exc)) from None
        names = getattr(source, "files", None) if isinstance(source, ImageFolderSource) else None
        if (self.metadata.key == "file") != (names is not None):
            source.close()
            raise SourceError(f"metadata {metadata_path} is keyed by '{self.metadata.key}'; "
                              f"{source.description} needs "
                              f"'{'file' if names is not None else 'frame'}' (one row per "
                              f"{'image file name' if names is not None else 'frame index'})")
        self.source, self._names = source, names
        self.fps, self.description = source.fps, (f"{source.description} with metadata "
                                                  f"{metadata_path}")
        self.unlisted = 0

    def __iter__(self) -> Iterator[SourceFrame]:
        for item in self.source:
            name = self._names[item.index].name if self._names is not None else None
            meta = self.metadata.for_frame(item.index, name)
            if meta is None:
                self.unlisted += 1
                if self.unlisted == 1:
                    log.warning("%s: frame %d is not in the metadata file; it and any other "
                                "unlisted frames take the run's clock and position",
                                self.source.description, item.index)
                yield item
                continue
            yield replace(item, capture_time=meta.capture_time, chainage_m=meta.chainage_m)

    def close(self) -> None:
        self.source.close()


