"""Pre-activation ResNet-V2 (He et al., "Identity Mappings in Deep Residual Networks", 2016).

Laid out as Keras' ``ResNet50V2`` (``stack2`` / ``block2``), which the project's write-up used:
BN-ReLU before each convolution, identity shortcuts, a 1x1 conv shortcut on each stage's first
block fed by the pre-activation, the stride on each stage's *last* block (its shortcut a 1x1
max-pool), and a final BN-ReLU before global average pooling.
"""

from __future__ import annotations

import torch
from torch import nn

EXPANSION = 4


class PreActBottleneck(nn.Module):
    def __init__(self, in_channels: int, width: int, *, stride: int = 1,
                 conv_shortcut: bool = False) -> None:
        super().__init__()
        out_channels = width * EXPANSION
        self.preact = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.conv_shortcut = conv_shortcut
        if conv_shortcut:
            self.shortcut: nn.Module = nn.Conv2d(in_channels, out_channels, 1, stride=stride)
        elif stride > 1:
            self.shortcut = nn.MaxPool2d(kernel_size=1, stride=stride)
        else:
            self.shortcut = nn.Identity()
        self.residual = nn.Sequential(
            nn.Conv2d(in_channels, width, 1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, out_channels, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        preact = self.preact(x)
        shortcut = self.shortcut(preact if self.conv_shortcut else x)
        return shortcut + self.residual(preact)


def _stage(in_channels: int, width: int, blocks: int, *, last_stride: int) -> nn.Sequential:
    layers = [PreActBottleneck(in_channels, width, conv_shortcut=True)]
    layers += [PreActBottleneck(width * EXPANSION, width) for _ in range(blocks - 2)]
    layers.append(PreActBottleneck(width * EXPANSION, width, stride=last_stride))
    return nn.Sequential(*layers)


class ResNetV2(nn.Module):
    """Pre-activation ResNet with bottleneck blocks; ``layers`` as in torchvision (3, 4, 6, 3)."""

    def __init__(self, layers: list[int], *, num_classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 7, stride=2, padding=3),
            nn.MaxPool2d(3, stride=2, padding=1),
        )
        widths = (64, 128, 256, 512)
        strides = (2, 2, 2, 1)
        stages, in_channels = [], 64
        for width, blocks, stride in zip(widths, layers, strides):
            stages.append(_stage(in_channels, width, blocks, last_stride=stride))
            in_channels = width * EXPANSION
        self.stages = nn.Sequential(*stages)
        self.post = nn.Sequential(nn.BatchNorm2d(in_channels), nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_channels, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.post(self.stages(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))
