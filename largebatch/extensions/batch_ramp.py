"""A batch ramp driven by the measured gradient noise scale (`schedule.batch_ramp_by_noise_scale`).

McCandlish et al. 2018 find the critical batch near B_simple, and B_simple grows as the loss falls;
Smith et al. 2018 grow the batch instead of decaying the lr. Together: at the end of each epoch,
double the global batch while the doubled batch is still at most the current B_simple estimate (and
at most `schedule.batch_ramp_max`), at most one doubling per epoch. The decision is rank 0's, broadcast,
so every rank trains the same plan; the changes made so far are this extension's checkpointed state,
so a resume rebuilds the same phases.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from largebatch.config import Config
from largebatch.extensions import Extension
from largebatch.extensions.noise_scale import NoiseScale


class NoiseScaleRamp(Extension):
    name = "batch_ramp"

    def __init__(self, cfg: Config, noise_scale: NoiseScale):
        self.cfg = cfg
        self.noise_scale = noise_scale
        self.changes: list[tuple[int, int]] = []  # (epoch, global batch from that epoch on)

    def on_epoch_end(self, epochs_done: int) -> None:
        plan = self.ctx.plan
        if epochs_done >= math.ceil(self.cfg.schedule.epochs):
            return
        current = plan.phase_of_epoch(epochs_done).batches.global_batch
        b_simple = self.noise_scale.fold().b_simple
        doubled = current * 2
        grow = doubled <= self.cfg.schedule.batch_ramp_max and doubled <= b_simple
        device = next(self.ctx.model.parameters()).device
        decision = self.ctx.collectives.broadcast(torch.tensor([doubled if grow else current], device=device), src=0)
        chosen = int(decision.item())
        self.ctx.log("ramp_decision", plan.epoch_start(epochs_done), epoch=epochs_done, b_simple=b_simple,
                     global_batch=current, next_global_batch=chosen)
        if chosen != current:
            plan.grow(self.cfg, epochs_done, chosen)
            self.changes.append((epochs_done, chosen))

    def state_dict(self) -> dict[str, Any]:
        return {"changes": [list(change) for change in self.changes]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for epoch, batch in state["changes"]:
            if (epoch, batch) not in self.changes:
                self.ctx.plan.grow(self.cfg, epoch, batch)
                self.changes.append((epoch, batch))
