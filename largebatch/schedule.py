"""Learning-rate scaling rules and the per-iteration warmup + decay schedule of Goyal et al. (2017).

The schedule is a pure function of the global optimizer step, so resuming a run only needs the step
counter: there is no scheduler state to save. Everything is plain Python floats; torch is not imported.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_MODES = ("gradual", "constant", "none")
DECAYS = ("step", "cosine", "poly", "none")


def _check_choice(field: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{field} = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}")


def _check_number(field: str, value: float, condition: bool, allowed: str) -> None:
    if not condition or not math.isfinite(value):
        raise ValueError(f"{field} = {value!r} is not allowed; it must be {allowed}")


def scaled_lr(base_lr: float, global_batch: int, ref_batch: int, rule: str) -> float:
    """The learning rate for `global_batch`, given `base_lr` tuned for `ref_batch`.

    "linear" is Goyal's linear scaling rule (eta = 0.1 * kn / 256 for ResNet-50): base_lr * global / ref.
    "sqrt" keeps the gradient-noise variance constant instead (Krizhevsky 2014; Hoffer et al. 2017):
    base_lr * sqrt(global / ref). "none" returns base_lr unchanged.
    """
    _check_choice("rule", rule, SCALING_RULES)
    _check_number("base_lr", base_lr, base_lr >= 0, ">= 0")
    _check_number("global_batch", global_batch, global_batch >= 1, "an integer >= 1")
    _check_number("ref_batch", ref_batch, ref_batch >= 1, "an integer >= 1")
    ratio = global_batch / ref_batch
    if rule == "linear":
        return base_lr * ratio
    if rule == "sqrt":
        return base_lr * math.sqrt(ratio)
    return base_lr


@dataclass(frozen=True)
class LrSchedule:
    """The learning rate for each optimizer step: warmup, then decay from `peak_lr`.

    Calling the schedule with a 0-based optimizer step returns the lr to use for that step. The lr
    changes every iteration, not every epoch (Goyal et al. 2017, section 2.2 and 5.1): the epoch
    position is the fraction e = step / steps_per_epoch. With w = warmup_epochs (taken as 0 when
    warmup_mode is "none") and s = warmup_start_lr (None means 0.0):

    Warmup, for e < w:
      "gradual"   lr = s + (peak_lr - s) * e / w, a linear ramp reaching peak_lr at e = w
                  (Goyal's gradual warmup passes s = the reference-batch lr eta, ramping to k * eta);
      "constant"  lr = s throughout warmup, then a jump to peak_lr (Goyal's constant warmup); s must
                  be given and > 0, since a constant warmup at lr 0 would silently not train.

    Decay, for e >= w, with t = (e - w) / (total_epochs - w) clipped to [0, 1] (t = 1 if w = total):
      "step"      lr = peak_lr * gamma ** (number of milestones <= e); milestones are absolute epochs
                  (Goyal: 30, 60, 80 with gamma 0.1) and are ignored by the other decays;
      "cosine"    lr = final_lr + (peak_lr - final_lr) * (1 + cos(pi * t)) / 2;
      "poly"      lr = final_lr + (peak_lr - final_lr) * (1 - t) ** poly_power (LARS recipes: power 2);
      "none"      lr = peak_lr.

    Steps past total_epochs are allowed: "cosine" and "poly" stay at final_lr, "step" keeps its last
    value. Invalid fields raise ValueError naming the field, the value and what is allowed.
    """

    peak_lr: float
    steps_per_epoch: int
    total_epochs: float
    warmup_epochs: float = 0.0
    warmup_mode: str = "gradual"
    warmup_start_lr: float | None = None
    decay: str = "step"
    milestones: tuple[float, ...] = ()
    gamma: float = 0.1
    poly_power: float = 2.0
    final_lr: float = 0.0

    def __post_init__(self) -> None:
        _check_number("peak_lr", self.peak_lr, self.peak_lr >= 0, ">= 0")
        spe = self.steps_per_epoch
        if isinstance(spe, bool) or not isinstance(spe, int) or spe < 1:
            raise ValueError(f"steps_per_epoch = {spe!r} is not allowed; it must be an integer >= 1")
        _check_number("total_epochs", self.total_epochs, self.total_epochs > 0, "> 0")
        _check_number("warmup_epochs", self.warmup_epochs, 0 <= self.warmup_epochs <= self.total_epochs,
                      f">= 0 and <= total_epochs = {self.total_epochs}")
        _check_choice("warmup_mode", self.warmup_mode, WARMUP_MODES)
        if self.warmup_start_lr is not None:
            _check_number("warmup_start_lr", self.warmup_start_lr, self.warmup_start_lr >= 0, ">= 0 or None")
        if self.warmup_mode == "constant" and self.warmup_epochs > 0 and not self.warmup_start_lr:
            raise ValueError(f"warmup_start_lr = {self.warmup_start_lr!r} is not allowed with warmup_mode = 'constant':"
                             " the whole warmup would run at lr 0; give the constant warmup lr (Goyal: the "
                             "reference-batch lr)")
        _check_choice("decay", self.decay, DECAYS)
        if self.decay == "step":
            object.__setattr__(self, "milestones", tuple(float(m) for m in self.milestones))
            ms = self.milestones
            if any(not math.isfinite(m) or m < 0 for m in ms) or any(a >= b for a, b in zip(ms, ms[1:])):
                raise ValueError(f"milestones = {list(ms)} is not allowed; they must be finite epochs >= 0, "
                                 "strictly increasing")
        _check_number("gamma", self.gamma, 0 < self.gamma <= 1, "in (0, 1]")
        _check_number("poly_power", self.poly_power, self.poly_power > 0, "> 0")
        _check_number("final_lr", self.final_lr, self.final_lr >= 0, ">= 0")

    @property
    def total_steps(self) -> int:
        """Optimizer steps in the whole run, ceil(total_epochs * steps_per_epoch) (rounded to 9 decimals first, so
        that 16.6 epochs of 15 steps are 249 steps, not 250)."""
        return math.ceil(round(self.total_epochs * self.steps_per_epoch, 9))

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"step = {step!r} is not allowed; it must be >= 0")
        return self.at_epoch(step / self.steps_per_epoch)

    def at_epoch(self, e: float) -> float:
        """The lr at the fractional epoch position `e` (for runs whose steps per epoch change: a batch ramp)."""
        w = 0.0 if self.warmup_mode == "none" else self.warmup_epochs
        if e < w:
            start = 0.0 if self.warmup_start_lr is None else self.warmup_start_lr
            if self.warmup_mode == "constant":
                return start
            return start + (self.peak_lr - start) * e / w
        if self.decay == "step":
            return self.peak_lr * self.gamma ** sum(1 for m in self.milestones if m <= e)
        if self.decay == "none":
            return self.peak_lr
        span = self.total_epochs - w
        t = min(1.0, (e - w) / span) if span > 0 else 1.0
        if self.decay == "cosine":
            return self.final_lr + (self.peak_lr - self.final_lr) * (1 + math.cos(math.pi * t)) / 2
        return self.final_lr + (self.peak_lr - self.final_lr) * (1 - t) ** self.poly_power
