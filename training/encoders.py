"""Encoders for the segmentation models.

Contract (every encoder here follows it, decoders rely on nothing else):
- ``forward(x)`` returns a list of feature maps, highest resolution first, one per stage
  (strides 2, 4, 8, 16, 32 of the input for the ImageNet backbones, 1 .. 16 for U-Net's
  contracting path; later ones may be dilated instead of strided).
- ``out_channels`` lists the channel count of each returned map, in the same order.
- ``output_stride`` is the stride of the last (deepest) map.
- ``layer_groups()`` splits the parameters into (early, late) for discriminative learning rates:
  early is everything up to and including the stride-8 map (generic edge and texture filters that
  transfer from ImageNet almost unchanged), late is the rest.

Parameters are named exactly as in torchvision (MobileNetV2, ResNet, VGG16-BN), so a user's local
ImageNet checkpoint loads with ``encoder.load_state_dict(state, strict=False)`` (the classifier
keys are simply not used; see ``training.models.load_encoder_weights``). MobileNetV1 and U-Net
have no torchvision model; their names are documented on their classes. Nothing is ever
downloaded.
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

    def layer_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(early, late): ``features`` up to the stride-8 map (``features.0`` .. ``features.6``),
        then the rest."""
        cut = self._taps[2] + 1
        return list(self.features[:cut].parameters()), list(self.features[cut:].parameters())


class DepthwiseSeparable(nn.Module):
    """MobileNetV1 block (Howard et al. 2017, fig. 3): 3x3 depthwise conv, BN, ReLU, then 1x1
    pointwise conv, BN, ReLU."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(in_ch, in_ch, 3, stride, padding=dilation, dilation=dilation,
                                   groups=in_ch, bias=False)
        self.depthwise_bn = nn.BatchNorm2d(in_ch)
        self.pointwise = nn.Conv2d(in_ch, out_ch, 1, bias=False)
        self.pointwise_bn = nn.BatchNorm2d(out_ch)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.depthwise_bn(self.depthwise(x)))
        return self.relu(self.pointwise_bn(self.pointwise(x)))


class MobileNetV1Encoder(nn.Module):
    """MobileNetV1 feature extractor (Howard et al. 2017, table 1, without pooling and classifier),
    the inference encoder of Song et al.

    torchvision has no MobileNetV1, so there is no reference naming to follow; the layers are named
    plainly: ``stem.0`` (3x3 conv, stride 2) and ``stem.1`` (its BN), then ``blocks.0`` ..
    ``blocks.12``, each with ``depthwise``, ``depthwise_bn``, ``pointwise``, ``pointwise_bn``. A
    checkpoint from elsewhere needs its keys renamed to these. None of these names occurs in
    MobileNetV2, so a V2 checkpoint can never half-load into this encoder.

    Returned maps: strides 2, 4, 8, 16, 32 (``blocks.0, 2, 4, 10, 12``), channels
    64, 128, 256, 512, 1024 at ``width_mult=1``; ``output_stride`` 8 or 16 dilates the last stages
    instead of striding them, as in ``MobileNetV2Encoder``.
    """

    # output channels and stride of the 13 depthwise-separable blocks
    SETTINGS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1),
                (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1))

    def __init__(self, width_mult: float = 1.0, output_stride: int = 16) -> None:
        super().__init__()
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        in_ch = _make_divisible(32 * width_mult)
        self.stem = nn.Sequential(nn.Conv2d(3, in_ch, 3, 2, 1, bias=False),
                                  nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True))
        blocks: list[nn.Module] = []
        stride, dilation = 2, 1
        self._taps: list[int] = []  # indices into ``blocks`` whose outputs are returned
        channels: list[int] = []
        for c, s in self.SETTINGS:
            out_ch = _make_divisible(c * width_mult)
            block_dilation = dilation
            if s == 2:
                self._taps.append(len(blocks) - 1)
                channels.append(in_ch)
                if stride == output_stride:  # past the output stride: dilate instead (DeepLab)
                    s, dilation = 1, dilation * 2
                else:
                    stride *= 2
            blocks.append(DepthwiseSeparable(in_ch, out_ch, s, block_dilation))
            in_ch = out_ch
        self._taps.append(len(blocks) - 1)
        channels.append(in_ch)
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = channels
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        maps = []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in self._taps:
                maps.append(x)
        return maps

    def layer_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(early, late): stem and blocks up to the stride-8 map, then the rest."""
        cut = self._taps[2] + 1
        return ([*self.stem.parameters(), *self.blocks[:cut].parameters()],
                list(self.blocks[cut:].parameters()))


