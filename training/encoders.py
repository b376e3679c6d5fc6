"""Encoders for the segmentation models.

Contract (every encoder here follows it, decoders rely on nothing else):
- ``forward(x)`` returns a list of feature maps, highest resolution first, one per stride in
  ``strides`` (e.g. 2, 4, 8, 16, 32 of the input; later ones may be dilated instead of strided).
- ``out_channels`` lists the channel count of each returned map, in the same order.
- ``output_stride`` is the stride of the last (deepest) map.

Parameters are named exactly as in torchvision, so a user's local ImageNet checkpoint loads with
``encoder.load_state_dict(state, strict=False)`` (the classifier keys are simply not used).
Nothing is ever downloaded.
"""

from __future__ import annotations

import torch
from torch import nn


class ConvNormActivation(nn.Sequential):
    """torchvision's Conv2dNormActivation: conv (index 0), batch norm (1), ReLU6 (2)."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, groups: int = 1,
                 dilation: int = 1) -> None:
        padding = (kernel - 1) // 2 * dilation
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, stride, padding, dilation=dilation, groups=groups,
                      bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU6(inplace=True),
        )


class InvertedResidual(nn.Module):
    """MobileNetV2 block; submodule names (``conv.0.0`` ...) match torchvision."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, expand_ratio: int,
                 dilation: int = 1) -> None:
        super().__init__()
        hidden = int(round(in_ch * expand_ratio))
        self.use_res_connect = stride == 1 and in_ch == out_ch
        layers: list[nn.Module] = []
        if expand_ratio != 1:
            layers.append(ConvNormActivation(in_ch, hidden, kernel=1))
        layers += [
            ConvNormActivation(hidden, hidden, stride=stride, groups=hidden, dilation=dilation),
            nn.Conv2d(hidden, out_ch, 1, bias=False),
            nn.BatchNorm2d(out_ch),
        ]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


def _make_divisible(value: float, divisor: int = 8) -> int:
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


class MobileNetV2Encoder(nn.Module):
    """MobileNetV2 feature extractor (``features.0`` .. ``features.17`` of torchvision).

    ``output_stride=16`` replaces the last stride-2 stage with dilation 2, as DeepLab does, so
    thin cracks keep more spatial detail in the deepest map.
    """

    # expansion t, channels c, repeats n, stride s (Sandler et al. 2018, table 2)
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, width_mult: float = 1.0, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        in_ch = _make_divisible(32 * width_mult)
        layers: list[nn.Module] = [ConvNormActivation(3, in_ch, stride=2)]
        stride, dilation = 2, 1
        # indices into ``features`` whose outputs are returned: the last block at each stride
        self._taps: list[int] = []
        channels: list[int] = []
        for t, c, n, s in self.SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            first_dilation = dilation
            if s == 2:
                self._taps.append(len(layers) - 1)
                channels.append(in_ch)
                if stride == output_stride:  # past the output stride: dilate instead (DeepLab)
                    s, dilation = 1, dilation * 2
                else:
                    stride *= 2
            for i in range(n):
                layers.append(InvertedResidual(in_ch, out_ch, s if i == 0 else 1, t,
                                               first_dilation if i == 0 else dilation))
                in_ch = out_ch
        self._taps.append(len(layers) - 1)
        channels.append(in_ch)
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self._taps:
                maps.append(x)
        return maps
