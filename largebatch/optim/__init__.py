"""Optimizers for large-minibatch training, and the registry the trainer builds them from.

The registry (`OPTIMIZERS`, each optimizer's options) imports without torch, for config validation
and `--help`; the optimizer classes and parameter groups load on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from largebatch.optim.registry import LARS_MODES, OPTIMIZERS, build_optimizer, optimizer_class

_LAZY = {"MomentumSGD": "largebatch.optim.sgd", "LARS": "largebatch.optim.lars", "LAMB": "largebatch.optim.lamb",
         "param_groups": "largebatch.optim.groups", "is_bn_or_bias": "largebatch.optim.groups"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'largebatch.optim' has no attribute {name!r}")


__all__ = ["LAMB", "LARS", "LARS_MODES", "OPTIMIZERS", "MomentumSGD", "build_optimizer", "is_bn_or_bias",
           "optimizer_class", "param_groups"]
