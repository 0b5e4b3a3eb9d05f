"""DDP communication hooks chosen in the config (`dist.comm_hook`): gradients sent in fp16 or bf16
instead of fp32 (Yamazaki et al. 2019 sent fp16), with torch's own compression hooks doing the work.
Each hook counts the bytes it hands to the all-reduce, so the saving is measured, not assumed.
"""

# No `from __future__ import annotations`: DDP checks the hook's annotations as objects.

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

COMM_HOOKS = ("none", "fp16", "bf16")
_COMPRESS = {"fp16": (default_hooks.fp16_compress_hook, torch.float16),
             "bf16": (default_hooks.bf16_compress_hook, torch.bfloat16)}


@dataclass
class CommStats:
    """Bytes this rank handed to gradient all-reduces since it was created (the wire dtype's size)."""

    process_group: dist.ProcessGroup | None = None
    bytes_sent: int = 0
    buckets: int = 0
    wire_dtype: torch.dtype = field(default=torch.float32)


def register_comm_hook(ddp_model: torch.nn.parallel.DistributedDataParallel, name: str) -> CommStats | None:
    """Register the hook `name` ("none" keeps DDP's own fp32 all-reduce and registers nothing)."""
    if name not in COMM_HOOKS:
        raise ValueError(f"comm_hook = {name!r} is not allowed; choose one of {', '.join(map(repr, COMM_HOOKS))}")
    if name == "none":
        return None
    compress, wire_dtype = _COMPRESS[name]
    stats = CommStats(wire_dtype=wire_dtype)

    def counted(state: CommStats, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        state.bytes_sent += bucket.buffer().numel() * torch.tensor([], dtype=state.wire_dtype).element_size()
        state.buckets += 1
        return compress(state.process_group, bucket)

    ddp_model.register_comm_hook(stats, counted)
    return stats
