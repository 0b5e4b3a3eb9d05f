"""Exact distributed evaluation: every test sample is counted once, whatever the world size.

Each rank scores its own contiguous shard (no padding duplicates), then loss sums, correct counts
and sample counts are summed over ranks in float64, so the accuracy equals a single-process one.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import torch
from torch import nn

from largebatch import build
from largebatch.config import Config
from largebatch.data import collate_batch
from largebatch.data.sampler import EvalBatchSampler
from largebatch.dist import DistEnv, all_reduce_sum, init_distributed, shutdown
from largebatch.precision import autocast_factory


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    samples: int


def eval_loader(dataset, batch_size: int, env: DistEnv, workers: int) -> torch.utils.data.DataLoader:
    sampler = EvalBatchSampler(len(dataset), batch_size, env.rank, env.world_size)
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch,
                                       num_workers=workers, pin_memory=env.device.type == "cuda",
                                       generator=torch.Generator())  # leaves the global RNG to augmentation


@torch.no_grad()
def evaluate(model: nn.Module, loader, env: DistEnv, autocast: Callable[[], AbstractContextManager],
             place: Callable[[torch.Tensor, torch.Tensor], tuple]) -> EvalResult:
    """Mean cross-entropy and top-1 accuracy of `model` (in eval mode) over the whole test set."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=env.device)  # loss sum, correct, samples
    for batch in loader:
        x, y = place(*batch)
        with autocast():
            logits = model(x)
        totals[0] += nn.functional.cross_entropy(logits.float(), y, reduction="sum").double()
        totals[1] += (logits.argmax(dim=1) == y).sum()
        totals[2] += y.numel()
    all_reduce_sum(totals, env)
    model.train(was_training)
    loss_sum, correct, samples = totals.tolist()
    return EvalResult(loss_sum / samples, correct / samples, int(samples))


def evaluate_checkpoint(cfg: Config, model_state: dict) -> EvalResult | None:
    """Score saved model weights on the test set (exact over however many ranks run this); rank 0 gets the result."""
    env = init_distributed(cfg.dist)
    try:
        splits = build.build_data(cfg)
        model = build.build_network(cfg, splits, env.device)
        model.load_state_dict(model_state)
        loader = eval_loader(splits.test, cfg.data.eval_batch, env, cfg.data.workers)
        result = evaluate(model, loader, env, autocast_factory(cfg.run.precision, env.device),
                          build.data_placement(cfg, splits, env.device))
        return result if env.is_main else None
    finally:
        shutdown(env)
