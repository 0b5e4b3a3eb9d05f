"""Optimizers for large-minibatch training, and the registry the trainer builds them from."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from largebatch.optim.lamb import LAMB
from largebatch.optim.lars import LARS, LARS_MODES
from largebatch.optim.param_groups import is_bn_or_bias, param_groups
from largebatch.optim.sgd import MomentumSGD

_REGISTRY: dict[str, type[torch.optim.Optimizer]] = {"sgd": MomentumSGD, "lars": LARS, "lamb": LAMB}
OPTIMIZERS = tuple(_REGISTRY)


def build_optimizer(name: str, groups: Iterable[dict] | Iterable[torch.Tensor], *, lr: float,
                    **options) -> torch.optim.Optimizer:
    """The optimizer `name` over `groups` (e.g. from `param_groups`, which carry their weight decay and
    whether the layer-wise trust ratio applies); `options` are that optimizer's keyword arguments."""
    if name not in _REGISTRY:
        raise ValueError(f"optimizer = {name!r} is not allowed; choose one of {', '.join(map(repr, OPTIMIZERS))}")
    return _REGISTRY[name](groups, lr=lr, **options)


__all__ = ["LAMB", "LARS", "LARS_MODES", "OPTIMIZERS", "MomentumSGD", "build_optimizer", "is_bn_or_bias",
           "param_groups"]
