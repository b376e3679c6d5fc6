"""Model registry: one plain dict from a model name to a frozen spec.

A model is assembled in one place: encoder -> decoder(encoder.out_channels) -> head. ``forward``
returns logits at input resolution and nothing else, so it exports to ONNX unchanged. The spec's
mean / std / size multiple travel into the ONNX metadata (see ``training.export``).

Every model takes ``num_classes``: 1 gives binary crack logits, C > 1 gives C class logits (e.g.
Song et al.'s crack, structural seam, water stain, scratch, background); the model only sets the
head's width. The architectures of the research behind crackscan (see docs/DESIGN.md):

    mobilenet_aspp       Song et al.'s deploy model: MobileNetV2 (or ``encoder="mobilenet_v1"``)
                         + separable ASPP + stride-4 skip (``fine_skip``: and a stride-2
                         refinement of the logits)
    resnet18_aspp        Song et al.'s training model: ResNet-18 + the same decoder
    unet_resnet34_scse   Lau et al.: U-Net decoder with scSE blocks over ResNet-34
    unet                 Ronneberger et al.: the classic U-Net
    segnet               Badrinarayanan et al.: VGG16-BN + decoder unpooling with pool indices
    deeplabv3plus_resnet DeepLabV3+ (as in the U2PL crack work): ResNet-50 (``depth`` 18, 34,
                         50 or 101) at output stride 16, ASPP and stride-4 skip
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training.decoders import ASPPSkipDecoder, FineSkipRefiner, SegNetDecoder, UNetDecoder
from training.encoders import (
    MobileNetV1Encoder,
    MobileNetV2Encoder,
    ResNetEncoder,
    UNetEncoder,
    VGG16BNEncoder,
)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class SegmentationModel(nn.Module):
    """encoder -> decoder -> 1x1 head, then optionally ``refine(logits, decoded, features)``
    (a ``FineSkipRefiner``), then bilinear up to the input's size."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module, num_classes: int,
                 refine: nn.Module | None = None) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.head = nn.Conv2d(decoder.out_channels, num_classes, 1)
        self.refine = refine

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.encoder(x)
        decoded = self.decoder(features)
        logits = self.head(decoded)
        if self.refine is not None:
            logits = self.refine(logits, decoded, features)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


