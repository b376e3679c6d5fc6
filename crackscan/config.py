"""Pipeline configuration: the defaults live here, ``configs/pipeline.yaml`` shows them, and
``--config FILE`` overrides any of them. Bad values fail at start-up with the key that is wrong."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Strict):
    """One camera of the rig: its scale and which part of the lining it sees.

    ``along_axis`` is the image axis that runs along the tunnel ("x": columns, "y": rows);
    ``direction`` +1 when chainage grows with that image coordinate, -1 when it shrinks.
    ``arc_offset_mm`` is the ring arc (mm, measured round the ring) of the first image row
    (or column) across the tunnel, so the camera's sector is arc_offset_mm .. + extent.
    """

    id: str = "cam0"
    mm_per_px_along: float = Field(0.5, gt=0)
    mm_per_px_across: float = Field(0.5, gt=0)
    along_axis: Literal["x", "y"] = "x"
    direction: Literal[1, -1] = 1
    arc_offset_mm: float = 0.0


class AcquisitionConfig(_Strict):
    speed_kmh: float = Field(10.0, ge=0)  # chainage = start + speed x time, without an odometer
    start_chainage_m: float = 0.0
    folder_fps: float = Field(10.0, gt=0)  # capture rate assumed for an image folder
    encoding: Literal["raw", "jpeg", "png"] = "raw"
    queue_frames: int = Field(4, ge=1)  # ZeroMQ high-water mark on the frame stream


class InferenceConfig(_Strict):
    threshold: float | None = Field(None, gt=0, lt=1)  # None: the model's own (ONNX metadata)
    min_crack_area_px: int = Field(40, ge=1)
    min_crack_length_mm: float = Field(5.0, ge=0)
    # length / mean width below which a component is a blob (bolt pocket, spall), not a crack
    min_crack_elongation: float = Field(4.0, ge=0)
    threads: int = Field(0, ge=0)  # ONNX Runtime intra-op threads; 0: one per core


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
    batch_seconds: float = Field(0.5, gt=0)  # ... or after this long
    drain_timeout_s: float = Field(30.0, gt=0)  # after end of stream, wait this long for results


class PipelineConfig(_Strict):
    camera: CameraConfig = CameraConfig()
    acquisition: AcquisitionConfig = AcquisitionConfig()
    inference: InferenceConfig = InferenceConfig()
    severity: SeverityConfig = SeverityConfig()
    management: ManagementConfig = ManagementConfig()


class ConfigError(ValueError):
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
        return PipelineConfig(**raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        key = ".".join(str(part) for part in first["loc"])
        raise ConfigError(f"config {path}: {key}: {first['msg']}") from None
