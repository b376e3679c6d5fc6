"""What every frame source is: the :class:`FrameSource` interface, the :class:`SourceFrame` it
yields, its error, and the shared plumbing of the implementations.

A source yields :class:`SourceFrame` in order: the source's frame index, its capture offset in
seconds from the start of the source, and a BGR uint8 HxWx3 image, or ``None`` for a frame that
exists but cannot be decoded (the acquisition service counts it as bad and goes on). A source is
read once; ``close()`` (or leaving its ``with`` block) releases it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import cv2
import numpy as np

from crackscan.errors import UserError

log = logging.getLogger(__name__)


class SourceError(UserError, ValueError):
    """A source that cannot be opened or read; the message says what failed and what to do."""


@dataclass(frozen=True)
class SourceFrame:
    index: int  # the source's own frame number: gaps are frames that never arrived
    offset_s: float  # capture time since the first frame of the source
    image: np.ndarray | None  # BGR uint8 HxWx3; None for a corrupt / unreadable frame
    # what a source may know better than the run's clock and position model (a recording, a
    # per-frame metadata file, a camera's own clock); None: acquisition stamps it
    capture_time: float | None = None  # UNIX seconds
    chainage_m: float | None = None  # chainage of the image centre
    camera_id: str | None = None  # a rig's camera; None: the run's (single) camera


@runtime_checkable
class FrameSource(Protocol):
    description: str
    fps: float

    def __iter__(self) -> Iterator[SourceFrame]: ...

    def close(self) -> None: ...

    def __enter__(self) -> FrameSource: ...

    def __exit__(self, *exc: object) -> None: ...


class SourceBase:
    """Shared plumbing: single-pass iteration and the context manager."""

    description = ""
    fps = 0.0

    def __enter__(self) -> SourceBase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.description} @ {self.fps:g} fps>"


def as_bgr(image: np.ndarray) -> np.ndarray:
    """A decoded image as BGR uint8 HxWx3 (grey and BGRA converted; 16-bit scaled down)."""
    if image.dtype == np.uint16:
        image = (image >> 8).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise SourceError(f"images of dtype {image.dtype} are not supported; convert to 8-bit")
    if image.ndim == 2 or image.shape[2] == 1:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2BGR)
    return image


# --- video files --------------------------------------------------------------------------------

def read_image(path: Path) -> np.ndarray | None:
    try:
        data = np.fromfile(path, np.uint8)
    except OSError as exc:
        log.warning("cannot read image %s: %s", path, exc.strerror)
        return None
    # UNCHANGED: no EXIF rotation, so every image keeps the camera's pixel geometry
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED) if data.size else None
    if image is None:
        log.warning("image %s cannot be decoded (corrupt or not an image)", path)
        return None
    try:
        return as_bgr(image)
    except SourceError as exc:
        log.warning("image %s: %s", path, exc)
        return None


# --- synthetic drive ----------------------------------------------------------------------------

