"""Timing one optimizer step per row for `largebatch bench optim`: the model's parameters with random
gradients, every row's optimizer over them, each one's first step, then rounds of one step per row.

Every optimizer keeps its own state over the same parameters and gradients (random, scaled 1e-3), in
the groups training uses (`param_groups(model, 1e-4, exclude_bn_bias=True)`: BN and bias parameters
without weight decay and trust ratio). Each one's first step is timed on its own (allocation, and
compilation for the compiled rows); after that the rows step in turn, one step each per round, so that
a change in the machine's load slows all rows alike, and a row's figure is its median over the rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from largebatch.models import build_model
from largebatch.optim import LAMB, LARS, MomentumSGD, param_groups

IMAGENET_MODELS = ("resnet18", "resnet50", "alexnet_bn")  # built for 224 px and 1000 classes, the others for 32 px
WARMUP_ROUNDS = 2  # untimed rounds after the first steps


@dataclass(frozen=True)
class Row:
    """How to build one optimizer over parameter groups, and which baselines its ratios are to."""

    name: str
    make: Callable[[list[dict]], torch.optim.Optimizer]
    adam_like: bool = False  # also compared with AdamW(fused)
    cpu_only: bool = False


@dataclass(frozen=True)
class OptimRow:
    """A row's median ms per step, its first step's seconds and its ratios to the two baselines."""

    name: str
    median_ms: float
    first_step_s: float
    x_sgd_fused: float
    x_adamw_fused: float | None  # Adam-like rows only


def model_with_gradients(name: str, device: torch.device) -> nn.Module:
    """The registry model on `device`, each parameter with a random gradient of scale 1e-3."""
    torch.manual_seed(0)
    size, classes = (224, 1000) if name in IMAGENET_MODELS else (32, 10)
    model = build_model(name, num_classes=classes, in_channels=3, image_size=size).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    return model


def optimizer_rows(device: torch.device) -> list[Row]:
    """Every row the device can run; the two baselines first."""
    rows = [Row("SGD(fused)", lambda gs: torch.optim.SGD(gs, lr=0.1, momentum=0.9, fused=True)),
            Row("AdamW(fused)", lambda gs: torch.optim.AdamW(gs, lr=1e-3, fused=True), adam_like=True),
            Row("SGD(foreach)", lambda gs: torch.optim.SGD(gs, lr=0.1, momentum=0.9, foreach=True)),
            Row("AdamW(foreach)", lambda gs: torch.optim.AdamW(gs, lr=1e-3, foreach=True), adam_like=True),
            Row("largebatch MomentumSGD", lambda gs: MomentumSGD(gs, lr=0.1, momentum=0.9))]
    for impl in ("foreach", "compiled", "fused"):
        rows.append(Row(f"LARS {impl}", lambda gs, impl=impl: LARS(gs, lr=0.1, momentum=0.9, impl=impl),
                        cpu_only=impl == "fused"))
    for impl in ("foreach", "compiled", "fused"):
        rows.append(Row(f"LAMB {impl}", lambda gs, impl=impl: LAMB(gs, lr=1e-3, impl=impl), adam_like=True,
                        cpu_only=impl == "fused"))
    rows.append(Row("per-parameter loop LARS", lambda gs: LoopLARS(gs, lr=0.1)))
    try:
        from timm.optim import Lamb, Lars
    except ImportError:
        pass
    else:
        rows += [Row("timm Lars", lambda gs: Lars(gs, lr=0.1, momentum=0.9)),
                 Row("timm Lamb", lambda gs: Lamb(gs, lr=1e-3), adam_like=True)]
    return [row for row in rows if device.type == "cpu" or not row.cpu_only]


def measure(rows: list[Row], model: nn.Module, steps: int, device: torch.device) -> list[OptimRow]:
    """Each row's first step, then `steps` timed rounds of one step per row after WARMUP_ROUNDS."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)

    def timed_step(optimizer: torch.optim.Optimizer) -> float:
        sync()
        start = time.perf_counter()
        optimizer.step()
        sync()
        return time.perf_counter() - start

    optimizers, first = [], []
    for row in rows:
        optimizers.append(row.make(param_groups(model, 1e-4, exclude_bn_bias=True)))
        first.append(timed_step(optimizers[-1]))
    times: list[list[float]] = [[] for _ in rows]
    for _ in range(WARMUP_ROUNDS + steps):
        for optimizer, row_times in zip(optimizers, times):
            row_times.append(timed_step(optimizer))
    medians = [1000 * statistics.median(t[WARMUP_ROUNDS:]) for t in times]
    sgd, adamw = medians[0], medians[1]
    return [OptimRow(row.name, ms, first_s, ms / sgd, ms / adamw if row.adam_like else None)
            for row, ms, first_s in zip(rows, medians, first)]


class LoopLARS(torch.optim.Optimizer):
    """LARS as most hand-written versions are: a Python loop over the tensors, two norms (each read
    back to the host) and three ops per tensor."""

    def __init__(self, params, lr: float, momentum: float = 0.9, trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=0.0,
                                      trust_coefficient=trust_coefficient, trust=True))

    @torch.no_grad()
    def step(self) -> None:
        for group in self.param_groups:
            for p in group["params"]:
                g, wd = p.grad, group["weight_decay"]
                w_norm, g_norm = p.norm(), g.norm()
                local = 1.0
                if group["trust"] and w_norm > 0 and g_norm > 0:
                    local = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g.add(p, alpha=wd).mul_(local * group["lr"]))
                p.sub_(buf)
