"""Timing DDP's gradient communication on the ranks of a job, for `largebatch bench comm`.

At each grid point (a communication hook and a bucket size) every rank wraps a fresh copy of the
model the way training does (`dist.ddp.wrap_model`: the same seed, the config's first bucket, the
hook) and times forward + backward of one micro-batch twice per repeat: as a DDP step, whose
backward pass all-reduces the gradients bucket by bucket, and under `no_sync`, which leaves the
all-reduce out. The difference is the communication that the backward pass does not hide. The ranks
start each timed step together (a barrier), a step lasts as long as its slowest rank, the warm-up
steps let DDP rebuild its buckets in gradient-ready order before any step is timed, each repeat
visits every grid point in turn, and each figure is a median over the repeats.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from largebatch.build import build_data, build_network, input_placement
from largebatch.config import Config, plan_batches
from largebatch.dist import Collectives, DistEnv, init_distributed, shutdown, wrap_model
from largebatch.dist.threads import choose_threads, usable_cores
from largebatch.precision import autocast_factory


@dataclass(frozen=True)
class Grid:
    """What to measure: every hook at every bucket size, `repeats` timed steps after `warmup` steps."""

    hooks: tuple[str, ...]
    buckets_mb: tuple[float, ...]
    warmup: int
    repeats: int


@dataclass(frozen=True)
class CommRow:
    """One grid point: the gradient buckets DDP built (bytes each, in all-reduce order), the bytes a rank
    hands to the all-reduce per step (at the hook's wire dtype), and in ms the medians of a step with
    the all-reduce, of one without it, and of their difference step by step (`exposed_ms`)."""

    hook: str
    bucket_cap_mb: float
    bucket_bytes: tuple[int, ...]
    bytes_per_step: int
    step_ms: float
    no_sync_ms: float
    exposed_ms: float


@dataclass(frozen=True)
class CommResult:
    """The grid's rows and what they were measured on."""

    backend: str
    device: str
    world_size: int
    threads: int
    micro_batch: int
    gradient_bytes: int
    rows: tuple[CommRow, ...]


def ddp_bucket_bytes(ddp_model: nn.Module) -> tuple[int, ...]:
    """The bytes of each gradient bucket DDP all-reduces, in order, as DDP's own logger recorded them
    after rebuilding the buckets in gradient-ready order (recorded from the third step on).
    `_get_ddp_logging_data` is private API (torch 2.11 to 2.14); this is its only use."""
    sizes = ddp_model._get_ddp_logging_data().get("rebuilt_bucket_sizes")
    if not sizes:
        raise RuntimeError("DDP has not recorded its rebuilt gradient buckets (it does from the third step on)")
    return tuple(int(size) for size in sizes.split(","))


def timed(step: Callable[[], None], env: DistEnv) -> float:
    """Seconds `step` takes on this rank, started together with every other rank and finished on the device."""
    dist.barrier()
    start = time.perf_counter()
    step()
    if env.device.type == "cuda":
        torch.cuda.synchronize(env.device)
    return time.perf_counter() - start


@dataclass
class Point:
    """One grid point while it is measured: the model wrapped for it and its training step."""

    hook: str
    bucket_mb: float
    ddp_model: nn.Module
    step: Callable[[], None]

    def row(self, synced_ms: list[float], unsynced_ms: list[float], synced_steps: int) -> CommRow:
        """The point's row from its step times with and without the all-reduce (every rank's slowest)."""
        bucket_bytes = ddp_bucket_bytes(self.ddp_model)
        stats = self.ddp_model.comm_stats  # None for DDP's own all-reduce, which sends its buckets as they are
        sent = stats.bytes_sent // synced_steps if stats is not None else sum(bucket_bytes)
        return CommRow(self.hook, self.bucket_mb, bucket_bytes, sent, statistics.median(synced_ms),
                       statistics.median(unsynced_ms), statistics.median(s - u for s, u in zip(synced_ms, unsynced_ms)))


def measure(cfg: Config, grid: Grid, env: DistEnv) -> CommResult:
    """Every grid point on this rank of a running job, for the model and micro-batch `cfg` trains
    (random inputs of its data's shape); the same result on every rank. Each repeat times every point
    in turn, so that a machine that slows down for a while slows all points alike; the models of all
    points are held at once for that."""
    threads = choose_threads(cfg.run.threads, torch.get_num_threads(), env.local_world_size, usable_cores())
    torch.set_num_threads(threads.threads)
    splits = build_data(cfg, Collectives(env))
    batches = plan_batches(cfg.data, env.world_size)
    generator = torch.Generator().manual_seed(cfg.run.seed)
    side = splits.image_size
    images = torch.randn(batches.micro_batch, splits.in_channels, side, side, generator=generator)
    labels = torch.randint(splits.num_classes, (batches.micro_batch,), generator=generator)
    x, y = input_placement(cfg, env.device)(images, labels)
    autocast = autocast_factory(cfg.run.precision, env.device)
    criterion = nn.CrossEntropyLoss()

    def network() -> nn.Module:
        return build_network(cfg, splits, env.device, batches.ghost_bn_batch)

    def make_point(hook: str, bucket_mb: float) -> Point:
        ddp_model = wrap_model(network(), env, dataclasses.replace(cfg.dist, bucket_cap_mb=bucket_mb, comm_hook=hook))

        def step() -> None:
            ddp_model.zero_grad(set_to_none=True)
            with autocast():
                loss = criterion(ddp_model(x), y)
            loss.backward()

        return Point(hook, bucket_mb, ddp_model, step)

    gradient_bytes = sum(p.numel() * p.element_size() for p in network().parameters() if p.requires_grad)
    points = [make_point(hook, bucket_mb) for hook in grid.hooks for bucket_mb in grid.buckets_mb]
    for point in points:
        for _ in range(grid.warmup):
            point.step()
    times = torch.zeros(len(points), 2, grid.repeats, dtype=torch.float64)
    for i in range(grid.repeats):
        for j, point in enumerate(points):
            times[j, 0, i] = timed(point.step, env)
            with point.ddp_model.no_sync():
                times[j, 1, i] = timed(point.step, env)
    times_ms = (Collectives(env).all_reduce_max(times.to(env.device)).cpu() * 1e3).tolist()
    rows = tuple(point.row(*ms, grid.warmup + grid.repeats) for point, ms in zip(points, times_ms))
    return CommResult(env.backend, str(env.device), env.world_size, threads.threads, batches.micro_batch,
                      gradient_bytes, rows)


def measure_launched(cfg: Config, grid: Grid) -> CommResult:
    """On every rank of a launched job (torchrun's environment): join it, measure, leave it."""
    env = init_distributed(cfg.dist)
    try:
        result = measure(cfg, grid, env)
        dist.barrier()  # no rank leaves the job while another still uses it
        return result
    finally:
        shutdown(env)


def measure_spawned(cfg: Config, grid: Grid, nproc: int) -> CommResult:
    """Start `nproc` local processes as one job on the config's backend (gloo on CPU) and measure on
    them; their threads are capped as training caps them (`dist.threads`), so that they share the cores."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.pickle"
        torch.multiprocessing.spawn(_spawned_rank, args=(nproc, port, cfg, grid, out), nprocs=nproc)
        return pickle.loads(out.read_bytes())


def _spawned_rank(rank: int, nproc: int, port: int, cfg: Config, grid: Grid, out: Path) -> None:
    """One spawned process: the environment torchrun would give rank `rank`, the measurement, and on
    rank 0 the result written to `out`."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    result = measure_launched(cfg, grid)
    if rank == 0:
        out.write_bytes(pickle.dumps(result))
