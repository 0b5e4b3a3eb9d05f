"""One optimizer step of synchronous data-parallel SGD, with the extension points of `largebatch.extensions`.

A step consumes exactly `global_batch` samples: each of `world_size` workers runs `accum_steps`
micro-batches, each loss is divided by `accum_steps`, and DDP averages over workers, so the applied
gradient is the mean over all kn samples (Goyal et al. §2.1) whatever the split. Gradients
synchronise only on the last micro-batch. The global loss is summed over ranks every step: a
non-finite one skips the update identically on every rank. With `run.loss_sync = "log"` the loss
stays on the device (no host sync in the step) and the trainer checks it for NaN/inf later.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from largebatch.state import RunState


@dataclass(frozen=True)
class StepOutcome:
    lr: float
    loss: float | torch.Tensor  # mean loss over the global batch; a 0-dim device tensor under loss_sync = "log"
    applied: bool  # False when a non-finite loss skipped the update (always True under loss_sync = "log")


class TrainStep:
    """Calls the run's extensions at their points around forward/backward and `optimizer.step`."""

    def __init__(self, state: RunState):
        self.state = state
        self.extensions = tuple(state.extensions)
        self.loss_on_host = state.cfg.run.loss_sync == "step"

    def __call__(self, micro_batches: Iterator, step: int) -> StepOutcome:
        s = self.state
        plan = s.plan.batches_at(step)
        lr = s.plan.lr(step)
        for group in s.optimizer.param_groups:
            group["lr"] = lr
        s.optimizer.zero_grad(set_to_none=True)
        for extension in self.extensions:
            extension.before_step(step)
        # A skipped step must not leave its forward pass in the BN running statistics either.
        buffers = [b for b in s.model.buffers()] if s.cfg.run.on_nonfinite == "skip" else []
        saved_buffers = [b.clone() for b in buffers]

        loss_sum = torch.zeros((), device=s.env.device)
        for i in range(plan.accum_steps):
            x, y = s.place(*next(micro_batches))
            last = i == plan.accum_steps - 1
            sync = contextlib.nullcontext() if last or not s.env.distributed else s.ddp_model.no_sync()
            with sync:
                with s.autocast():
                    micro_loss = s.criterion(s.ddp_model(x), y)
                s.scaler.scale(micro_loss / plan.accum_steps).backward()
            micro_loss = micro_loss.detach()
            loss_sum += micro_loss.float() / plan.accum_steps
            for extension in self.extensions:
                extension.after_backward(step, i, micro_loss)

        global_loss = s.collectives.all_reduce_sum(loss_sum) / s.env.world_size
        if self.loss_on_host:
            global_loss = global_loss.item()
        applied = not self.loss_on_host or math.isfinite(global_loss)
        if applied:
            s.scaler.unscale_(s.optimizer)  # a no-op unless fp16 loss scaling is on
            for extension in self.extensions:
                extension.on_gradients(step)
            s.scaler.step(s.optimizer)  # GradScaler also skips steps whose fp16 gradients overflowed
            s.scaler.update()
        else:
            for buffer, saved in zip(buffers, saved_buffers):
                buffer.copy_(saved)
            if s.scaler.is_enabled():  # lower the loss scale as an fp16 overflow would, or it never recovers
                s.scaler.update(new_scale=s.scaler.get_scale() * s.scaler.get_backoff_factor())
        for extension in self.extensions:
            extension.after_step(step, applied)
        return StepOutcome(lr, global_loss, applied)
