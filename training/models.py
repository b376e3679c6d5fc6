"""Model registry: one plain dict from a model name to a frozen spec.

A model is assembled in one place: encoder -> decoder(encoder.out_channels) -> head. ``forward``
returns logits at input resolution and nothing else, so it exports to ONNX unchanged. The spec's
mean / std / size multiple travel into the ONNX metadata (see ``training.export``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.decoders import ASPPSkipDecoder
from training.encoders import MobileNetV2Encoder

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationModel(nn.Module):
    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = nn.Conv2d(decoder.out_channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.decoder(self.encoder(x)))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _mobilenet_aspp(num_classes: int, width_mult: float = 1.0, output_stride: int = 16,
                    aspp_channels: int = 128, aspp_rates: tuple[int, ...] = (6, 12, 18)
                    ) -> SegmentationModel:
    encoder = MobileNetV2Encoder(width_mult=width_mult, output_stride=output_stride)
    decoder = ASPPSkipDecoder(encoder.out_channels, channels=aspp_channels,
                              rates=tuple(aspp_rates))
    return SegmentationModel(encoder, decoder, num_classes)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., SegmentationModel]
    defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # input height and width must be a multiple of this (the encoder's total stride)
    size_multiple: int = 32


MODELS: MappingProxyType = MappingProxyType({
    "mobilenet_aspp": ModelSpec(_mobilenet_aspp,
                                MappingProxyType({"width_mult": 1.0, "output_stride": 16})),
})


def get_spec(name: str) -> ModelSpec:
    try:
        return MODELS[name]
    except KeyError:
        known = ", ".join(sorted(MODELS))
        raise ValueError(f"unknown model {name!r}; known models: {known}") from None


def build_model(name: str, num_classes: int = 1, **params: Any) -> SegmentationModel:
    spec = get_spec(name)
    return spec.build(num_classes=num_classes, **{**spec.defaults, **params})