class BasicBlock(nn.Module):
    """ResNet-18/34 block; names (``conv1``, ``bn1``, ``conv2``, ``bn2``, ``downsample``) as in
    torchvision. Unlike torchvision's, it accepts dilation (for output stride 8/16)."""

    expansion = 1

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """ResNet-50/101 block (torchvision's "V1.5": the stride sits on the 3x3 conv); names as in
    torchvision (``conv1..3``, ``bn1..3``, ``downsample``)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int = 1,
                 downsample: nn.Module | None = None, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, padding=dilation, dilation=dilation,
                               bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNetEncoder(nn.Module):
    """ResNet-18/34/50/101 feature extractor: torchvision's ``resnet{depth}`` without ``avgpool``
    and ``fc``, with the same parameter names (``conv1``, ``bn1``, ``layer1.0.conv1``,
    ``layer2.0.downsample.0`` ...), so a torchvision ImageNet state dict loads key for key.

    Returned maps: the stem after its ReLU (stride 2, before the max pool), then ``layer1``
    (stride 4), ``layer2`` (8), ``layer3`` (16), ``layer4`` (32). ``output_stride`` 16 or 8 dilates
    ``layer4`` (and ``layer3``) instead of striding them, as torchvision's
    ``replace_stride_with_dilation`` does: the first block of a dilated layer keeps the previous
    dilation, the others use the new one.
    """

    LAYERS = {18: (BasicBlock, (2, 2, 2, 2)), 34: (BasicBlock, (3, 4, 6, 3)),
              50: (Bottleneck, (3, 4, 6, 3)), 101: (Bottleneck, (3, 4, 23, 3))}

    def __init__(self, depth: int = 50, output_stride: int = 32) -> None:
        super().__init__()
        if depth not in self.LAYERS:
            raise ValueError(f"ResNet depth must be one of {sorted(self.LAYERS)}, got {depth}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, counts = self.LAYERS[depth]
        self._in_ch, self._dilation = 64, 1
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, 64, counts[0], 1, dilate=False)
        self.layer2 = self._make_layer(block, 128, counts[1], 2, dilate=False)
        self.layer3 = self._make_layer(block, 256, counts[2], 2, dilate=output_stride < 16)
        self.layer4 = self._make_layer(block, 512, counts[3], 2, dilate=output_stride < 32)
        self.out_channels = [64] + [planes * block.expansion for planes in (64, 128, 256, 512)]
        self.output_stride = output_stride
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def _make_layer(self, block: type[BasicBlock | Bottleneck], planes: int, count: int,
                    stride: int, dilate: bool) -> nn.Sequential:
        previous_dilation = self._dilation
        if dilate:
            self._dilation *= stride
            stride = 1
        downsample = None
        if stride != 1 or self._in_ch != planes * block.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self._in_ch, planes * block.expansion, 1, stride, bias=False),
                nn.BatchNorm2d(planes * block.expansion))
        blocks = [block(self._in_ch, planes, stride, downsample, previous_dilation)]
        self._in_ch = planes * block.expansion
        blocks += [block(self._in_ch, planes, dilation=self._dilation) for _ in range(1, count)]
        return nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        stem = self.relu(self.bn1(self.conv1(x)))
        c1 = self.layer1(self.maxpool(stem))
        c2 = self.layer2(c1)
        c3 = self.layer3(c2)
        return [stem, c1, c2, c3, self.layer4(c3)]

    def layer_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(early, late): stem, ``layer1`` and ``layer2``, then ``layer3`` and ``layer4`` (the
        split fastai uses for ResNets, which Lau et al. trained with)."""
        early = [self.conv1, self.bn1, self.layer1, self.layer2]
        return ([p for m in early for p in m.parameters()],
                [*self.layer3.parameters(), *self.layer4.parameters()])