class SegNet(SegmentationModel):
    """The one model whose decoder needs more than the maps: the encoder's max-pooling indices.
    Its decoder already ends at input resolution, so there is nothing to interpolate."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps, indices = self.encoder.forward_with_indices(x)
        return self.head(self.decoder(maps, indices))


MOBILENET_ENCODERS = {"mobilenet_v2": MobileNetV2Encoder, "mobilenet_v1": MobileNetV1Encoder}


def _mobilenet_aspp(num_classes: int, width_mult: float = 1.0, output_stride: int = 16,
                    aspp_channels: int = 128, aspp_rates: tuple[int, ...] = (6, 12, 18),
                    encoder: str = "mobilenet_v2", fine_skip: bool = False,
                    fine_channels: int = 32) -> SegmentationModel:
    if encoder not in MOBILENET_ENCODERS:
        raise ValueError(f"unknown encoder {encoder!r}; known: {', '.join(MOBILENET_ENCODERS)}")
    backbone = MOBILENET_ENCODERS[encoder](width_mult=width_mult, output_stride=output_stride)
    decoder = ASPPSkipDecoder(backbone.out_channels, channels=aspp_channels,
                              rates=tuple(aspp_rates))
    refine = (FineSkipRefiner(decoder.out_channels, backbone.out_channels[0], num_classes,
                              channels=fine_channels) if fine_skip else None)
    return SegmentationModel(backbone, decoder, num_classes, refine)


def _resnet18_aspp(num_classes: int, output_stride: int = 16, aspp_channels: int = 128,
                   aspp_rates: tuple[int, ...] = (6, 12, 18)) -> SegmentationModel:
    encoder = ResNetEncoder(18, output_stride=output_stride)
    decoder = ASPPSkipDecoder(encoder.out_channels, channels=aspp_channels,
                              rates=tuple(aspp_rates))
    return SegmentationModel(encoder, decoder, num_classes)


def _unet_resnet34_scse(num_classes: int,
                        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
                        attention: str | None = "scse") -> SegmentationModel:
    encoder = ResNetEncoder(34, output_stride=32)
    # four skips (strides 16, 8, 4, 2) and a fifth block without skip, up to full resolution
    decoder = UNetDecoder(encoder.out_channels, tuple(decoder_channels), upsample="bilinear",
                          attention=attention)
    return SegmentationModel(encoder, decoder, num_classes)


def _unet(num_classes: int, base_channels: int = 64, upsample: str = "transpose",
          batch_norm: bool = True) -> SegmentationModel:
    encoder = UNetEncoder(base_channels=base_channels, batch_norm=batch_norm)
    decoder = UNetDecoder(encoder.out_channels, tuple(reversed(encoder.out_channels[:-1])),
                          upsample=upsample, batch_norm=batch_norm)
    return SegmentationModel(encoder, decoder, num_classes)


def _segnet(num_classes: int) -> SegNet:
    encoder = VGG16BNEncoder()
    return SegNet(encoder, SegNetDecoder(encoder.out_channels, (2, 2, 3, 3, 3)), num_classes)


def _deeplabv3plus_resnet(num_classes: int, depth: int = 50, output_stride: int = 16,
                          aspp_channels: int = 256, aspp_rates: tuple[int, ...] = (6, 12, 18),
                          skip_channels: int = 48) -> SegmentationModel:
    encoder = ResNetEncoder(depth, output_stride=output_stride)
    decoder = ASPPSkipDecoder(encoder.out_channels, channels=aspp_channels,
                              rates=tuple(aspp_rates), skip_channels=skip_channels,
                              separable=False)
    return SegmentationModel(encoder, decoder, num_classes)


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., SegmentationModel]
    defaults: MappingProxyType = field(default_factory=lambda: MappingProxyType({}))
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # input height and width must be a multiple of this: the largest total stride any allowed
    # parameter gives (pad the image up to it and crop the logits back)
    size_multiple: int = 32


MODELS: MappingProxyType = MappingProxyType({
    "mobilenet_aspp": ModelSpec(_mobilenet_aspp,
                                MappingProxyType({"width_mult": 1.0, "output_stride": 16,
                                                  "encoder": "mobilenet_v2"})),
    "resnet18_aspp": ModelSpec(_resnet18_aspp, MappingProxyType({"output_stride": 16})),
    "unet_resnet34_scse": ModelSpec(_unet_resnet34_scse,
                                    MappingProxyType({"attention": "scse"})),
    # four 2x2 max pools: 16 is enough
    "unet": ModelSpec(_unet, MappingProxyType({"base_channels": 64, "upsample": "transpose",
                                               "batch_norm": True}), size_multiple=16),
    # five pools, and unpooling needs each pooled map's input to have had an even size
    "segnet": ModelSpec(_segnet),
    "deeplabv3plus_resnet": ModelSpec(_deeplabv3plus_resnet,
                                      MappingProxyType({"depth": 50, "output_stride": 16})),
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


def param_groups(model: SegmentationModel) -> list[list[nn.Parameter]]:
    """Three layer groups for discriminative learning rates (Lau et al.: 1/9 : 1/3 : 1, the first
    frozen early): [early encoder, late encoder, decoder + head]. Every parameter is in exactly
    one group.

    The encoder splits itself (``layer_groups``) after its stride-8 map:
        MobileNetV2  features.0-6 | features.7-17
        MobileNetV1  stem, blocks.0-4 | blocks.5-12
        ResNet       conv1, bn1, layer1, layer2 | layer3, layer4 (fastai's split)
        VGG16-BN     features.0-23 (stages 1-3) | features.24-43 (stages 4-5)
        U-Net        stages.0-3 | stages.4 (the 8 x base -> 16 x base bottleneck)
    """
    early, late = model.encoder.layer_groups()
    taken = {id(p) for p in (*early, *late)}
    rest = [p for p in model.parameters() if id(p) not in taken]
    return [early, late, rest]


def _unwrap_state_dict(state: Any) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision-style file: a bare state dict, or one under "model" or
    "state_dict" (torchvision's and most training scripts' checkpoints), "module." (DDP) removed."""
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"expected a state dict, got {type(state).__name__}")
    return {k.removeprefix("module."): v for k, v in state.items()
            if isinstance(v, torch.Tensor)}


def load_encoder_weights(model: SegmentationModel, path: str | Path) -> int:
    """Load a local torchvision-style state dict (a whole classification network, or the encoder
    alone) into ``model.encoder``; returns how many tensors were loaded.

    Keys the encoder does not have (``fc.*``, ``classifier.*``, ...) are ignored and encoder keys
    missing from the file keep their values, as ``load_state_dict(strict=False)`` does. Raises
    ValueError if no key matches (a checkpoint of another architecture) or a matching key has
    another shape (e.g. ResNet-50 weights for a ResNet-18 encoder). Nothing is downloaded.
    """
    state = _unwrap_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    own = model.encoder.state_dict()
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ValueError(
            f"no tensor in {path} belongs to this {type(model.encoder).__name__}: the file has "
            f"e.g. {sorted(state)[:3]}, the encoder expects e.g. {sorted(own)[:3]}; is it a "
            f"checkpoint of another architecture?")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})"
             for k, v in matched.items() if v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"{len(wrong)} tensors in {path} have the wrong shape for this "
                         f"{type(model.encoder).__name__}, e.g. {'; '.join(wrong[:3])}; is it "
                         f"a checkpoint of another depth or width?")
    model.encoder.load_state_dict(matched, strict=False)
    return len(matched)
