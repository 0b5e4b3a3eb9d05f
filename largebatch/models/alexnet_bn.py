"""AlexNet-BN, the AlexNet variant You et al. 2017/2018 train with LARS at very large batches.

AlexNet (Krizhevsky et al. 2012, single-tower layout as in torchvision: 64/192/384/256/256 conv
channels) with local response normalisation removed and BatchNorm inserted after every conv and
hidden fully-connected layer (conv/FC → BN → ReLU). Layers followed by BN carry no bias (BN's β
replaces it). Dropout(0.5) before the two hidden FC layers is kept from the original.

Two input-size regimes:

- default (ImageNet, 224×224): the classic 11×11/4 stem, 3×3/2 max-pools, 6×6 adaptive average
  pool and two 4096-wide hidden FC layers.
- ``small_input=True`` (28×28 / 32×32): a scaled variant — 3×3 stride-1 first conv and
  padded 3×3/2 max-pools, giving 4×4 feature maps before the classifier
  (32→16→8→4, 28→14→7→4), and 1024-wide hidden FC layers so the classifier does not dwarf the
  convolutions on tiny images.
"""

from __future__ import annotations

import torch
from torch import nn


def _conv_bn_relu(
    in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int | None = None
) -> list[nn.Module]:
    padding = kernel // 2 if padding is None else padding
    return [
        nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def _fc_bn_relu(in_features: int, out_features: int, dropout: float) -> list[nn.Module]:
    return [
        nn.Dropout(dropout),
        nn.Linear(in_features, out_features, bias=False),
        nn.BatchNorm1d(out_features),
        nn.ReLU(inplace=True),
    ]


class AlexNetBN(nn.Module):
    """AlexNet with BatchNorm after each conv and hidden FC layer (see module docstring)."""

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        small_input: bool = False,
        dropout: float = 0.5,
    ) -> None:
        super().__init__()
        if small_input:
            stem = _conv_bn_relu(in_channels, 64, 3)
            pool, pooled_size, hidden = (3, 2, 1), 4, 1024
        else:
            stem = _conv_bn_relu(in_channels, 64, 11, stride=4, padding=2)
            pool, pooled_size, hidden = (3, 2, 0), 6, 4096
        self.features = nn.Sequential(
            *stem,
            nn.MaxPool2d(*pool),
            *_conv_bn_relu(64, 192, 5),
            nn.MaxPool2d(*pool),
            *_conv_bn_relu(192, 384, 3),
            *_conv_bn_relu(384, 256, 3),
            *_conv_bn_relu(256, 256, 3),
            nn.MaxPool2d(*pool),
        )
        self.avgpool = nn.AdaptiveAvgPool2d(pooled_size)
        self.classifier = nn.Sequential(
            *_fc_bn_relu(256 * pooled_size * pooled_size, hidden, dropout),
            *_fc_bn_relu(hidden, hidden, dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.avgpool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


__all__ = ["AlexNetBN"]
