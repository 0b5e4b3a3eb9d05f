"""What a config implies for one run, computed once: the split of the global batch over the launched
processes, the steps per epoch, and the learning-rate schedule with its peak.

Everything that needs one of these numbers (the trainer, its logging, `largebatch config`, a sweep)
reads it from a `RunPlan` instead of deriving it again. Torch-free.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from largebatch.config import BatchPlan, Config
from largebatch.schedule import LrSchedule, scaled_lr


def peak_lr(cfg: Config) -> float:
    """The learning rate after warmup: base_lr, stated for ref_batch, scaled to the global batch by the rule."""
    o = cfg.optim
    return scaled_lr(o.base_lr, cfg.data.global_batch, o.ref_batch, o.scaling)


def lr_schedule(cfg: Config, steps_per_epoch: int) -> LrSchedule:
    """Warmup from base_lr (Goyal's gradual warmup) or from zero, to `peak_lr(cfg)`, then the decay."""
    s = cfg.schedule
    return LrSchedule(
        peak_lr=peak_lr(cfg), steps_per_epoch=steps_per_epoch, total_epochs=s.epochs,
        warmup_epochs=s.warmup_epochs, warmup_mode=s.warmup_mode,
        warmup_start_lr=cfg.optim.base_lr if s.warmup_from == "base_lr" else 0.0, decay=s.decay,
        milestones=tuple(s.milestones), gamma=s.gamma, poly_power=s.poly_power, final_lr=s.final_lr)


@dataclass(frozen=True)
class RunPlan:
    """The derived numbers of one run at a given world size and training-set size."""

    batches: BatchPlan
    steps_per_epoch: int
    schedule: LrSchedule

    @property
    def peak_lr(self) -> float:
        return self.schedule.peak_lr

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    @property
    def total_epochs(self) -> int:
        """Epochs the loop enters (the last one may be partial when schedule.epochs is fractional)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def epoch_at(self, step: int) -> float:
        """The fractional epoch position after `step` optimizer steps."""
        return step / self.steps_per_epoch

    def epoch_end(self, epoch: int) -> int:
        """The step count at which epoch `epoch` (0-based) ends, capped at the run's end."""
        return min(self.total_steps, (epoch + 1) * self.steps_per_epoch)
