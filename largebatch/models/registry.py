"""Model registry: ``build_model(name, ...)`` for every architecture the recipes can train.

Every model is built with He init (Goyal et al.), optional zero-γ residual init, the requested
BN momentum/eps on all BN layers and, when ``bn_batch > 0``, ghost BN (per-``bn_batch``
statistics, Goyal §5.1).
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from torchvision.models import resnet18 as tv_resnet18
from torchvision.models import resnet50 as tv_resnet50

from .alexnet_bn import AlexNetBN
from .cifar_resnet import resnet20, resnet56
from .ghost_bn import convert_to_ghost_bn
from .init import he_init_, zero_init_last_bn_gamma
from .small_cnn import SmallCNN

SMALL_IMAGE_SIZE = 64
"""Inputs smaller than this (28×28, 32×32) get stride-1 3×3 stems without early downsampling."""


def _torchvision_resnet(
    factory: Callable[..., nn.Module], num_classes: int, in_channels: int, image_size: int
) -> nn.Module:
    """torchvision ResNet (random init) with its stem adapted to the input.

    Small images get a 3×3 stride-1 stem conv and no max-pool (the usual CIFAR adaptation);
    otherwise the 7×7 stride-2 conv is kept, rebuilt only if ``in_channels != 3``.
    """
    model = factory(weights=None, num_classes=num_classes)
    if image_size < SMALL_IMAGE_SIZE:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
    return model


_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "small_cnn": lambda nc, ic, size: SmallCNN(num_classes=nc, in_channels=ic, image_size=size),
    "resnet20": lambda nc, ic, size: resnet20(num_classes=nc, in_channels=ic),
    "resnet56": lambda nc, ic, size: resnet56(num_classes=nc, in_channels=ic),
    "resnet18": lambda nc, ic, size: _torchvision_resnet(tv_resnet18, nc, ic, size),
    "resnet50": lambda nc, ic, size: _torchvision_resnet(tv_resnet50, nc, ic, size),
    "alexnet_bn": lambda nc, ic, size: AlexNetBN(
        num_classes=nc, in_channels=ic, small_input=size < SMALL_IMAGE_SIZE
    ),
}

MODELS: tuple[str, ...] = tuple(_BUILDERS)


def build_model(
    name: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    zero_init_residual: bool = False,
    bn_batch: int = 0,
    bn_momentum: float = 0.1,
    bn_eps: float = 1e-5,
) -> nn.Module:
    """Build registry model ``name`` for ``in_channels``×``image_size``² inputs.

    Args:
        name: one of :data:`MODELS`.
        num_classes: size of the output logits [N, num_classes].
        in_channels: input channels (1 for Fashion-MNIST, 3 for CIFAR/ImageNet).
        image_size: input side length; below 64 the small-image stems are used.
        zero_init_residual: zero γ of the last BN in every residual block (Goyal §5.1);
            a no-op for models without residual blocks (small_cnn, alexnet_bn).
        bn_batch: if > 0, replace BN layers by ghost BN with statistics per ``bn_batch`` samples.
        bn_momentum: PyTorch-convention BN momentum (weight of the *new* batch statistics).
        bn_eps: BN epsilon.

    Raises:
        ValueError: unknown ``name`` or non-positive sizes / negative ``bn_batch``.
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    sizes = {"num_classes": num_classes, "in_channels": in_channels, "image_size": image_size}
    for arg, value in sizes.items():
        if value < 1:
            raise ValueError(f"{arg} must be >= 1, got {value}")
    model = he_init_(_BUILDERS[name](num_classes, in_channels, image_size))
    if zero_init_residual:
        zero_init_last_bn_gamma(model)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum, m.eps = bn_momentum, bn_eps
    if bn_batch:
        model = convert_to_ghost_bn(model, bn_batch)
    return model


__all__ = ["MODELS", "SMALL_IMAGE_SIZE", "build_model"]
