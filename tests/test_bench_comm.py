"""The first gradient bucket (`dist.first_bucket_cap_mb`) and `largebatch bench comm`.

The bucket tests look at the buckets DDP really builds in a 2-process gloo job: this file run as a
script is one rank of it (`python tests/test_bench_comm.py OUT_DIR`), wrapping a model the way
training does and recording, with a comm hook, each bucket's bytes on the third step (DDP rebuilds
its buckets in gradient-ready order after the first).
"""

# No `from __future__ import annotations`: DDP checks the recording hook's annotations as objects.

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

from largebatch.bench.comm_timing import ddp_bucket_bytes
from largebatch.cli import main
from largebatch.config import DistConfig
from largebatch.dist import init_distributed, shutdown, wrap_model
from multiproc import run_python, run_ranks

LAYER_BYTES = (256 * 256 + 256) * 4  # one Linear(256, 256) of the job's model: 0.25 MiB and 1 KiB
# (first_bucket_cap_mb, bucket_cap_mb) -> the buckets DDP must build for six such layers, in all-reduce order
# (a bucket closes at the tensor that takes it to its cap).
EXPECTED = {(1.0, 25.0): [4 * LAYER_BYTES, 2 * LAYER_BYTES],  # torch's default first bucket
            (0.25, 25.0): [LAYER_BYTES, 5 * LAYER_BYTES],  # the last layer alone
            (1.0, 0.25): [LAYER_BYTES] * 6}  # the first bucket held to bucket_cap_mb too


def record_bucket(seen: list, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """A comm hook that notes each gradient bucket's bytes, then all-reduces it as DDP would."""
    seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
    return default_hooks.allreduce_hook(None, bucket)


def buckets_on_the_third_step(ddp_model: DistributedDataParallel) -> dict[str, list[int]]:
    """The bucket bytes a recording hook sees on the third step, and those DDP's logger records."""
    seen: list[int] = []
    ddp_model.register_comm_hook(seen, record_bucket)
    torch.manual_seed(1 + dist.get_rank())
    for _ in range(3):
        seen.clear()
        ddp_model(torch.randn(8, 256)).square().mean().backward()
    return {"hook": seen, "logged": list(ddp_bucket_bytes(ddp_model))}


def rank_main(out: str) -> None:
    env = init_distributed(DistConfig())

    def model() -> nn.Module:
        torch.manual_seed(0)
        return nn.Sequential(*[nn.Linear(256, 256) for _ in range(6)])

    built = {f"{first}/{cap}": buckets_on_the_third_step(wrap_model(model(), env, DistConfig(
        bucket_cap_mb=cap, first_bucket_cap_mb=first))) for first, cap in EXPECTED}
    built["torch_default"] = buckets_on_the_third_step(DistributedDataParallel(model()))
    if env.is_main:
        Path(out, "buckets.json").write_text(json.dumps(built))
    dist.barrier()  # no rank tears the group down while another still uses it
    shutdown(env)


def test_the_default_first_bucket_is_torchs():
    assert DistConfig().first_bucket_cap_mb * 2**20 == dist._DEFAULT_FIRST_BUCKET_BYTES


def test_first_bucket_cap_sets_the_buckets_ddp_builds(tmp_path):
    run_ranks([__file__, str(tmp_path)], world_size=2, timeout=120)
    built = json.loads((tmp_path / "buckets.json").read_text())
    for (first, cap), expected in EXPECTED.items():
        assert built[f"{first}/{cap}"] == {"hook": expected, "logged": expected}, (first, cap)
    assert built["torch_default"] == built["1.0/25.0"]  # the defaults build what DDP's own defaults build


TINY = ["--data.source", "synthetic", "--data.synthetic_shape", "1,8,8", "--data.synthetic_train", "64",
        "--data.synthetic_test", "16", "--data.global_batch", "32", "--data.bn_batch", "8"]


def test_bench_comm_prints_the_table_the_best_row_and_json(tmp_path):
    out = tmp_path / "results" / "comm.json"
    result = run_python(["-m", "largebatch", "bench", "comm", *TINY, "--bucket-mb", "0.001,25", "--hooks",
                         "none,fp16", "--warmup", "2", "--repeats", "3", "--json", str(out)], timeout=120)
    record = json.loads(out.read_text())
    rows = {(row["hook"], row["bucket_cap_mb"]): row for row in record["rows"]}
    assert len(record["rows"]) == 4 and set(rows) == {(h, b) for h in ("none", "fp16") for b in (0.001, 25.0)}
    assert record["world_size"] == 2 and record["backend"] == "gloo" and record["threads"] == 1
    for bucket_mb in (0.001, 25.0):
        none, fp16 = rows["none", bucket_mb], rows["fp16", bucket_mb]
        assert none["bytes_per_step"] == sum(none["bucket_bytes"]) == record["gradient_bytes"]
        assert fp16["bytes_per_step"] * 2 == none["bytes_per_step"] and fp16["buckets"] == none["buckets"]
    assert rows["none", 0.001]["buckets"] > 1 == rows["none", 25.0]["buckets"]
    best = min(record["rows"], key=lambda row: row["exposed_ms"])
    assert record["best"] == best
    overrides = f"--dist.bucket_cap_mb {best['bucket_cap_mb']:g} --dist.comm_hook {best['hook']}"
    assert record["best_overrides"] == overrides and f"best: {overrides} (" in result.stdout
    table = [line.split() for line in result.stdout.splitlines() if re.match(r"(none|fp16) ", line)]
    assert sorted((hook, float(mb), int(buckets), float(ms), float(exposed)) for hook, mb, buckets, _, ms, exposed
                  in table) == sorted((row["hook"], row["bucket_cap_mb"], row["buckets"], round(row["step_ms"], 2),
                                       round(row["exposed_ms"], 2)) for row in record["rows"])


def bench_error(argv: list[str], capsys) -> str:
    """The error `largebatch bench comm ARGV` stops with, before any process starts."""
    try:
        code = main(["bench", "comm", *argv])
    except SystemExit as e:  # argparse's own errors
        code = e.code
    assert code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["--bucket-mb", "0,5"], "argument --bucket-mb: '0,5'"),
    (["--bucket-mb", "1,x"], "argument --bucket-mb: '1,x'"),
    (["--hooks", "none,fp8"], "argument --hooks: 'fp8'"),
    (["--hooks", "bf16", "--dist.backend", "gloo", "--dist.device", "cpu"], "--hooks bf16: "),
    (["--warmup", "1"], "argument --warmup: '1'"),
    (["--nproc", "1"], "argument --nproc: '1'"),
    (["--nproc", "3"], "data.global_batch = 1024 does not divide over 3 workers"),
    (["--dist.comm_hook", "fp16"], "--dist.comm_hook: bench comm measures a grid of it; give --hooks"),
    (["--dist.bucket_cap_mb", "5"], "--dist.bucket_cap_mb: bench comm measures a grid of it; give --bucket-mb"),
    (["--dist.first_bucket_cap_mb", "0"], "dist.first_bucket_cap_mb = 0.0: must be > 0"),
])
def test_bad_input_names_the_option(argv, named, capsys):
    assert named in bench_error(argv, capsys)


if __name__ == "__main__":
    rank_main(sys.argv[1])
