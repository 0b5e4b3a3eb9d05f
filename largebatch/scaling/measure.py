"""`largebatch plan --measure`: the planner's inputs measured on this machine.

- Compute per image: forward and backward of a `largebatch.models` model on random inputs at the
  per-worker batch, a few warm-up iterations, then the median of timed ones, with torch's intra-op
  threads set as asked (on a shared CPU, threads per process decide the speed).
- α and β of gloo on this host: two local processes (torch.multiprocessing) time all-reduces of
  several sizes; a least-squares fit of the two-worker ring, t = 2α + n·β, gives α and β.

The only module of `largebatch.scaling` that imports torch.
"""

from __future__ import annotations

import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from largebatch.models import build_model

LINK_SIZES = (1 << 10, 1 << 14, 1 << 17, 1 << 20, 1 << 22)
"""float32 elements per timed all-reduce: 4 KiB to 16 MiB, latency- to bandwidth-bound."""


@dataclass(frozen=True)
class ComputeTime:
    """Measured forward+backward time per image at one batch, and the backward share of it."""

    image_seconds: float
    backward_fraction: float
    batch: int
    threads: int


@dataclass(frozen=True)
class LinkFit:
    """α (seconds per step) and β (seconds per byte) of a ring fitted to timed all-reduces."""

    alpha: float
    beta: float
    workers: int
    points: tuple[tuple[int, float], ...]
    """(bytes, median seconds) of each timed size."""


def count_parameters(model_name: str, input_shape: Sequence[int], classes: int) -> int:
    model = build_model(model_name, num_classes=classes, in_channels=input_shape[0], image_size=input_shape[1])
    return sum(p.numel() for p in model.parameters())


def measure_compute(model_name: str, batch: int, input_shape: Sequence[int], classes: int, threads: int | None = None,
                    warmup: int = 2, iterations: int = 5) -> ComputeTime:
    """Median forward and backward times of `model_name` on a random batch, per image."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = build_model(model_name, num_classes=classes, in_channels=input_shape[0], image_size=input_shape[1])
        model.train()
        x, y = torch.randn(batch, *input_shape), torch.randint(classes, (batch,))
        criterion = nn.CrossEntropyLoss()
        forward, backward = [], []
        for i in range(warmup + iterations):
            model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            loss = criterion(model(x), y)
            middle = time.perf_counter()
            loss.backward()
            end = time.perf_counter()
            if i >= warmup:
                forward.append(middle - start)
                backward.append(end - middle)
        f, b = statistics.median(forward), statistics.median(backward)
        return ComputeTime(image_seconds=(f + b) / batch, backward_fraction=b / (f + b), batch=batch,
                           threads=torch.get_num_threads())
    finally:
        torch.set_num_threads(previous)


def fit_ring(points: Sequence[tuple[int, float]], workers: int) -> LinkFit:
    """α, β of the ring model t = 2(p−1)·α + 2(p−1)/p·n·β fitted to (bytes, seconds) points.

    Least squares on the relative error (weights 1/t²), so that the small, latency-bound sizes fix α
    as much as the large ones fix β. On a noisy machine the intercept can come out below zero; α is
    then 0 (no latency resolvable).
    """
    w = [1 / t**2 for _, t in points]
    s, sx, sy = sum(w), sum(wi * n for wi, (n, _) in zip(w, points)), sum(wi * t for wi, (_, t) in zip(w, points))
    sxx = sum(wi * n * n for wi, (n, _) in zip(w, points))
    sxy = sum(wi * n * t for wi, (n, t) in zip(w, points))
    slope = (s * sxy - sx * sy) / (s * sxx - sx * sx)
    intercept = (sy - slope * sx) / s
    steps = 2 * (workers - 1)
    return LinkFit(alpha=max(intercept / steps, 0.0), beta=slope * workers / steps, workers=workers,
                   points=tuple(points))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _time_allreduces(rank: int, world: int, port: int, sizes: Sequence[int], repeats: int, queue) -> None:
    """One process of the link measurement: median seconds of each size's all-reduce, rank 0 reports."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        results = []
        for size in sizes:
            tensor = torch.ones(size)
            for _ in range(2):
                dist.all_reduce(tensor)
            times = []
            for _ in range(repeats):
                dist.barrier()
                start = time.perf_counter()
                for _ in range(5):
                    dist.all_reduce(tensor)
                times.append((time.perf_counter() - start) / 5)
            results.append((4 * size, statistics.median(times)))
        if rank == 0:
            queue.put(results)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def measure_link(workers: int = 2, sizes: Sequence[int] = LINK_SIZES, repeats: int = 5) -> LinkFit:
    """Fit α and β of gloo between `workers` local processes, one thread each."""
    queue = mp.get_context("spawn").SimpleQueue()
    mp.spawn(_time_allreduces, args=(workers, _free_port(), tuple(sizes), repeats, queue), nprocs=workers, join=True)
    return fit_ring(queue.get(), workers)
