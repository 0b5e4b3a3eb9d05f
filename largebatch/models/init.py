"""Weight initialisation used by Goyal et al. 2017 (§5.1 and appendix).

- ``he_init_``: convolutions He/MSRA normal (fan_out, ReLU gain), BN γ=1 β=0, fully-connected
  layers N(0, 0.01) with zero bias.
- ``zero_init_last_bn_gamma``: γ=0 for the last BN of every residual block, so each block starts
  as the identity (its residual branch outputs 0) and the network behaves like a shallower one
  early in training, which is what makes the large-batch warm-up stable.
"""

from __future__ import annotations

from torch import nn
from torchvision.models import resnet as tv_resnet

from .cifar_resnet import BasicBlock as CifarBasicBlock

# Residual block type -> attribute name of the BN that closes its residual branch.
_LAST_BN_OF_BLOCK: tuple[tuple[type[nn.Module], str], ...] = (
    (tv_resnet.BasicBlock, "bn2"),
    (tv_resnet.Bottleneck, "bn3"),
    (CifarBasicBlock, "bn2"),
)


def he_init_(model: nn.Module) -> nn.Module:
    """Initialise ``model`` in place as in Goyal et al. (see module docstring); returns it."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, mean=0.0, std=0.01)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def zero_init_last_bn_gamma(model: nn.Module) -> int:
    """Set γ=0 on the last BN of each residual block in ``model``; return how many were zeroed.

    Recognises torchvision ``BasicBlock`` (bn2) and ``Bottleneck`` (bn3) and the CIFAR
    ``BasicBlock`` of :mod:`largebatch.models.cifar_resnet` (bn2). Models without residual blocks
    are left untouched (returns 0).
    """
    zeroed = 0
    for m in model.modules():
        for block_type, attr in _LAST_BN_OF_BLOCK:
            if isinstance(m, block_type):
                nn.init.zeros_(getattr(m, attr).weight)
                zeroed += 1
                break
    return zeroed


__all__ = ["he_init_", "zero_init_last_bn_gamma"]
