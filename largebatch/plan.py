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


def noise_ramp_batches(cfg: Config) -> tuple[int, ...]:
    """The batches a ramp driven by the noise scale may grow to: data.global_batch doubled up to
    schedule.batch_ramp_max (none without that ramp)."""
    if not cfg.schedule.batch_ramp_by_noise_scale:
        return ()
    batches = [cfg.data.global_batch * 2]
    while batches[-1] < cfg.schedule.batch_ramp_max:
        batches.append(batches[-1] * 2)
    return tuple(batches)


def phase_batches(cfg: Config, world_size: int) -> tuple[BatchPlan, ...]:
    """The split over `world_size` workers of every global batch the run may train: data.global_batch, then
    each batch of the ramp (fixed, or those the noise scale may choose); a batch that does not split is a
    ConfigError naming its field."""
    plans = [plan_batches(cfg.data, world_size)]
    for i, batch in enumerate(noise_ramp_batches(cfg) or cfg.schedule.batch_ramp_batches):
        try:
            plans.append(plan_batches(dataclasses.replace(cfg.data, global_batch=batch), world_size))
        except ConfigError as e:
            raise ConfigError(f"schedule.batch_ramp_batches[{i}] = {batch}: {e}") from None
    return tuple(plans)


def _phase(cfg: Config, epoch: int, start_step: int, batches: BatchPlan, train_samples: int, first_batch: int,
           field: str) -> Phase:
    """The phase that trains `batches` from `epoch` on; its lr factor follows `schedule.batch_ramp_lr`."""
    o = cfg.optim
    steps_per_epoch = train_samples // batches.global_batch
    if steps_per_epoch < 1:
        raise DatasetError(f"the training set has {train_samples} samples, fewer than one global batch of "
                           f"{batches.global_batch} ({field})")
    factor = 1.0
    if cfg.schedule.batch_ramp_lr == "scale":
        rate = lambda batch: scaled_lr(o.base_lr, batch, o.ref_batch, o.scaling)  # noqa: E731
        factor = rate(batches.global_batch) / rate(first_batch)
    return Phase(epoch, start_step, batches, steps_per_epoch, factor)


@dataclass
class RunPlan:
    """The derived numbers of one run at a given world size and training-set size: its batch phases (one
    without a batch ramp) and the lr schedule, whose warmup and decay are in epochs.

    The phases of a fixed ramp (`schedule.batch_ramp_epochs`/`_batches`, Smith et al. 2018) are known from
    the config; a ramp driven by the noise scale adds them while training (`grow`), so the plan is the
    one object every part reads them from."""

    phases: tuple[Phase, ...]
    schedule: LrSchedule
    train_samples: int
    ghost_bn_batch: int  # BN group size when any batch the run may train has groups smaller than its micro-batch

    @classmethod
    def build(cls, cfg: Config, world_size: int, train_samples: int) -> RunPlan:
        """One phase per global batch of the config: data.global_batch, then each of the fixed ramp's. Each
        phase's batch is split as `plan_batches` splits data.global_batch; with `batch_ramp_lr = "scale"` each
        phase's lr follows the scaling rule for its batch, with "keep" the schedule's lr carries on (the
        growth replaces a decay)."""
        all_batches = phase_batches(cfg, world_size)
        first = all_batches[0].global_batch
        phases = [_phase(cfg, 0, 0, all_batches[0], train_samples, first, "data.global_batch")]
        for i, (epoch, batches) in enumerate(zip(cfg.schedule.batch_ramp_epochs, all_batches[1:])):
            start_step = phases[-1].start_step + (epoch - phases[-1].start_epoch) * phases[-1].steps_per_epoch
            phases.append(_phase(cfg, epoch, start_step, batches, train_samples, first,
                                 f"schedule.batch_ramp_batches[{i}]"))
        return cls(tuple(phases), lr_schedule(cfg, phases[0].steps_per_epoch), train_samples,
                   max(b.ghost_bn_batch for b in all_batches))

    def grow(self, cfg: Config, epoch: int, global_batch: int) -> Phase:
        """Train `global_batch` from `epoch` on (after the last phase): add and return its phase."""
        if epoch <= self.phases[-1].start_epoch:
            raise ValueError(f"a new phase must start after epoch {self.phases[-1].start_epoch}, not at {epoch}")
        batches = plan_batches(dataclasses.replace(cfg.data, global_batch=global_batch), self.batches.world_size)
        phase = _phase(cfg, epoch, self.epoch_start(epoch), batches, self.train_samples, self.batches.global_batch,
                       "the batch ramp")
        self.phases = (*self.phases, phase)
        return phase

    @property
    def batches(self) -> BatchPlan:
        """The first phase's split of the global batch (the only one without a batch ramp)."""
        return self.phases[0].batches

    @property
    def steps_per_epoch(self) -> int:
        return self.phases[0].steps_per_epoch

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
