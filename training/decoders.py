"""Decoders: take an encoder's list of feature maps (highest resolution first) and its channel
counts, never the encoder itself."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SeparableConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, in_ch, 3, padding=dilation, dilation=dilation, groups=in_ch,
                      bias=False),
            nn.BatchNorm2d(in_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_ch, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al.): 1x1, three atrous separable 3x3 branches and
    image pooling, concatenated and projected."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (6, 12, 18)) -> None:
        super().__init__()
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
                           nn.ReLU(inplace=True))]
            + [SeparableConvBNReLU(in_ch, out_ch, rate) for rate in rates]
        )
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(in_ch, out_ch, 1, bias=False),
                                  nn.ReLU(inplace=True))
        self.project = nn.Sequential(
            nn.Conv2d(out_ch * (len(rates) + 2), out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True), nn.Dropout(0.1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = F.interpolate(self.pool(x), size=x.shape[-2:], mode="bilinear",
                               align_corners=False)
        return self.project(torch.cat([branch(x) for branch in self.branches] + [pooled], dim=1))


class ASPPSkipDecoder(nn.Module):
    """ASPP on the deepest map plus a stride-4 skip (DeepLabV3+ style): the skip carries the
    1-2 px detail that thin cracks need and that a stride-16 map alone loses."""

    def __init__(self, encoder_channels: list[int], channels: int = 128,
                 rates: tuple[int, ...] = (6, 12, 18), skip_channels: int = 48,
                 skip_index: int = 1) -> None:
        super().__init__()
        self.skip_index = skip_index
        self.aspp = ASPP(encoder_channels[-1], channels, rates)
        self.skip = nn.Sequential(
            nn.Conv2d(encoder_channels[skip_index], skip_channels, 1, bias=False),
            nn.BatchNorm2d(skip_channels), nn.ReLU(inplace=True))
        self.fuse = nn.Sequential(SeparableConvBNReLU(channels + skip_channels, channels),
                                  SeparableConvBNReLU(channels, channels))
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skip = self.skip(features[self.skip_index])
        deep = F.interpolate(self.aspp(features[-1]), size=skip.shape[-2:], mode="bilinear",
                             align_corners=False)
        return self.fuse(torch.cat([deep, skip], dim=1))
