"""The gradient noise scale in the training step (`run.noise_scale`): B_simple of McCandlish et al.
2018 from the micro-batch gradients the step computes anyway (`largebatch.gns` has the maths).

Each micro-batch's own gradient (before it is added into `.grad`, before DDP averages anything) is
seen by a tensor hook on every parameter, which adds its squared norm to a running sum: the sum over
the step is Σ_i |g_i|² over this rank's micro-batches. In `on_gradients` the ranks' sums are added up
(one scalar all-reduce) and the squared norm of the averaged gradient is read, so the small batch is
the micro-batch and the big batch the global batch, on any number of ranks. The squared norms stay on
the device; they are folded into the moving averages when a record is logged or the state is saved,
so the estimate costs no host synchronisation per step. Runs first among the extensions: it must see
the gradient before K-FAC or clipping rewrites it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

from largebatch.extensions import Extension, StepContext
from largebatch.gns import NoiseScaleAverage, needs_micro_batches, unbiased_estimates


class NoiseScale(Extension):
    """Logs `gns_b_simple` (tr Σ / |G|² from the averages), `gns_grad_sq` (|G|²) and `gns_trace` (tr Σ)."""

    name = "noise_scale"

    def __init__(self, decay: float):
        self.average = NoiseScaleAverage(decay)
        # per step: mean micro-batch |g|², global |G|², the micro and global batch sizes
        self._pending: list[tuple[torch.Tensor, torch.Tensor, int, int]] = []

    def attach(self, ctx: StepContext) -> None:
        super().attach(ctx)
        for phase in ctx.plan.phases:
            needs_micro_batches(phase.batches.world_size * phase.batches.accum_steps)
        self.params = [p for p in ctx.model.parameters() if p.requires_grad]
        device = self.params[0].device
        # fp64 where the device has it: the micro-batch norms are differenced against the global one.
        self._micro_sq = torch.zeros((), dtype=torch.float64, device=device)
        for p in self.params:
            p.register_hook(self._add_micro_batch)

    def _add_micro_batch(self, grad: torch.Tensor) -> None:
        g = grad.detach()
        self._micro_sq += (g.float() if g.dtype in (torch.float16, torch.bfloat16) else g).pow(2).sum()

    def before_step(self, step: int) -> None:
        self._micro_sq.zero_()

    def on_gradients(self, step: int) -> None:
        b = self.ctx.plan.batches_at(step)
        # Each micro-batch's loss was divided by accum_steps and multiplied by the loss scale.
        unscale = (b.accum_steps / self.ctx.loss_scale()) ** 2
        micro_sq = self.ctx.collectives.all_reduce_sum(self._micro_sq * unscale) / (b.world_size * b.accum_steps)
        grads = [p.grad.detach() for p in self.params if p.grad is not None]
        global_sq = torch.stack([g.double().pow(2).sum() for g in grads]).sum()
        self._pending.append((micro_sq, global_sq, b.micro_batch, b.global_batch))

    def fold(self) -> NoiseScaleAverage:
        """Add the steps measured since the last fold to the averages (non-finite ones, from an fp16
        overflow, are left out) and return them."""
        for micro_sq, global_sq, micro_batch, global_batch in self._pending:
            small, big = micro_sq.item(), global_sq.item()
            if math.isfinite(small) and math.isfinite(big):
                self.average.update(*unbiased_estimates(small, micro_batch, big, global_batch))
        self._pending = []
        return self.average

    def log_values(self) -> dict[str, Any]:
        average = self.fold()
        if average.updates == 0:
            return {}
        return {"gns_b_simple": average.b_simple, "gns_grad_sq": average.mean_grad_sq, "gns_trace": average.mean_trace}

    def state_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.fold())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._pending = []  # the decay is the config's, which a resume may have changed
        self.average = NoiseScaleAverage(self.average.decay, state["grad_sq"], state["trace"], state["updates"])
