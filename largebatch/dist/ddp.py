"""Applying data parallelism to a model from outside it (the model code knows nothing of this).

Every rank builds the model from the same seed (Yamazaki et al. 2019), so DDP's initial broadcast
is replaced by a cheap check that all ranks really hold the same weights.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from largebatch.config import DistConfig
from largebatch.dist.comm_hooks import register_comm_hook
from largebatch.dist.env import DistEnv, all_gather_objects
from largebatch.fingerprint import fingerprints


def check_same_init(model: nn.Module, env: DistEnv) -> None:
    """Raise if ranks did not build identical models (e.g. a seed that depends on the rank)."""
    prints = all_gather_objects(fingerprints((*model.parameters(), *model.buffers())), env)
    differing = [rank for rank, p in enumerate(prints) if p != prints[0]]
    if differing:
        raise RuntimeError(f"ranks {differing} built a model different from rank 0's: every rank must "
                           "initialise the model from the same seed")


def bucket_caps_mb(cfg: DistConfig) -> list[float]:
    """DDP's per-bucket caps in MiB: the first bucket (the gradients ready first, whose all-reduce
    can then start early) at most `dist.first_bucket_cap_mb`, every later one `dist.bucket_cap_mb`.

    DDP's documented `bucket_cap_mb` caps all buckets alike: torch's own 1 MiB first bucket
    (`torch.distributed._DEFAULT_FIRST_BUCKET_BYTES`) applies only while `bucket_cap_mb` is None, with
    the 25 MiB default cap. Its constructor keyword `bucket_cap_mb_list` (torch 2.11 to 2.14, not in
    its docstring) caps bucket i by entry i and every later bucket by the last entry, both when DDP
    first buckets the parameters and when it rebuilds the buckets in gradient-ready order after the
    first step; its largest entry is the bucket cap. The first cap is also held to `bucket_cap_mb`,
    as DDP holds its own first bucket to an explicit `bucket_cap_mb`.
    """
    return [min(cfg.first_bucket_cap_mb, cfg.bucket_cap_mb), cfg.bucket_cap_mb]


def buffer_sync(every_forward: bool) -> dict[str, bool]:
    """DDP's keyword for sending rank 0's buffers (BN statistics) at every forward: torch 2.14 renamed
    `broadcast_buffers` to `forward_sync_buffers` and warns on the old name, which 2.11 alone has. With
    init_sync=False neither syncs at construction (the same-seed check stands for that)."""
    new_name = "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
    return {"forward_sync_buffers" if new_name else "broadcast_buffers": every_forward}


def wrap_model(model: nn.Module, env: DistEnv, cfg: DistConfig) -> nn.Module:
    """DDP around `model` when there is more than one process, with the configured communication hook
    (its byte counts as `comm_stats`); the model itself otherwise."""
    if not env.distributed:
        return model
    check_same_init(model, env)
    ddp_model = DistributedDataParallel(
        model,
        device_ids=[env.device.index] if env.device.type == "cuda" else None,
        bucket_cap_mb_list=bucket_caps_mb(cfg),
        init_sync=False,
        **buffer_sync(cfg.broadcast_buffers),
    )
    ddp_model.comm_stats = register_comm_hook(ddp_model, cfg.comm_hook, env.local_world_size)
    return ddp_model
