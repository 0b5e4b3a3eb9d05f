"""K-FAC's communication (Osawa et al. 2019): the step's factor sums averaged over the ranks in one
all-reduce that carries only the upper triangle of each symmetric factor, the inverse work shared
out by cost, and each inverse broadcast from the rank that computed it.

The maths (`largebatch.optim.kfac`) hands these functions tensors and gets tensors back; at world
size 1 every function is the identity or trivial, so a single process runs the same code.
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

import torch

from largebatch.dist.env import Collectives


def pack_triangles(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """The upper triangles (diagonal included) of square symmetric matrices, or of batches of them
    (… × d × d), concatenated into one flat tensor: d(d+1)/2 numbers a matrix instead of d²."""
    parts = []
    for m in matrices:
        rows, cols = torch.triu_indices(m.shape[-1], m.shape[-1], device=m.device)
        parts.append(m[..., rows, cols].reshape(-1))
    return torch.cat(parts)


def unpack_triangles(flat: torch.Tensor, like: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The symmetric matrices whose triangles `pack_triangles` packed, shaped as `like`."""
    out, offset = [], 0
    for m in like:
        d = m.shape[-1]
        rows, cols = torch.triu_indices(d, d, device=flat.device)
        batch = m.shape[:-2]
        count = rows.numel() * (batch.numel() if batch else 1)
        tri = flat[offset:offset + count].reshape(*batch, rows.numel())
        offset += count
        full = flat.new_zeros(*batch, d, d)
        full[..., rows, cols] = tri
        full[..., cols, rows] = tri
        out.append(full)
    return out


def average_factors(factors: Sequence[torch.Tensor], collectives: Collectives,
                    wire_dtype: torch.dtype) -> list[torch.Tensor]:
    """Every rank's factors averaged over the ranks (each rank's from the same number of examples, as the
    batch plan makes them, so this is the global mean), travelling as triangles in `wire_dtype` (a
    half type halves the bytes again); returned in the factors' dtype."""
    if collectives.world_size == 1:
        return list(factors)
    flat = collectives.all_reduce_mean(pack_triangles(factors).to(wire_dtype))
    return [m.to(factors[0].dtype) for m in unpack_triangles(flat, factors)]


def assign_owners(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that computes each item: the most expensive first, each to the least loaded rank
    (greedy longest-processing-time; no rank's load exceeds the mean by more than the largest item)."""
    loads = [(0.0, rank) for rank in range(world_size)]
    owners = [0] * len(costs)
    for item in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[item] = rank
        heapq.heappush(loads, (load + costs[item], rank))
    return owners


def share_from_owners(results: Sequence[list[torch.Tensor] | None], shapes: Sequence[list[torch.Size]],
                      owners: Sequence[int], collectives: Collectives, dtype: torch.dtype,
                      device: torch.device) -> list[list[torch.Tensor]]:
    """Every item's tensors on every rank: each rank packs the items it owns (`results[i]`, None where
    another rank owns item i) into one buffer and broadcasts it; the others unpack it by `shapes`."""
    if collectives.world_size == 1:
        return [list(r) for r in results]
    shared: list[list[torch.Tensor]] = [[] for _ in results]
    for rank in range(collectives.world_size):
        items = [i for i, owner in enumerate(owners) if owner == rank]
        if not items:
            continue
        size = sum(s.numel() for i in items for s in shapes[i])
        if rank == collectives.rank:
            buffer = torch.cat([t.reshape(-1).to(dtype) for i in items for t in results[i]])
        else:
            buffer = torch.empty(size, dtype=dtype, device=device)
        collectives.broadcast(buffer, rank)
        offset = 0
        for i in items:
            for shape in shapes[i]:
                shared[i].append(buffer[offset:offset + shape.numel()].reshape(shape))
                offset += shape.numel()
    return shared


class KFACComm:
    """The three exchanges K-FAC's preconditioner needs, over the job's ranks (`Collectives`)."""

    def __init__(self, collectives: Collectives):
        self.collectives = collectives

    @property
    def rank(self) -> int:
        return self.collectives.rank

    def average_factors(self, factors: Sequence[torch.Tensor], wire_dtype: torch.dtype) -> list[torch.Tensor]:
        return average_factors(factors, self.collectives, wire_dtype)

    def owners(self, costs: Sequence[float]) -> list[int]:
        return assign_owners(costs, self.collectives.world_size)

    def share(self, results: Sequence[list[torch.Tensor] | None], shapes: Sequence[list[torch.Size]],
              owners: Sequence[int], dtype: torch.dtype, device: torch.device) -> list[list[torch.Tensor]]:
        return share_from_owners(results, shapes, owners, self.collectives, dtype, device)
