"""Pipeline configuration: the defaults live here, ``configs/pipeline.yaml`` shows them, and
``--config FILE`` overrides any of them. Bad values fail at start-up with the key that is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from crackscan.errors import UserError
from crackscan.wire import MAX_PIXELS, PHOTO_MAX_PX

# Tiles are a multiple of the network stride (32 for the encoders crackscan exports), so a tile
# plus the 32 px mirror margin on both sides needs no further padding.
TILE_MULTIPLE = 32
MIN_TILE = 64


class TilingError(UserError, ValueError):
    """A tile size or overlap that cannot be used (a flag or config value)."""


def check_tiling(tile: int, overlap: int) -> None:
    """Raise ValueError unless ``tile`` is a multiple of 32, at least 64, and
    0 <= ``overlap`` < tile / 2 (so a pixel lies in at most two tiles along each axis)."""
    if tile < MIN_TILE or tile % TILE_MULTIPLE:
        raise TilingError(f"tile {tile} must be a multiple of {TILE_MULTIPLE} and >= {MIN_TILE}")
    if not 0 <= overlap < tile / 2:
        raise TilingError(f"overlap {overlap} must be >= 0 and < tile / 2 = {tile / 2:g}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CaptureConfig(_Strict):
    """What a live camera or stream is asked for (drivers may ignore it: what they give is
    logged), and how a lost stream is reopened."""

    width: int | None = Field(None, gt=0)  # None: the driver's default
    height: int | None = Field(None, gt=0)
    fps: float | None = Field(None, gt=0)
    exposure: float | None = None  # driver units; None: automatic
    open_timeout_s: float = Field(10.0, gt=0)  # no first frame in this long: a clear error
    reconnect_initial_s: float = Field(0.5, gt=0)  # first wait before reopening; doubles ...
    reconnect_max_s: float = Field(10.0, gt=0)  # ... up to this
    reconnect_timeout_s: float = Field(60.0, gt=0)  # no frame for this long: the camera has ended


class CameraConfig(_Strict):
    """One camera of the rig: its scale and which part of the lining it sees.

    ``along_axis`` is the image axis that runs along the tunnel ("x": columns, "y": rows);
    ``direction`` +1 when chainage grows with that image coordinate, -1 when it shrinks.
    ``arc_offset_mm`` is the ring arc (mm, measured round the ring) of the first image row
    (or column) across the tunnel, so the camera's sector is arc_offset_mm .. + extent.
    ``source`` is where a rig camera's frames come from (any ``--source`` form); the single
    camera of a run without a rig takes ``--source`` instead. ``metadata`` is an optional
    per-frame CSV (capture time, chainage) of a recorded source.
    """

    id: str = Field("cam0", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    mm_per_px_along: float = Field(0.5, gt=0)
    mm_per_px_across: float = Field(0.5, gt=0)
    along_axis: Literal["x", "y"] = "x"
    direction: Literal[1, -1] = 1
    arc_offset_mm: float = 0.0
    source: str | None = None
    metadata: Path | None = None
    capture: CaptureConfig = CaptureConfig()


class PositionConfig(_Strict):
    """Where each frame is along the tunnel (its chainage, metres, of the image centre).

    ``speed``: start + direction x speed x time. ``odometer``: a CSV log ``time_s`` with
    ``distance_m`` (or ``ticks`` and ``ticks_per_m``), interpolated at the capture time.
    ``chainage_file``: a CSV ``time_s, chainage_m``, interpolated. ``clock``: the log's times are
    seconds since the first frame ("relative") or UNIX seconds ("unix"). A frame whose source
    knows its chainage (a recording, a metadata file) keeps it."""

    source: Literal["speed", "odometer", "chainage_file"] = "speed"
    file: Path | None = None
    ticks_per_m: float | None = Field(None, gt=0)
    clock: Literal["relative", "unix"] = "relative"
    direction: Literal[1, -1] = 1  # -1: the vehicle drives towards lower chainage

    @model_validator(mode="after")
    def _check(self) -> PositionConfig:
        if self.source != "speed" and self.file is None:
            raise ValueError(f"position source {self.source} needs 'file'")
        return self


class AcquisitionConfig(_Strict):
    # what is inspected and by what: kept with the run (crackscan query --tunnel, compare)
    tunnel: str | None = Field(None, min_length=1)
    vehicle: str | None = Field(None, min_length=1)
    speed_kmh: float = Field(10.0, ge=0)  # chainage = start + speed x time, without an odometer
    start_chainage_m: float = 0.0
    position: PositionConfig = PositionConfig()
    folder_fps: float = Field(10.0, gt=0)  # capture rate assumed for an image folder
    encoding: Literal["raw", "jpeg", "png"] = "raw"
    # replay: frames sent and not yet stored are kept (encoded) to be sent again if lost; at
    # most this much memory, then the reader waits (one frame always fits)
    in_flight_mb: float = Field(512.0, gt=0)
    # a frame whose result a worker sent but management has not reported stored this long after
    # is sent again (management lost it: killed or restarted)
    ack_timeout_s: float = Field(30.0, gt=0)
    # the wire's pixel budget: a larger frame is counted bad at the source; workers and
    # management refuse a larger image from its header, before decoding a pixel
    max_frame_pixels: int = Field(MAX_PIXELS, ge=1)
    # --record DIR: how frames are written (png: lossless; jpeg at this quality: smaller)
    record_encoding: Literal["png", "jpeg"] = "png"
    record_jpeg_quality: int = Field(95, ge=1, le=100)


class InferenceConfig(_Strict):
    # the bundled model the workers load when no --model is given: FP32, or its INT8 (QDQ)
    # quantization (crackscan quantize), faster on CPUs with integer dot products; auto: INT8
    # where ONNX Runtime runs on the CPU, FP32 on a GPU
    precision: Literal["auto", "fp32", "int8"] = "auto"
    threshold: float | None = Field(None, gt=0, lt=1)  # None: the model's own (ONNX metadata)
    min_crack_area_px: int = Field(40, ge=1)
    min_crack_length_mm: float = Field(5.0, ge=0)
    # length / mean width below which a component is a blob (bolt pocket, spall), not a crack
    min_crack_elongation: float = Field(4.0, ge=0)
    # a component at least straight_min_length_px long whose longest path stays within
    # straight_max_deviation x its length of the straight line between its ends is a ring or
    # segment joint, a cable or pipe edge, a formwork line: not a crack (docs/geometry.md); 0: off
    # (the default: measured, it did not lower the false cracks of every synthetic drive)
    straight_max_deviation: float = Field(0.0, ge=0, lt=0.5)
    straight_min_length_px: int = Field(100, ge=2)
    # a component fewer than this share of whose cross profiles are lines (darker or lighter than
    # both sides) is a step: a stain's rim, the edge of a hole, a spall or a marking, not a crack
    # (docs/geometry.md); 0: off
    line_min_share: float = Field(0.2, ge=0, le=1)
    # a model with lining classes: regions of a lining class (joint, stain...) smaller than this
    # are not stored as lining features
    min_feature_area_px: int = Field(200, ge=1)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0: one per core
    # ONNX Runtime threads busy-wait between the operators of a run and stop when it returns, so
    # between frames the cores go to acquisition, geometry and management; false: never spin
    spin: bool = True
    # frames larger than ``tile`` px (either side: line-scan strips, 4K, large area cameras) are
    # cut into tiles of at most ``tile`` px that overlap by ``tile_overlap`` px, segmented
    # ``max_batch`` at a time and stitched; 0: whole frames (README, "Tiles")
    tile: int = Field(512, ge=0)
    tile_overlap: int = Field(64, ge=0)
    max_batch: int = Field(8, ge=1)
    # micro-batching of frames in a worker (GPUs): up to batch_frames, waiting batch_wait_ms
    batch_frames: int = Field(1, ge=1)
    batch_wait_ms: float = Field(5.0, ge=0)
    # test-time augmentation: "hflip" or "flips" average each frame's probabilities with its
    # mirror images (2 or 4 model runs a frame: office replay, not a vehicle at speed)
    tta: Literal["none", "hflip", "flips"] = "none"
    # evidence: a JPEG of the frame around each crack (its box plus a quarter of its size on
    # every side, at least 16 px) travels with the result and is stored with the detection,
    # scaled to at most photo_max_px on its longer side; 0: no photos
    photo_max_px: int = Field(320, ge=0, le=PHOTO_MAX_PX)
    photo_jpeg_quality: int = Field(85, ge=1, le=100)

    @model_validator(mode="after")
    def _check_tiles(self) -> InferenceConfig:
        if self.tile:
            check_tiling(self.tile, self.tile_overlap)
        return self


class SeverityConfig(_Strict):
    """Severity by maximum width (mm). Class i applies from ``width_mm[i-1]`` up to
    ``width_mm[i]``; tunnel practice monitors at 0.2 / 0.3 mm and grades at 3 / 5 mm."""

    width_mm: tuple[float, ...] = (0.2, 0.3, 3.0, 5.0)
    names: tuple[str, ...] = ("hairline", "fine", "medium", "wide", "severe")

    @model_validator(mode="after")
    def _check(self) -> SeverityConfig:
        if list(self.width_mm) != sorted(self.width_mm):
            raise ValueError("severity.width_mm must be increasing")
        if len(self.names) != len(self.width_mm) + 1:
            raise ValueError("severity.names needs one name more than severity.width_mm")
        return self

    def classify(self, width_max_mm: float) -> str:
        for limit, name in zip(self.width_mm, self.names, strict=False):
            if width_max_mm < limit:
                return name
        return self.names[-1]


class ManagementConfig(_Strict):
    batch_size: int = Field(50, ge=1)  # results written per transaction at most
    batch_seconds: float = Field(0.5, gt=0)  # ... or after this long (replay; live: at once)
    drain_timeout_s: float = Field(30.0, gt=0)  # after end of stream, wait this long for results
    # detections of different frames whose polylines come this close are one physical crack
    merge_link_mm: float = Field(10.0, gt=0)


class PipelineConfig(_Strict):
    camera: CameraConfig = CameraConfig()
    # a camera rig: several cameras in one run, each with its own ``source`` (``--source rig``)
    rig: tuple[CameraConfig, ...] = ()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    inference: InferenceConfig = InferenceConfig()
    severity: SeverityConfig = SeverityConfig()
    management: ManagementConfig = ManagementConfig()

    @model_validator(mode="after")
    def _check_rig(self) -> PipelineConfig:
        ids = [camera.id for camera in self.rig]
        if len(set(ids)) != len(ids):
            raise ValueError(f"rig camera ids must be unique: {ids}")
        missing = [camera.id for camera in self.rig if not camera.source]
        if missing:
            raise ValueError(f"rig cameras need a 'source': {', '.join(missing)}")
        return self

    def camera_for(self, camera_id: str) -> CameraConfig:
        """The rig camera of that id, else the single camera (whatever its id: a recording
        from another vehicle keeps its camera names)."""
        return next((camera for camera in self.rig if camera.id == camera_id), self.camera)


class ConfigError(UserError, ValueError):
    """A configuration file that cannot be used; the message names the file and the key."""


def load_pipeline_config(path: Path | None = None) -> PipelineConfig:
    if path is None:
        return PipelineConfig()
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path} must be a mapping of sections")
    try:
        return _relative_to(PipelineConfig(**raw), path.parent)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config {path}: {key}: {first['msg']}") from None


def _relative_to(config: PipelineConfig, folder: Path) -> PipelineConfig:
    """Relative file paths in a config file name files beside it: the position log, metadata
    files, and rig sources that are files there (``camera:0`` and URLs stay as they are)."""
    def camera(cam: CameraConfig) -> CameraConfig:
        update: dict = {}
        if cam.metadata is not None and not cam.metadata.is_absolute():
            update["metadata"] = folder / cam.metadata
        if cam.source and not Path(cam.source).is_absolute() and (folder / cam.source).exists():
            update["source"] = str(folder / cam.source)
        return cam.model_copy(update=update) if update else cam

    position = config.acquisition.position
    if position.file is not None and not position.file.is_absolute():
        position = position.model_copy(update={"file": folder / position.file})
    acquisition = config.acquisition.model_copy(update={"position": position})
    return config.model_copy(update={"camera": camera(config.camera), "acquisition": acquisition,
                                     "rig": tuple(camera(c) for c in config.rig)})
