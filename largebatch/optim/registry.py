"""The optimizers the trainer can build, each with its own options and their one default.

An entry is the optimizer's options (a frozen dataclass whose fields are keyword arguments of its
constructor, declared with `largebatch.fields` so the config validates them and `--help` lists them)
and where its class lives. Adding an optimizer is one module with the maths plus one entry here.
The classes are imported only when built, so this module, and config validation with it, need no torch.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from largebatch.fields import choice, number, plain

LARS_MODES = ("lars", "larc_clip", "larc_scale")
# How LARS and LAMB run their group updates: torch._foreach_* ops (any device and dtype),
# torch.compile'd per-tensor expressions (compiles on the first step), or one C++ kernel per group
# (CPU, float32 / float64; compiled once per machine: largebatch.optim.fused).
LAYERWISE_IMPLS = ("foreach", "compiled", "fused")
IMPL_HELP = "foreach ops; compiled: torch.compile (the first step compiles); fused: one C++ kernel per group (CPU)"


@dataclass(frozen=True)
class SGDOptions:
    """Momentum SGD (Goyal et al. 2017)."""

    momentum: float = number(0.9, 0.0, 1.0, hi_open=True, help="momentum m")
    nesterov: bool = plain(False, "Nesterov momentum")
    lr_in_momentum: bool = plain(True, "Goyal's form v <- m v + lr (g + wd w); false: torch.optim.SGD's form")
    momentum_correction: bool = plain(True, "rescale the buffer by lr_new / lr_old when the lr changes")


@dataclass(frozen=True)
class LARSOptions:
    """LARS / LARC (You et al. 2017; NVIDIA apex)."""

    momentum: float = number(0.9, 0.0, 1.0, hi_open=True, help="momentum m")
    nesterov: bool = plain(False, "Nesterov momentum")
    trust_coefficient: float = number(0.001, 0.0, lo_open=True, help="eta in eta*|w|/(|g| + wd*|w| + eps)")
    mode: str = choice("lars", LARS_MODES, "larc_clip caps each layer's rate at the global lr")
    eps: float = number(0.0, 0.0, help="added to the trust ratio's denominator")
    impl: str = choice("foreach", LAYERWISE_IMPLS, IMPL_HELP)


@dataclass(frozen=True)
class LAMBOptions:
    """LAMB (You et al. 2019)."""

    betas: tuple[float, ...] = plain((0.9, 0.999), "Adam's (beta1, beta2), each in [0, 1)")
    eps: float = number(1e-6, 0.0, help="added to sqrt(v)")
    bias_correction: bool = plain(True, "divide the moments by 1 - beta**t")
    trust_clip: float = number(0.0, 0.0, help="upper bound of the trust ratio; 0: none")
    impl: str = choice("foreach", LAYERWISE_IMPLS, IMPL_HELP)


@dataclass(frozen=True)
class OptimizerEntry:
    options: type  # the frozen dataclass of the optimizer's own options
    factory: str  # "module:Class", the optimizer class


OPTIMIZERS: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(SGDOptions, "largebatch.optim.sgd:MomentumSGD"),
    "lars": OptimizerEntry(LARSOptions, "largebatch.optim.lars:LARS"),
    "lamb": OptimizerEntry(LAMBOptions, "largebatch.optim.lamb:LAMB"),
}


def optimizer_class(name: str) -> type:
    if name not in OPTIMIZERS:
        raise ValueError(f"optimizer = {name!r} is not allowed; choose one of {', '.join(map(repr, OPTIMIZERS))}")
    module, _, cls = OPTIMIZERS[name].factory.partition(":")
    return getattr(importlib.import_module(module), cls)


def build_optimizer(name: str, groups: Iterable[dict] | Iterable[Any], *, lr: float, options: Any = None):
    """The optimizer `name` over `groups` (e.g. from `param_groups`, which carry their weight decay and
    whether the layer-wise trust ratio applies) with `options`, an instance of its options dataclass
    (its defaults when None)."""
    cls = optimizer_class(name)
    options = OPTIMIZERS[name].options() if options is None else options
    if not isinstance(options, OPTIMIZERS[name].options):
        raise TypeError(f"options of optimizer {name!r} must be a {OPTIMIZERS[name].options.__name__}")
    return cls(groups, lr=lr, **dataclasses.asdict(options))
