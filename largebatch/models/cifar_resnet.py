"""CIFAR-style ResNet-20/56 (He et al. 2016, "Deep Residual Learning", §4.2).

Layout: 3×3 conv (16 ch) + BN + ReLU, then three stages of ``n`` basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 has stride 2), global average pooling and one
fully-connected layer: 6n + 2 weighted layers, so n=3 → ResNet-20 and n=9 → ResNet-56.

Shortcut: where the shape changes (the two stride-2 blocks) we use the paper's *option B*, a
1×1 stride-2 conv + BN projection, instead of option A (zero-padded identity). It is simpler to
express with standard layers and adds only 2,752 parameters (1% of ResNet-20); all other
shortcuts are identities. Global average pooling is adaptive, so any input ≥ 4×4 works
(28×28 Fashion-MNIST, 32×32 CIFAR, ...).
"""

from __future__ import annotations

import torch
from torch import nn


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers with a residual connection: relu(bn2(conv2(.)) + shortcut(x))."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)  # last BN of the block: zero-γ target
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:  # option B projection
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet with ``blocks_per_stage`` basic blocks in each of the 16/32/64-channel stages."""

    def __init__(self, blocks_per_stage: int, *, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
            nn.BatchNorm2d(16),
            nn.ReLU(inplace=True),
        )
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = [BasicBlock(in_planes, planes, stride)]
            blocks += [BasicBlock(planes, planes) for _ in range(blocks_per_stage - 1)]
            stages.append(nn.Sequential(*blocks))
            in_planes = planes
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.stem(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def resnet20(*, num_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(3, num_classes=num_classes, in_channels=in_channels)


def resnet56(*, num_classes: int, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(9, num_classes=num_classes, in_channels=in_channels)


__all__ = ["BasicBlock", "CifarResNet", "resnet20", "resnet56"]
