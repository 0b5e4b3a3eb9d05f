"""Optimizers for large-minibatch training, and the registry the trainer builds them from."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from largebatch.optim.param_groups import is_bn_or_bias, param_groups
from largebatch.optim.sgd import MomentumSGD

OPTIMIZERS = ("sgd",)


def build_optimizer(name: str, groups: Iterable[dict] | Iterable[torch.Tensor], *, lr: float, momentum: float,
                    nesterov: bool, lr_in_momentum: bool, momentum_correction: bool) -> torch.optim.Optimizer:
    """The optimizer `name` over `groups` (e.g. from `param_groups`, which carry their weight decay)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer = {name!r} is not allowed; choose one of {', '.join(map(repr, OPTIMIZERS))}")
    return MomentumSGD(groups, lr=lr, momentum=momentum, nesterov=nesterov, lr_in_momentum=lr_in_momentum,
                       momentum_correction=momentum_correction)


__all__ = ["OPTIMIZERS", "MomentumSGD", "build_optimizer", "is_bn_or_bias", "param_groups"]
