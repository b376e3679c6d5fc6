"""Training configuration: one flat, validated model of a recipe YAML (``configs/train/``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = "mobilenet_aspp"
    model_params: dict = Field(default_factory=dict)
    encoder_weights: Path | None = None  # a local torchvision-style checkpoint; never downloaded
    data: list[Path] = Field(default_factory=list)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    crop: int = Field(256, ge=32)
    batch_size: int = Field(8, ge=1)
    epochs: int = Field(30, ge=1)
    max_minutes: float | None = Field(None, gt=0)  # stop early after this wall-clock budget
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(1e-4, ge=0)
    loss: str = "bce_dice"
    tolerance: float = Field(2.0, ge=0)
    threshold: float = Field(0.5, gt=0, lt=1)
    seed: int = 0
    num_threads: int = Field(0, ge=0)  # 0: torch's default
    out: Path = Path("runs/train")


def load_config(path: Path | None, **overrides) -> TrainConfig:
    raw = {}
    if path is not None:
        raw = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: a training config must be a mapping of keys to values")
    raw.update({k: v for k, v in overrides.items() if v not in (None, [], ())})
    return TrainConfig(**raw)
