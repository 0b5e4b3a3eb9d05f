"""The α–β cost of one gradient all-reduce: ring, tree (recursive halving-doubling) and hierarchical.

A message of n bytes over one link costs α + n·β: α is the latency of one step (software and
wire), β the seconds per byte (1 / bandwidth). Two kinds of link: inside a node (NVLink, PCIe,
shared memory) and between nodes (InfiniBand, Ethernet). Each formula is the textbook one when
all workers share one node, and again when each has a node of its own (the tests check both
limits); in between, the conventions below decide which link a step pays for. Torch-free.

Conventions, stated once:

- Workers are numbered node by node, `gpus_per_node` to a node (the last node full: the workers
  are a multiple of it, or fewer than one node).
- `beta_inter` is per *node*: the node's network links together. Where several workers of a node
  send across nodes at once (hierarchical, tree) they share it.
- A step that waits for several hops at once costs the slowest hop (bulk-synchronous), so a ring
  or tree that spans nodes pays `alpha_inter` per step.
- A gradient sent in `buckets` all-reduces pays the latency terms once per bucket and the
  bandwidth terms once in all (the bytes are split over the buckets).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ALGORITHMS = ("ring", "tree", "hierarchical")


@dataclass(frozen=True)
class Network:
    """Latency and bandwidth inside and across nodes, and how many workers share a node.

    Kept apart from the model and batch because the same cluster serves many workloads, and the
    published runs differ mostly here (NVLink vs PCIe, 25 GbE vs 2× InfiniBand EDR).
    """

    alpha_intra: float
    """Seconds per step between two workers of one node."""
    beta_intra: float
    """Seconds per byte over one worker's link to a neighbour in its node."""
    alpha_inter: float
    """Seconds per step between nodes."""
    beta_inter: float
    """Seconds per byte through one node's network links (all of its NICs together)."""
    gpus_per_node: int
    """Workers per node (GPUs, or processes on one host)."""

    def nodes(self, workers: int) -> int:
        """Nodes that `workers` workers fill; raises ValueError unless they fill whole nodes."""
        if workers <= self.gpus_per_node:
            return 1
        if workers % self.gpus_per_node:
            raise ValueError(f"{workers} workers do not fill nodes of {self.gpus_per_node}")
        return workers // self.gpus_per_node

    def crossing_beta(self) -> float:
        """Seconds per byte of a ring that runs through several nodes: its slowest hop (only network
        hops when each node holds one worker)."""
        return self.beta_inter if self.gpus_per_node == 1 else max(self.beta_intra, self.beta_inter)


def _ring(steps_latency: float, per_byte: float, workers: int, nbytes: float, buckets: int) -> float:
    """Ring all-reduce (reduce-scatter then all-gather): 2(p−1) steps, each moving n/p bytes."""
    if workers == 1:
        return 0.0
    return 2 * (workers - 1) * steps_latency * buckets + 2 * (workers - 1) / workers * nbytes * per_byte


def ring_seconds(nbytes: float, workers: int, net: Network, buckets: int = 1) -> float:
    """One ring over all workers: 2(p−1)·α + 2(p−1)/p·n·β (Patarasuk & Yuan 2009).

    Inside one node α, β are the intra-node ones; across nodes every step has an inter-node hop,
    so the step costs alpha_inter and the slower of the two links.
    """
    if net.nodes(workers) == 1:
        return _ring(net.alpha_intra, net.beta_intra, workers, nbytes, buckets)
    return _ring(net.alpha_inter, net.crossing_beta(), workers, nbytes, buckets)


def tree_seconds(nbytes: float, workers: int, net: Network, buckets: int = 1) -> float:
    """Recursive halving (reduce-scatter) then doubling (all-gather), Thakur, Rabenseifner & Gropp
    2005: 2⌈log2 p⌉·α + 2(p−1)/p·n·β, the "tree" of this planner (the algorithm Goyal et al.
    used between servers; NCCL's double binary tree has the same α and β orders).

    Partners at distances below gpus_per_node are in the same node, so the first ⌈log2 g⌉ halving
    steps (carrying n(1 − 1/g) bytes) stay inside it and only n/g·(1 − 1/s) bytes per worker cross
    the network, g workers sharing their node's links: 2(g−1)/g·n·β_intra + 2(s−1)/s·n·β_inter.
    """
    g, s = min(workers, net.gpus_per_node), net.nodes(workers)
    steps = math.ceil(math.log2(g)) * net.alpha_intra + math.ceil(math.log2(s)) * net.alpha_inter
    return 2 * steps * buckets + 2 * (g - 1) / g * nbytes * net.beta_intra + 2 * (s - 1) / s * nbytes * net.beta_inter


def hierarchical_seconds(nbytes: float, workers: int, net: Network, buckets: int = 1, group: int = 0) -> float:
    """Reduce-scatter in groups of X workers, all-reduce among the p/X workers holding the same
    shard (n/X bytes each), all-gather in the groups; every phase a ring.

    X = `group` (all workers if fewer), by default the workers of one node: the classic hierarchical
    all-reduce (intra-node reduce-scatter, inter-node ring among same-local-rank workers, intra-node
    all-gather). A larger X (a multiple of gpus_per_node) is the 2D-torus all-reduce of Mikami et
    al. 2018 on X×Y GPUs: its groups span nodes, so they pay the network's α and β. The g workers of
    a node run their inter-node rings at once and share the node's links: 2(Y−1)/Y·(n/X)·g·β_inter.
    """
    g = min(workers, net.gpus_per_node)
    x = min(group or g, workers)
    if workers % x or x % g:
        raise ValueError(f"hierarchical group {x} must divide {workers} workers and be a multiple of {g} per node")
    inner = (net.alpha_intra, net.beta_intra) if x == g else (net.alpha_inter, net.crossing_beta())
    outer = _ring(net.alpha_inter, g * net.beta_inter, workers // x, nbytes / x, buckets)
    return _ring(inner[0], inner[1], x, nbytes, buckets) + outer


def allreduce_seconds(algorithm: str, nbytes: float, workers: int, net: Network, buckets: int = 1,
                      group: int = 0) -> float:
    """Seconds to all-reduce `nbytes` of gradient over `workers` workers in `buckets` all-reduces."""
    if algorithm == "ring":
        return ring_seconds(nbytes, workers, net, buckets)
    if algorithm == "tree":
        return tree_seconds(nbytes, workers, net, buckets)
    if algorithm == "hierarchical":
        return hierarchical_seconds(nbytes, workers, net, buckets, group)
    raise ValueError(f"unknown all-reduce algorithm {algorithm!r}: expected one of {', '.join(ALGORITHMS)}")
