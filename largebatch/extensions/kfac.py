"""K-FAC in the training step: the preconditioner's hooks capture the statistics of the steps that
update factors, and `on_gradients` (after DDP's average, before the optimizer) updates factors and
inverses when due and preconditions the gradients. Its factors and inverses are checkpointed."""

from __future__ import annotations

import sys
from typing import Any

import torch

from largebatch.config import KFACConfig
from largebatch.dist.kfac_comm import KFACComm
from largebatch.extensions import Extension, StepContext
from largebatch.optim.kfac import KFACOptions, KFACPreconditioner

_DTYPES = {"auto": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
           "fp64": torch.float64}


def kfac_options(cfg: KFACConfig) -> KFACOptions:
    return KFACOptions(damping=cfg.damping, damping_mode=cfg.damping_mode, decay=cfg.decay,
                       factor_every=cfg.factor_every, inverse_every=cfg.inverse_every,
                       every_milestones=cfg.every_milestones, kl_clip=cfg.kl_clip,
                       factor_dtype=_DTYPES[cfg.factor_dtype], inverse_method=cfg.inverse,
                       inverse_dtype=_DTYPES[cfg.inverse_dtype], batchnorm=cfg.batchnorm)


class KFAC(Extension):
    name = "kfac"

    def __init__(self, options: KFACOptions):
        self.options = options

    def attach(self, ctx: StepContext) -> None:
        super().attach(ctx)
        self.preconditioner = KFACPreconditioner(ctx.model, self.options, KFACComm(ctx.collectives))
        if self.preconditioner.left_out and ctx.collectives.rank == 0:
            print(f"largebatch: K-FAC leaves {len(self.preconditioner.left_out)} layer(s) to the plain optimizer "
                  f"(no curvature block for them): {', '.join(self.preconditioner.left_out)}", file=sys.stderr)

    def before_step(self, step: int) -> None:
        batches = self.ctx.plan.batches_at(step)
        # The loss of a micro-batch is its mean, divided by accum_steps and multiplied by the loss scale.
        self.preconditioner.begin_step(step, batches.micro_batch * batches.accum_steps / self.ctx.loss_scale())

    def on_gradients(self, step: int) -> None:
        p = self.preconditioner
        if p.capturing:
            p.update_factors()
        if p.inverse_due(step) or not p.inverses:
            p.update_inverses()
        p.precondition(self.ctx.optimizer.param_groups[0]["lr"])

    def log_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {"kfac_nu": self.preconditioner.last_nu}
        if self.preconditioner.damping_raised:
            values["kfac_damping_raised"] = self.preconditioner.damping_raised
        return values

    def state_dict(self) -> dict[str, Any]:
        return self.preconditioner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.preconditioner.load_state_dict(state)
