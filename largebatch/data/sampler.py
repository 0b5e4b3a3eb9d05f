"""Samplers for synchronous data parallelism with the global batch as the unit.

Training draws ONE permutation of the whole dataset per epoch from (seed, epoch), identical on every
rank (Goyal et al. §2.3: shuffle once globally, not per worker), cuts it into global batches, drops
the remainder so that every optimizer step sees exactly `global_batch` samples, and gives rank r the
r-th contiguous slice of each global batch, split further into micro-batches. With this layout a
single process holding the whole global batch sees the same samples in the same order, so the same
ghost-BN groups: k workers and one process are comparable sample for sample.

Evaluation instead counts each test sample exactly once across ranks, without the padding
duplicates of torch's DistributedSampler.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from largebatch.config import BatchPlan
from largebatch.errors import DatasetError


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global order of an epoch: a pure function of (seed, epoch), the same on every rank."""
    generator = torch.Generator()
    generator.manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(num_samples, generator=generator)


class GlobalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Yields this rank's micro-batches of index lists; state is (seed, epoch, step).

    One epoch has `steps_per_epoch` optimizer steps of `plan.accum_steps` micro-batches each.
    `set_epoch(epoch, start_step)` positions the sampler, which is all a resume needs.
    """

    def __init__(self, num_samples: int, plan: BatchPlan, rank: int, seed: int):
        if not 0 <= rank < plan.world_size:
            raise ValueError(f"rank {rank} is outside world size {plan.world_size}")
        if num_samples < plan.global_batch:
            raise DatasetError(f"the training set has {num_samples} samples, fewer than one global batch "
                             f"of {plan.global_batch}: lower data.global_batch")
        self.num_samples = num_samples
        self.plan = plan
        self.rank = rank
        self.seed = seed
        self.epoch = 0
        self.start_step = 0

    @property
    def steps_per_epoch(self) -> int:
        return self.num_samples // self.plan.global_batch

    def set_epoch(self, epoch: int, start_step: int = 0, plan: BatchPlan | None = None) -> None:
        """Position the sampler at step `start_step` of `epoch`, with the epoch's split of the global batch
        when it changes (a batch ramp)."""
        if plan is not None:
            if self.num_samples < plan.global_batch:
                raise DatasetError(f"the training set has {self.num_samples} samples, fewer than one global batch of "
                                   f"{plan.global_batch}")
            self.plan = plan
        if not 0 <= start_step <= self.steps_per_epoch:
            raise ValueError(f"start_step {start_step} outside 0..{self.steps_per_epoch}")
        self.epoch, self.start_step = epoch, start_step

    def state_dict(self) -> dict[str, int]:
        return {"seed": self.seed, "epoch": self.epoch, "start_step": self.start_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.seed = int(state["seed"])
        self.set_epoch(int(state["epoch"]), int(state["start_step"]))

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.plan.accum_steps

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.plan
        order = epoch_permutation(self.num_samples, self.seed, self.epoch)
        for step in range(self.start_step, self.steps_per_epoch):
            start = step * plan.global_batch + self.rank * plan.per_worker
            mine = order[start:start + plan.per_worker]
            for micro in mine.split(plan.micro_batch):
                yield micro.tolist()


def eval_shard(num_samples: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of the test set; shares are disjoint and cover every sample once."""
    return range(rank * num_samples // world_size, (rank + 1) * num_samples // world_size)


class EvalBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Batches of this rank's evaluation shard, in order; the last batch may be short."""

    def __init__(self, num_samples: int, batch_size: int, rank: int, world_size: int):
        self.indices = eval_shard(num_samples, rank, world_size)
        self.batch_size = batch_size

    def __len__(self) -> int:
        return -(-len(self.indices) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        for start in range(0, len(self.indices), self.batch_size):
            yield list(self.indices[start:start + self.batch_size])
