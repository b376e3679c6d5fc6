"""A camera rig: several cameras read at once into one run.

Each camera of ``config.rig`` has its own source (a camera, a stream, a video file, a folder or a
recording) read by its own thread, so a camera that stalls or reconnects never holds up the
others; frames come out in arrival order with ``camera_id`` set. A frame's position along the
tunnel comes from its capture time (one clock for the whole rig) and the run's position model,
and is placed on the lining by that camera's scale and sector (``CameraConfig``).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace

from acquisition.frames import FrameSource, SourceBase, SourceError, SourceFrame
from crackscan.config import PipelineConfig

log = logging.getLogger(__name__)

QUEUE_PER_CAMERA = 2  # frames read ahead per camera: enough to overlap decoding, no more
_POLL_S = 0.1


class _Ended:
    """A reader thread's last item: the camera ended, with the exception that ended it, if any."""

    def __init__(self, camera_id: str, error: BaseException | None = None) -> None:
        self.camera_id, self.error = camera_id, error


class RigSource(SourceBase):
    """The frames of several cameras, each source read by its own thread."""

    interruptible = True  # close() from another thread ends iteration (see acquisition.service)

    def __init__(self, sources: dict[str, FrameSource]) -> None:
        if not sources:
            raise SourceError("a rig needs at least one camera")
        self.sources = sources
        self.cameras = tuple(sources)
        self.fps = max(source.fps for source in sources.values())
        self.description = "rig " + ", ".join(f"{cid}: {src.description}"
                                              for cid, src in sources.items())
        self._queue: queue.Queue = queue.Queue(QUEUE_PER_CAMERA * len(sources))
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __iter__(self) -> Iterator[SourceFrame]:
        self._threads = [threading.Thread(target=self._read, args=(cid, src), daemon=True,
                                          name=f"rig-{cid}") for cid, src in self.sources.items()]
        for thread in self._threads:
            thread.start()
        running = len(self._threads)
        failure: BaseException | None = None
        while running and not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                continue
            if isinstance(item, _Ended):
                running -= 1
                if item.error is not None:
                    log.error("rig camera %s failed: %s", item.camera_id, item.error)
                    failure = failure or item.error
                continue
            yield item
        if failure is not None:  # the other cameras were read to their end first
            raise failure

    def _read(self, camera_id: str, source: FrameSource) -> None:
        error = None
        try:
            for item in source:
                if not self._put(replace(item, camera_id=camera_id)):
                    return
        except Exception as exc:  # reported by the iterating thread, after the other cameras
            error = exc
        self._put(_Ended(camera_id, error), wait_anyway=True)

    def _put(self, item: object, wait_anyway: bool = False) -> bool:
        while not self._stop.is_set() or wait_anyway:
            try:
                self._queue.put(item, timeout=_POLL_S)
                return True
            except queue.Full:
                if wait_anyway and self._stop.is_set():
                    return False
        return False

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=5)
        for source in self.sources.values():
            source.close()


def open_rig(config: PipelineConfig, open_one: Callable[[str, PipelineConfig], FrameSource]
             ) -> RigSource:
    """The rig of ``config`` with each camera's source opened by ``open_one(spec, config)``
    (with that camera as ``config.camera``); a camera that cannot be opened is an error that
    names it, and closes the ones already opened."""
    if not config.rig:
        raise SourceError("--source rig needs cameras under 'rig:' in the --config file; see "
                          "configs/rig_two_cameras.yaml")
    sources: dict[str, FrameSource] = {}
    try:
        for camera in config.rig:
            try:
                sources[camera.id] = open_one(camera.source or "",
                                              config.model_copy(update={"camera": camera}))
            except SourceError as exc:
                raise SourceError(f"rig camera {camera.id}: {exc}") from None
    except BaseException:
        for source in sources.values():
            source.close()
        raise
    return RigSource(sources)
