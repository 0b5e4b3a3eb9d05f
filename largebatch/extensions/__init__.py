"""Step extensions: code that joins the training step at named points without editing the loop.

An extension subclasses `Extension` and overrides the points it needs; every point defaults to
doing nothing. In one optimizer step (`largebatch.step.TrainStep`) they are called in this order,
for every extension in the order they were given:

    before_step(step)                      the lr is set, gradients are zeroed
    per micro-batch: forward, backward,    module hooks an extension registered in `attach` fire here
      after_backward(step, micro, loss)    loss: this micro-batch's mean loss (detached)
    (the global loss is summed over ranks; a non-finite one skips the rest, but for after_step)
    gradients are now the mean over the global batch, and unscaled when fp16 loss scaling is on
    on_gradients(step)                     read or rewrite p.grad: clipping, preconditioning, noise scale
    optimizer.step()
    after_step(step, applied)              applied: False when a non-finite loss skipped the update
and at the end of each epoch, after its evaluation and before its checkpoint:
    on_epoch_end(epochs_done)              e.g. a batch ramp deciding the next epoch's batch

`log_values()` is merged into each "train" record of metrics.jsonl (and TensorBoard), once per
logging window. `attach(ctx)` is called once, before training or restoring, with a `StepContext`:
the unwrapped model, the optimizer, the run's plan, the collectives (`ctx.collectives`, the
identity at world size 1: extensions never import torch.distributed) and a `log` function.

An extension that defines `state_dict()` and `load_state_dict(state)` is saved in the run's
checkpoint under its `name` and restored on resume, with no edit of the checkpoint code. Its state
is taken from rank 0, so it should be the same on every rank (reduce with the collectives first).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from largebatch.dist.env import Collectives
from largebatch.plan import RunPlan


@dataclass(frozen=True)
class StepContext:
    """What an extension may use: the model without its DDP wrapper, the optimizer, the plan of the
    run, collectives over the job's ranks, `log(kind, step, **values)` (rank 0 writes) and the loss
    scale the gradients carry until the step unscales them."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    plan: RunPlan
    collectives: Collectives
    log: Callable[..., None]
    loss_scale: Callable[[], float] = lambda: 1.0  # the fp16 GradScaler's current scale (1 without one)


class Extension:
    """Base class of step extensions (see the module docstring for the order of the points)."""

    name = "extension"  # the key of its state in the checkpoint; unique among a run's extensions

    def attach(self, ctx: StepContext) -> None:
        self.ctx = ctx

    def before_step(self, step: int) -> None:
        pass

    def after_backward(self, step: int, micro_batch: int, loss: torch.Tensor) -> None:
        pass

    def on_gradients(self, step: int) -> None:
        pass

    def after_step(self, step: int, applied: bool) -> None:
        pass

    def on_epoch_end(self, epochs_done: int) -> None:
        pass

    def log_values(self) -> dict[str, Any]:
        return {}


def is_stateful(part: Any) -> bool:
    return callable(getattr(part, "state_dict", None)) and callable(getattr(part, "load_state_dict", None))


__all__ = ["Extension", "StepContext", "is_stateful"]
