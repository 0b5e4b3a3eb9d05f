"""One rank of a gloo job that averages the same float64 gradients through each communication hook:
`python tests/comm_job.py OUT_DIR LOCAL_WORLD_SIZE` (the ranks split into nodes of LOCAL_WORLD_SIZE,
as torchrun numbers them). Rank 0 writes, per hook, the bytes its hook sent (in all, and across
nodes) and the largest relative error of the averaged gradient against the exact mean of every
rank's own gradient, computed here without DDP."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largebatch.dist.comm_hooks import COMM_HOOKS, register_comm_hook


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    # 64*127 + 127 + 127*10 + 10 parameters: an odd count, so the hierarchical shards need padding
    return torch.nn.Sequential(torch.nn.Linear(64, 127), torch.nn.ReLU(), torch.nn.Linear(127, 10)).double()


def batch(rank: int) -> torch.Tensor:
    return torch.randn(32, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1 + rank))


def own_gradients(rank: int) -> list[torch.Tensor]:
    net = model()
    net(batch(rank)).square().mean().backward()
    return [p.grad for p in net.parameters()]


def averaged_gradients(hook: str, rank: int, local_world_size: int) -> tuple[list[torch.Tensor], dict]:
    net = model()
    ddp = DistributedDataParallel(net, bucket_cap_mb=0.01)  # several buckets
    stats = register_comm_hook(ddp, hook, local_world_size)
    ddp(batch(rank)).square().mean().backward()
    sent = {"bytes": stats.bytes_sent, "inter_node_bytes": stats.inter_node_bytes} if stats else {}
    return [p.grad.clone() for p in net.parameters()], sent


def main(out: str, local_world_size: int) -> None:
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    exact = [torch.stack(g).mean(0) for g in zip(*(own_gradients(r) for r in range(world_size)))]
    result = {"numel": sum(g.numel() for g in exact)}
    for hook in (h for h in COMM_HOOKS if not h.endswith("bf16")):  # gloo cannot all-reduce bfloat16
        grads, sent = averaged_gradients(hook, rank, local_world_size)
        error = max(((g - e).norm() / e.norm()).item() for g, e in zip(grads, exact))
        result[hook] = {"error": error, **sent}
    if rank == 0:
        with open(f"{out}/comm.json", "w") as f:
            json.dump(result, f)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
