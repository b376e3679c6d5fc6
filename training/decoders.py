"""Decoders: take an encoder's list of feature maps (highest resolution first) and its channel
counts, never the encoder itself. Each exposes ``out_channels`` for the model's 1x1 head.

- ``ASPPSkipDecoder``: ASPP on the deepest map + a stride-4 skip (Song et al.; DeepLabV3+ with
  ``separable=False``); output at stride 4.
- ``UNetDecoder``: one upsample-concatenate-convolve block per skip, optionally with scSE
  (Ronneberger et al.; Lau et al.); output at the resolution of the finest map, or finer.
- ``SegNetDecoder``: unpools with the encoder's max-pooling indices (Badrinarayanan et al.); it
  also takes those indices, the one thing it needs beyond the maps.

``FineSkipRefiner`` is not a decoder: it runs after the head and refines its stride-4 logits at
stride 2 (``mobilenet_aspp``'s ``fine_skip``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from training.encoders import double_conv


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


class ConvBNReLU(nn.Sequential):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, dilation: int = 1) -> None:
        super().__init__(
            nn.Conv2d(in_ch, out_ch, kernel, padding=(kernel - 1) // 2 * dilation,
                      dilation=dilation, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (Chen et al.): 1x1, three atrous 3x3 branches (depthwise
    separable, or standard convs as in DeepLabV3 with ``separable=False``) and image pooling,
    concatenated and projected. The image-pooling branch has no batch norm: on a 1x1 map it would
    fail in training with a batch of one."""

    def __init__(self, in_ch: int, out_ch: int, rates: tuple[int, ...] = (6, 12, 18),
                 separable: bool = True) -> None:
        super().__init__()
        atrous = SeparableConvBNReLU if separable else ConvBNReLU
        self.branches = nn.ModuleList(
            [nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
                           nn.ReLU(inplace=True))]
            + [atrous(in_ch, out_ch, dilation=rate) for rate in rates]
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
    1-2 px detail that thin cracks need and that a stride-16 map alone loses.

    ``separable=True`` (Song et al.'s deploy model) uses depthwise-separable 3x3 convs in the ASPP
    and in the two fusing convs; ``separable=False`` with ``channels=256`` is the DeepLabV3+
    decoder of Chen et al. 2018 (standard 3x3 convs, 48-channel skip)."""

    def __init__(self, encoder_channels: list[int], channels: int = 128,
                 rates: tuple[int, ...] = (6, 12, 18), skip_channels: int = 48,
                 skip_index: int = 1, separable: bool = True) -> None:
        super().__init__()
        self.skip_index = skip_index
        self.aspp = ASPP(encoder_channels[-1], channels, rates, separable=separable)
        self.skip = nn.Sequential(
            nn.Conv2d(encoder_channels[skip_index], skip_channels, 1, bias=False),
            nn.BatchNorm2d(skip_channels), nn.ReLU(inplace=True))
        fuse = SeparableConvBNReLU if separable else ConvBNReLU
        self.fuse = nn.Sequential(fuse(channels + skip_channels, channels),
                                  fuse(channels, channels))
        self.out_channels = channels

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skip = self.skip(features[self.skip_index])
        deep = F.interpolate(self.aspp(features[-1]), size=skip.shape[-2:], mode="bilinear",
                             align_corners=False)
        return self.fuse(torch.cat([deep, skip], dim=1))


class FineSkipRefiner(nn.Module):
    """A stride-2 refinement of a stride-4 model's logits, for crack edges that a stride-4 map
    places only to within 2 px (the strict-pixel scores).

    The decoder's map, reduced to ``channels`` and upsampled x2, is concatenated with the
    encoder's stride-2 map (``features[skip_index]``); two depthwise-separable 3x3 convs and a
    1x1 conv make a correction that is added to the logits upsampled x2. That last conv starts at
    zero, so a refiner added to a trained model starts out computing what the model computed (up
    to two x2 bilinear steps in place of one x4), and fine-tuning only has to learn the
    correction. No batch norm: it would stay at its initial statistics in a fine-tune with
    ``freeze_bn``. It works in logit space, so it costs a few narrow convs at stride 2 rather
    than the decoder's width there.
    """

    def __init__(self, decoder_channels: int, skip_channels: int, num_classes: int,
                 channels: int = 32, skip_index: int = 0) -> None:
        super().__init__()
        self.skip_index = skip_index
        self.reduce = nn.Sequential(nn.Conv2d(decoder_channels, channels, 1),
                                    nn.ReLU(inplace=True))
        fused = channels + skip_channels
        self.fuse = nn.Sequential(
            nn.Conv2d(fused, fused, 3, padding=1, groups=fused), nn.Conv2d(fused, channels, 1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels),
            nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
        self.correct = nn.Conv2d(channels, num_classes, 1)
        nn.init.zeros_(self.correct.weight)
        nn.init.zeros_(self.correct.bias)

    def forward(self, logits: torch.Tensor, decoded: torch.Tensor,
                features: list[torch.Tensor]) -> torch.Tensor:
        skip = features[self.skip_index]
        size = skip.shape[-2:]
        reduced = F.interpolate(self.reduce(decoded), size=size, mode="bilinear",
                                align_corners=False)
        correction = self.correct(self.fuse(torch.cat([reduced, skip], dim=1)))
        return F.interpolate(logits, size=size, mode="bilinear", align_corners=False) + correction


class SCSE(nn.Module):
    """Concurrent spatial and channel squeeze & excitation (Roy et al. 2018), combined by addition
    as in their MICCAI paper: ``x * cSE(x) + x * sSE(x)``.

    - cSE (channel gate): global average pool, 1x1 conv C -> C/r, ReLU, 1x1 conv C/r -> C,
      sigmoid: one weight per channel and image.
    - sSE (spatial gate): 1x1 conv C -> 1, sigmoid: one weight per pixel.

    With every weight and bias zero both gates are sigmoid(0) = 0.5, so the block is exactly the
    identity; a gate driven to 0 (large negative bias) leaves ``0.5 * x`` from the other one.
    ``reduction`` 2 is the default of Roy et al.'s reference implementation.
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.channel_gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid())
        self.spatial_gate = nn.Sequential(nn.Conv2d(channels, 1, 1), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.channel_gate(x) + x * self.spatial_gate(x)


class UNetDecoderBlock(nn.Module):
    """Upsample x2, concatenate the skip (if any), double 3x3 conv, then scSE (if asked).

    ``upsample="bilinear"`` interpolates to the skip's size and keeps the channels;
    ``"transpose"`` is Ronneberger et al.'s 2x2 up-convolution that halves them.
    """

    def __init__(self, in_ch: int, skip_ch: int, out_ch: int, upsample: str = "bilinear",
                 batch_norm: bool = True, attention: str | None = None) -> None:
        super().__init__()
        if upsample not in ("bilinear", "transpose"):
            raise ValueError(f"upsample must be 'bilinear' or 'transpose', got {upsample!r}")
        if attention not in (None, "scse"):
            raise ValueError(f"attention must be None or 'scse', got {attention!r}")
        self.up = nn.ConvTranspose2d(in_ch, in_ch // 2, 2, stride=2) if upsample == "transpose" \
            else None
        up_ch = in_ch // 2 if upsample == "transpose" else in_ch
        self.conv = double_conv(up_ch + skip_ch, out_ch, batch_norm)
        self.attention = SCSE(out_ch) if attention == "scse" else nn.Identity()

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        if self.up is not None:
            x = self.up(x)
        elif skip is not None:
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
        else:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        if skip is not None:
            x = torch.cat([x, skip], dim=1)
        return self.attention(self.conv(x))


class UNetDecoder(nn.Module):
    """U-Net expanding path: block ``i`` upsamples x2 and takes the ``i``-th map counted from the
    deepest but one as its skip; blocks past the last skip have none, so an encoder whose finest
    map is at stride 2 (ResNet) gets one more block to reach full resolution.

    ``decoder_channels`` gives each block's output channels and so the number of blocks (at least
    one per skip).
    """

    def __init__(self, encoder_channels: list[int], decoder_channels: tuple[int, ...],
                 upsample: str = "bilinear", batch_norm: bool = True,
                 attention: str | None = None) -> None:
        super().__init__()
        skips = list(reversed(encoder_channels[:-1]))
        if len(decoder_channels) < len(skips):
            raise ValueError(f"{len(skips)} skip connections need at least {len(skips)} decoder "
                             f"blocks, got decoder_channels={tuple(decoder_channels)}")
        blocks = []
        in_ch = encoder_channels[-1]
        for index, out_ch in enumerate(decoder_channels):
            skip_ch = skips[index] if index < len(skips) else 0
            blocks.append(UNetDecoderBlock(in_ch, skip_ch, out_ch, upsample, batch_norm,
                                           attention))
            in_ch = out_ch
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = in_ch

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        skips = features[-2::-1]
        x = features[-1]
        for index, block in enumerate(self.blocks):
            x = block(x, skips[index] if index < len(skips) else None)
        return x


class MaxUnpool2x2(nn.Module):
    """``nn.MaxUnpool2d(2, 2)`` written as a scatter: each value goes to its recorded argmax in a
    zero map of twice the size. Same output and same gradient as ``nn.MaxUnpool2d``, but it exports
    to ONNX (as ScatterElements): PyTorch's TorchScript exporter has no ONNX mapping for
    ``aten::max_unpool2d``. Indices are flat within each plane of the pooled input, as
    ``nn.MaxPool2d(return_indices=True)`` gives them; that input must have had even height and
    width (the model's size multiple sees to that)."""

    def forward(self, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        flat = x.new_zeros(n, c, 4 * h * w).scatter(2, indices.flatten(2), x.flatten(2))
        return flat.reshape(n, c, 2 * h, 2 * w)


class SegNetDecoder(nn.Module):
    """SegNet's decoder (Badrinarayanan et al., fig. 2), the mirror of a VGG encoder: per stage,
    deepest first, unpool with that stage's max-pooling indices (no learned upsampling, no skip
    maps), then ``convs_per_stage`` 3x3 conv-BN-ReLU, the last of which maps to the channels of
    the stage above. ``forward(features, indices)`` takes the encoder's pooled maps and indices.
    """

    def __init__(self, encoder_channels: list[int],
                 convs_per_stage: tuple[int, ...] = (2, 2, 3, 3, 3)) -> None:
        super().__init__()
        if len(convs_per_stage) != len(encoder_channels):
            raise ValueError(f"convs_per_stage needs one count per encoder stage "
                             f"({len(encoder_channels)}), got {tuple(convs_per_stage)}")
        self.unpool = MaxUnpool2x2()
        stages = []
        for index in reversed(range(len(encoder_channels))):
            ch = encoder_channels[index]
            out_ch = encoder_channels[max(index - 1, 0)]
            convs = [ConvBNReLU(ch, ch) for _ in range(convs_per_stage[index] - 1)]
            stages.append(nn.Sequential(*convs, ConvBNReLU(ch, out_ch)))
        self.stages = nn.ModuleList(stages)
        self.out_channels = encoder_channels[0]

    def forward(self, features: list[torch.Tensor], indices: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for stage, index in zip(self.stages, reversed(indices), strict=True):
            x = stage(self.unpool(x, index))
        return x
