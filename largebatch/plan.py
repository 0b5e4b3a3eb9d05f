"""What a config implies for one run, computed once: the split of the global batch over the launched
processes, the steps per epoch, and the learning-rate schedule with its peak.

Everything that needs one of these numbers (the trainer, its logging, `largebatch config`, a sweep)
reads it from a `RunPlan` instead of deriving it again. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from largebatch.config import BatchPlan, Config, ConfigError, plan_batches
from largebatch.errors import DatasetError
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
class Phase:
    """Epochs trained at one global batch: from `start_epoch` (at step `start_step`) on, `steps_per_epoch`
    steps of `batches`, the lr of the schedule times `lr_factor`."""

    start_epoch: int
    start_step: int
    batches: BatchPlan
    steps_per_epoch: int
    lr_factor: float = 1.0


def phase_batches(cfg: Config, world_size: int) -> tuple[BatchPlan, ...]:
    """The split of each phase's global batch over `world_size` workers: data.global_batch, then each batch of
    the ramp; a batch that does not split is a ConfigError naming its field."""
    plans = [plan_batches(cfg.data, world_size)]
    for i, batch in enumerate(cfg.schedule.batch_ramp_batches):
        try:
            plans.append(plan_batches(dataclasses.replace(cfg.data, global_batch=batch), world_size))
        except ConfigError as e:
            raise ConfigError(f"schedule.batch_ramp_batches[{i}] = {batch}: {e}") from None
    return tuple(plans)


def run_phases(cfg: Config, world_size: int, train_samples: int) -> tuple[Phase, ...]:
    """The run's batch phases: one, or with a batch ramp (`schedule.batch_ramp_epochs`/`_batches`, Smith et al.
    2018) one more at each epoch where the global batch grows. Each phase's batch is split as
    `plan_batches` splits data.global_batch; with `batch_ramp_lr = "scale"` each phase's lr follows the
    scaling rule for its batch, with "keep" the schedule's lr carries on unchanged (the growth replaces a decay)."""
    s, o = cfg.schedule, cfg.optim
    all_batches = phase_batches(cfg, world_size)
    first = all_batches[0]
    phases, start_step = [], 0
    starts = (0, *s.batch_ramp_epochs)
    for i, (epoch, batches) in enumerate(zip(starts, all_batches)):
        batch = batches.global_batch
        steps_per_epoch = train_samples // batch
        if steps_per_epoch < 1:
            field = "data.global_batch" if i == 0 else f"schedule.batch_ramp_batches[{i - 1}]"
            raise DatasetError(f"the training set has {train_samples} samples, fewer than one global batch of {batch} "
                               f"({field})")
        factor = 1.0 if s.batch_ramp_lr == "keep" else (scaled_lr(o.base_lr, batch, o.ref_batch, o.scaling)
                                                        / scaled_lr(o.base_lr, first.global_batch, o.ref_batch,
                                                                    o.scaling))
        if i:
            start_step += (epoch - starts[i - 1]) * phases[-1].steps_per_epoch
        phases.append(Phase(epoch, start_step, batches, steps_per_epoch, factor))
    return tuple(phases)


@dataclass(frozen=True)
class RunPlan:
    """The derived numbers of one run at a given world size and training-set size: its batch phases (one
    without a batch ramp) and the lr schedule, whose warmup and decay are in epochs."""

    phases: tuple[Phase, ...]
    schedule: LrSchedule

    @classmethod
    def build(cls, cfg: Config, world_size: int, train_samples: int) -> RunPlan:
        phases = run_phases(cfg, world_size, train_samples)
        return cls(phases, lr_schedule(cfg, phases[0].steps_per_epoch))

    @property
    def batches(self) -> BatchPlan:
        """The first phase's split of the global batch (the only one without a batch ramp)."""
        return self.phases[0].batches

    @property
    def steps_per_epoch(self) -> int:
        return self.phases[0].steps_per_epoch

    @property
    def ghost_bn_batch(self) -> int:
        """The ghost-BN group size the model needs: bn_batch if any phase takes BN over groups smaller than
        its micro-batch, else 0."""
        return max(p.batches.ghost_bn_batch for p in self.phases)

    @property
    def peak_lr(self) -> float:
        return self.schedule.peak_lr

    def phase_of_epoch(self, epoch: int) -> Phase:
        return next(p for p in reversed(self.phases) if p.start_epoch <= epoch)

    def phase_at(self, step: int) -> Phase:
        """The phase that step `step` (0-based) belongs to."""
        return next(p for p in reversed(self.phases) if p.start_step <= step)

    def batches_at(self, step: int) -> BatchPlan:
        return self.phase_at(step).batches

    def epoch_start(self, epoch: int) -> int:
        """The step count at which epoch `epoch` (0-based) starts."""
        phase = self.phase_of_epoch(epoch)
        return phase.start_step + (epoch - phase.start_epoch) * phase.steps_per_epoch

    def epoch_at(self, step: int) -> float:
        """The fractional epoch position after `step` optimizer steps."""
        phase = self.phase_at(step)
        return phase.start_epoch + (step - phase.start_step) / phase.steps_per_epoch

    @property
    def total_steps(self) -> int:
        """Steps up to schedule.epochs (a fractional last epoch rounded up to whole steps)."""
        total = self.schedule.total_epochs
        whole = math.floor(total)
        phase = self.phase_of_epoch(whole)
        return self.epoch_start(whole) + math.ceil(round((total - whole) * phase.steps_per_epoch, 9))

    @property
    def total_epochs(self) -> int:
        """Epochs the loop enters (the last one may be partial when schedule.epochs is fractional)."""
        return math.ceil(self.schedule.total_epochs)

    def epoch_end(self, epoch: int) -> int:
        """The step count at which epoch `epoch` (0-based) ends, capped at the run's end."""
        return min(self.total_steps, self.epoch_start(epoch + 1))

    def lr(self, step: int) -> float:
        """The lr of step `step` (0-based): the schedule at that step's epoch position, times its phase's factor."""
        return self.schedule.at_epoch(self.epoch_at(step)) * self.phase_at(step).lr_factor
