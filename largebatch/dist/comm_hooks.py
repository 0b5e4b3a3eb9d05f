"""DDP communication hooks chosen in the config (`dist.comm_hook`): gradients sent in fp16 or bf16
instead of fp32 (Yamazaki et al. 2019 sent fp16), with torch's own compression hooks doing the work,
and a hierarchical all-reduce (Goyal et al. 2017: reduce inside a server, all-reduce across servers,
send back), alone or with fp16/bf16 on the wire. Each hook counts the bytes it hands to collectives,
so the saving is measured, not assumed.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

COMM_HOOKS = ("none", "fp16", "bf16", "hierarchical", "hierarchical_fp16", "hierarchical_bf16")
_WIRE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_COMPRESS = {"fp16": default_hooks.fp16_compress_hook, "bf16": default_hooks.bf16_compress_hook}


@dataclass
class CommStats:
    """What this rank's hook sent since it was registered: `bytes_sent` is the gradient buckets at the
    wire dtype's size (the same measure for every hook), `inter_node_bytes` what of it went to
    collectives that span nodes (all of it for a flat all-reduce, 1/local_world_size hierarchically)."""

    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    inter_node_bytes: int = 0
    buckets: int = 0
    wire_dtype: torch.dtype | None = None  # None: the gradients' own dtype


@dataclass
class NodeGroups:
    """The sub-groups of a hierarchical all-reduce: this rank's node, and the ranks of every node with
    the same local rank. Ranks are numbered node by node, as torchrun numbers them."""

    intra: dist.ProcessGroup
    inter: dist.ProcessGroup
    local_world_size: int
    nodes: int

    @classmethod
    def create(cls, world_size: int, local_world_size: int) -> "NodeGroups":
        """Make the groups (a collective call: every rank of the job makes them together)."""
        if local_world_size < 1 or world_size % local_world_size:
            raise ValueError(f"a hierarchical all-reduce needs the same number of processes on every node: "
                             f"{world_size} processes do not split into nodes of {local_world_size}")
        g, nodes = local_world_size, world_size // local_world_size
        intra, _ = dist.new_subgroups_by_enumeration([list(range(n * g, (n + 1) * g)) for n in range(nodes)])
        inter, _ = dist.new_subgroups_by_enumeration([list(range(local, world_size, g)) for local in range(g)])
        return cls(intra, inter, g, nodes)


@dataclass
class HierarchicalState(CommStats):
    groups: NodeGroups | None = None
    world_size: int = 1


def hierarchical_hook(state: HierarchicalState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Average one bucket over all ranks in three steps: a reduce-scatter inside the node leaves each
    local rank the node's sum of 1/g of the bucket; the ranks with the same local rank all-reduce that
    shard across nodes; an all-gather inside the node puts the shards back together. Only 1/g of the
    bucket crosses the slow network per rank."""
    groups, buffer = state.groups, bucket.buffer()
    wire = buffer.to(state.wire_dtype or buffer.dtype).div_(state.world_size)  # a copy when the dtype differs
    pad = -wire.numel() % groups.local_world_size
    flat = F.pad(wire, (0, pad)) if pad else wire
    shard = flat.new_empty(flat.numel() // groups.local_world_size)
    element = flat.element_size()
    state.bytes_sent += wire.numel() * element
    state.inter_node_bytes += shard.numel() * element if groups.nodes > 1 else 0
    state.buckets += 1

    def across_nodes(_: torch.futures.Future) -> torch.Tensor:
        if groups.nodes > 1:
            _future_of(dist.all_reduce(shard, group=groups.inter, async_op=True)).wait()
        return shard

    def gather(_: torch.futures.Future) -> torch.Tensor:
        _future_of(dist.all_gather_into_tensor(flat, shard, group=groups.intra, async_op=True)).wait()
        if flat.data_ptr() != buffer.data_ptr():
            buffer.copy_(flat[:buffer.numel()])
        return buffer

    scattered = _future_of(dist.reduce_scatter_tensor(shard, flat, group=groups.intra, async_op=True))
    return scattered.then(across_nodes).then(gather)


def _future_of(work: dist.Work) -> torch.futures.Future:
    """The collective's future (NCCL has one for every collective), or, where the backend has none for
    it (gloo's reduce-scatter), a completed one after waiting for the collective here."""
    try:
        return work.get_future()
    except RuntimeError:
        work.wait()
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(None)
        return done


def register_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, name: str,
                       local_world_size: int | None = None) -> CommStats | None:
    """Register the hook `name` ("none" keeps DDP's own fp32 all-reduce and registers nothing).
    `local_world_size` (processes per node) lays out the nodes of the hierarchical hooks; the flat
    hooks count all their bytes as crossing nodes."""
    if name not in COMM_HOOKS:
        raise ValueError(f"comm_hook = {name!r} is not allowed; choose one of {', '.join(map(repr, COMM_HOOKS))}")
    if name == "none":
        return None
    hierarchical, _, wire = name.partition("_") if name.startswith("hierarchical") else ("", "", name)
    wire_dtype = _WIRE_DTYPES.get(wire)
    if hierarchical:
        world_size = dist.get_world_size()
        groups = NodeGroups.create(world_size, local_world_size or world_size)
        state = HierarchicalState(wire_dtype=wire_dtype, groups=groups, world_size=world_size)
        ddp_model.register_comm_hook(state, hierarchical_hook)
        return state
    stats = CommStats(wire_dtype=wire_dtype)

    def counted(state: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        size = bucket.buffer().numel() * torch.tensor([], dtype=state.wire_dtype).element_size()
        state.bytes_sent += size
        state.inter_node_bytes += size
        state.buckets += 1
        return _COMPRESS[wire](state.process_group, bucket)

    ddp_model.register_comm_hook(stats, counted)
    return stats
