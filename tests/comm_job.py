"""One rank of a gloo job that all-reduces the same gradients through each communication hook:
`python tests/comm_job.py OUT_DIR`. Rank 0 writes, per hook, the bytes its hook handed to the
all-reduce and the largest relative error of the averaged gradient against an fp32 all-reduce."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from largebatch.dist.comm_hooks import register_comm_hook


def averaged_gradients(hook: str, rank: int) -> tuple[list[torch.Tensor], int | None]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    ddp = DistributedDataParallel(model, bucket_cap_mb=0.01)  # several buckets
    stats = register_comm_hook(ddp, hook)
    torch.manual_seed(1 + rank)  # each rank its own data
    ddp(torch.randn(32, 64)).square().mean().backward()
    return [p.grad.clone() for p in model.parameters()], stats.bytes_sent if stats else None


def main(out: str) -> None:
    dist.init_process_group("gloo")
    reference, _ = averaged_gradients("none", dist.get_rank())
    grads, sent = averaged_gradients("fp16", dist.get_rank())
    error = max(((g - r).norm() / r.norm()).item() for g, r in zip(grads, reference))
    numel = sum(r.numel() for r in reference)
    if dist.get_rank() == 0:
        with open(f"{out}/comm.json", "w") as f:
            json.dump({"fp16_bytes": sent, "fp32_bytes": numel * 4, "fp16_error": error}, f)
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
