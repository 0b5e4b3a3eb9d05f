"""The process group: who this process is (from torchrun's environment), which device it drives,
and the few collectives the trainer needs. Every function also works at world size 1 with no
process group, so single-process runs take the same code path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from largebatch.config import DistConfig


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str | None  # None when running as a single process without a process group
    store: dist.Store | None = field(default=None, compare=False, repr=False)  # this attempt's key space

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def _pick_device(cfg: DistConfig, local_rank: int) -> torch.device:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    if not want_cuda:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("dist.device = 'cuda' but no CUDA device is visible")
    device = torch.device("cuda", local_rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def init_distributed(cfg: DistConfig, timeout_s: float = 600.0) -> DistEnv:
    """Join torchrun's process group (NCCL on GPU, gloo on CPU) or set up a single process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    device = _pick_device(cfg, local_rank)
    backend, store = None, None
    if world_size > 1:
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if device.type == "cuda" else "gloo")
        if not dist.is_initialized():
            timeout = timedelta(seconds=timeout_s)
            store = _attempt_store(rank, world_size, timeout)
            dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    return DistEnv(rank, world_size, local_rank, local_world_size, device, backend, store)


def _attempt_store(rank: int, world_size: int, timeout: timedelta) -> dist.Store:
    """torchrun's store with this attempt's own key space. After a restart (torchrun --max-restarts)
    the agent's store still holds the dead attempt's keys, among them the ranks' gloo addresses; a
    restarted rank that read one of those would try to connect to a process that no longer exists."""
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    return dist.PrefixStore(attempt_prefix(int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))), store)


def attempt_prefix(attempt: int) -> str:
    """The store keys of torchrun's attempt number `attempt` (0 first, 1 after the first restart)."""
    return f"largebatch/attempt_{attempt}"


def shutdown(env: DistEnv) -> None:
    if env.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """Sum `tensor` over ranks in place (a no-op for one process) and return it."""
    if env.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_objects(obj: Any, env: DistEnv) -> list[Any]:
    """Every rank's `obj`, indexed by rank, on every rank."""
    if not env.distributed:
        return [obj]
    gathered: list[Any] = [None] * env.world_size
    dist.all_gather_object(gathered, obj)
    return gathered


@dataclass(frozen=True)
class Collectives:
    """The collectives a step extension is handed: over all ranks of the job, and the identity at
    world size 1, so an extension's maths never imports torch.distributed and runs unchanged alone."""

    env: DistEnv

    @property
    def rank(self) -> int:
        return self.env.rank

    @property
    def world_size(self) -> int:
        return self.env.world_size

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over ranks in place and return it."""
        return all_reduce_sum(tensor, self.env)

    def all_reduce_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """Elementwise maximum of `tensor` over ranks, in place, returned."""
        if self.env.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def all_reduce_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """Average `tensor` over ranks in place and return it."""
        return all_reduce_sum(tensor, self.env).div_(self.env.world_size)

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's picklable `obj`, indexed by rank."""
        return all_gather_objects(obj, self.env)

    def broadcast(self, tensor: torch.Tensor, src: int) -> torch.Tensor:
        """Rank `src`'s `tensor`, copied in place into every rank's, returned."""
        if self.env.distributed:
            dist.broadcast(tensor, src)
        return tensor