class VGG16BNEncoder(nn.Module):
    """VGG16 with batch norm (torchvision's ``vgg16_bn().features``: ``features.0`` conv,
    ``features.1`` BN, ``features.2`` ReLU, ..., max pools at 6, 13, 23, 33, 43), the SegNet
    encoder (Badrinarayanan et al.).

    ``forward`` returns the output of each of the five stages after its max pool (strides 2, 4, 8,
    16, 32; channels 64, 128, 256, 512, 512). ``forward_with_indices`` also returns each pool's
    argmax indices (flat within each H x W plane of the pool's input, as ``nn.MaxPool2d`` gives
    them), which a SegNet decoder unpools with.
    """

    CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
              512, 512, 512, "M")

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        in_ch = 3
        channels: list[int] = []
        for item in self.CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2, return_indices=True))
                channels.append(in_ch)
            else:
                layers += [nn.Conv2d(in_ch, int(item), 3, padding=1), nn.BatchNorm2d(int(item)),
                           nn.ReLU(inplace=True)]
                in_ch = int(item)
        self.features = nn.Sequential(*layers)
        self.out_channels = channels
        self.output_stride = 32
        for module in self.modules():  # torchvision's initialisation
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward_with_indices(self, x: torch.Tensor
                             ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        maps, indices = [], []
        for layer in self.features:
            if isinstance(layer, nn.MaxPool2d):
                x, index = layer(x)
                maps.append(x)
                indices.append(index)
            else:
                x = layer(x)
        return maps, indices

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_with_indices(x)[0]

    def layer_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(early, late): stages 1-3 (``features.0`` .. ``features.23``, up to the stride-8 map),
        then stages 4-5."""
        return list(self.features[:24].parameters()), list(self.features[24:].parameters())


def double_conv(in_ch: int, out_ch: int, batch_norm: bool = True) -> nn.Sequential:
    """Two 3x3 convs, each followed by ReLU (and BN first, if ``batch_norm``), padded so the size
    stays: the U-Net unit (Ronneberger et al. used no padding and no BN)."""
    layers: list[nn.Module] = []
    for conv_in in (in_ch, out_ch):
        layers.append(nn.Conv2d(conv_in, out_ch, 3, padding=1, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class UNetEncoder(nn.Module):
    """The contracting path of U-Net (Ronneberger et al. 2015): ``stages.0`` is a double 3x3 conv
    at full resolution, ``stages.1`` .. ``stages.4`` each a 2x2 max pool and a double conv that
    doubles the channels: base, 2, 4, 8, 16 x base (64 .. 1024 by default).

    Returned maps: strides 1, 2, 4, 8, 16 (one per stage); trained from scratch, so no
    torchvision names to follow.
    """

    DEPTH = 4  # max pools, as in the paper

    def __init__(self, base_channels: int = 64, batch_norm: bool = True) -> None:
        super().__init__()
        channels = [base_channels * 2**i for i in range(self.DEPTH + 1)]
        stages: list[nn.Module] = [double_conv(3, channels[0], batch_norm)]
        for in_ch, out_ch in zip(channels[:-1], channels[1:], strict=True):
            stages.append(nn.Sequential(nn.MaxPool2d(2), double_conv(in_ch, out_ch, batch_norm)))
        self.stages = nn.ModuleList(stages)
        self.out_channels = channels
        self.output_stride = 2**self.DEPTH

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for stage in self.stages:
            x = stage(x)
            maps.append(x)
        return maps

    def layer_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(early, late): stages 0-3 (up to the stride-8 map), then the bottleneck stage 4."""
        return list(self.stages[:4].parameters()), list(self.stages[4:].parameters())
