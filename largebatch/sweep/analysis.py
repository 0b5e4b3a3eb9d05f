"""The numbers a batch-size sweep is read by, from plain values (no files, no torch):

- steps to target (Shallue et al. 2019): the step of the first evaluation at or above the target
  (and its epoch: epochs to target);
- mean and sample standard deviation over seeds;
- the largest batch whose accuracy stays within a tolerance (1 point) of a base (Goyal et al. 2017);
- the scaling efficiency of steps to target between consecutive batches, and the bend: the largest
  batch up to which every doubling keeps a given share (70%) of perfect scaling.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

ACCURACY_TOLERANCE = 0.01
"""How far below the base accuracy a batch may end and still count as matching it (1 point)."""

BEND_EFFICIENCY = 0.7
"""The share of perfect scaling per doubling of the batch that the bend keeps."""


def first_reaching(records: Sequence[Mapping[str, Any]], target: float) -> Mapping[str, Any] | None:
    """The first "epoch" record (a run's evaluations, in order) whose test accuracy is at least
    `target`; None when no evaluation reached it."""
    return next((r for r in records if r["kind"] == "epoch" and r["test_accuracy"] >= target), None)


def steps_to_target(records: Sequence[Mapping[str, Any]], target: float) -> int | None:
    """The step of the first evaluation reaching `target` (None: never); its resolution is the
    evaluation interval."""
    record = first_reaching(records, target)
    return None if record is None else record["step"]


def mean_std(values: Sequence[float]) -> tuple[float, float | None]:
    """The mean and the sample standard deviation (n - 1 in the denominator: the seeds are a sample of
    the seeds there could be); the deviation is None for a single value."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def largest_batch_within(accuracy: Mapping[int, float], base: float,
                         tolerance: float = ACCURACY_TOLERANCE) -> int | None:
    """The largest batch whose accuracy is at least `base - tolerance`; None if there is none."""
    within = [batch for batch, value in accuracy.items() if value >= base - tolerance]
    return max(within, default=None)


@dataclass(frozen=True)
class Efficiency:
    """Steps to target from one batch of the grid to the next: the share of perfect scaling kept.

    `efficiency` is (steps(small) / steps(large)) / (large / small): 1 when the steps fall as fast as
    the batch grows, 1/ratio when they do not fall at all. `per_doubling` is the same share for each
    doubling of a step of several doublings, efficiency ** (1 / log2(large / small)), so that grids
    spaced by x2 and by x4 judge alike. Both are None when a side never reached the target."""

    small: int
    large: int
    steps_small: float | None
    steps_large: float | None

    @property
    def efficiency(self) -> float | None:
        if self.steps_small is None or self.steps_large is None:
            return None
        return (self.steps_small / self.steps_large) / (self.large / self.small)

    @property
    def per_doubling(self) -> float | None:
        if self.efficiency is None:
            return None
        return self.efficiency ** (1 / math.log2(self.large / self.small))


def scaling_efficiencies(steps: Mapping[int, float | None]) -> list[Efficiency]:
    """The efficiency between each pair of consecutive batches of `steps` (batch -> steps to target, or
    None where it was not reached)."""
    batches = sorted(steps)
    return [Efficiency(small, large, steps[small], steps[large]) for small, large in zip(batches, batches[1:])]


def bend(steps: Mapping[int, float | None], threshold: float = BEND_EFFICIENCY) -> int | None:
    """The largest batch up to which every doubling, from the smallest batch on, keeps at least
    `threshold` of perfect scaling (judged per doubling, see `Efficiency`); the smallest batch when
    the first step already falls short; None when the smallest batch never reached the target."""
    batches = sorted(steps)
    if not batches or steps[batches[0]] is None:
        return None
    reached = batches[0]
    for step in scaling_efficiencies(steps):
        if step.per_doubling is None or step.per_doubling < threshold:
            break
        reached = step.large
    return reached
