"""Per-layer trust ratios of a layer-wise optimizer (LARS's local lr, LAMB's trust ratio), logged
as a "trust" record every `run.trust_log_every` steps, by parameter name."""

from __future__ import annotations

import torch

from largebatch.extensions import Extension


class TrustRatioLog(Extension):
    name = "trust_log"

    def __init__(self, every: int):
        self.every = every

    def after_step(self, step: int, applied: bool) -> None:
        done = step + 1
        if done % self.every:
            return
        ratios = self.ctx.optimizer.layer_ratios()
        if ratios:
            names = {p: name for name, p in self.ctx.model.named_parameters()}
            values = torch.stack([r.detach().float() for r in ratios.values()]).tolist()  # one host sync
            self.ctx.log("trust", done, **{names[p]: v for p, v in zip(ratios, values)})
