"""End-to-end runs under the real torchrun: two processes on one node, two single-process "nodes" on
127.0.0.1 joined through torchrun's c10d rendezvous, and a rank killed mid-epoch that torchrun restarts."""

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from largebatch.checkpoint import load_checkpoint
from multiproc import REPO, base_env, free_port, run_python, run_ranks
from test_distributed import parameters, train_argv

QUICK = ["--recipe", "fmnist_goyal", "--data.source", "synthetic", "--data.synthetic_shape", "1,16,16", "--data.synthetic_train", "256",
         "--data.synthetic_test", "64", "--data.global_batch", "64", "--data.bn_batch", "16",
         "--schedule.epochs", "2", "--schedule.warmup_epochs", "1", "--schedule.decay", "cosine",
         "--run.progress", "false"]


def torchrun(*args: str) -> list[str]:
    exe = shutil.which("torchrun")
    return [exe, *args] if exe else [sys.executable, "-m", "torch.distributed.run", *args]


def plan_record(run_dir):
    with open(run_dir / "metrics.jsonl") as f:
        return next(r for r in map(json.loads, f) if r["kind"] == "plan")


def test_torchrun_two_processes(tmp_path):
    cmd = torchrun("--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "largebatch", "train", *QUICK,
                   "--run.out_dir", str(tmp_path), "--run.name", "tr")
    result = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "final test accuracy" in result.stdout and f"run directory: {tmp_path / 'tr'}" in result.stdout
    plan = plan_record(tmp_path / "tr")
    assert (plan["world_size"], plan["per_worker"]) == (2, 32)
    assert (tmp_path / "tr" / "checkpoint.pt").is_file()


def test_torchrun_two_nodes_on_loopback(tmp_path):
    port = str(free_port())
    nodes = [subprocess.Popen(
        torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--master-addr", "127.0.0.1",
                 "--master-port", port, "-m", "largebatch", "train", *QUICK, "--run.out_dir", str(tmp_path),
                 "--run.name", "nodes"),
        env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = []
    try:
        for node in nodes:
            outputs.append(node.communicate(timeout=240)[0])
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    assert "final test accuracy" in outputs[0]
    assert plan_record(tmp_path / "nodes")["world_size"] == 2


def test_two_slurm_nodes_on_loopback_with_the_hierarchical_hook_match_one_node_and_one_process(tmp_path):
    """examples/slurm/node.sh, the line train.sbatch runs on each node, started twice as Slurm would on
    2 nodes x 2 processes on 127.0.0.1 (c10d rendezvous), trains with the hierarchical all-reduce; its
    float64 parameters equal a single-node 4-process run with the flat all-reduce (BN statistics too) and
    a 1-process run with the whole global batch."""
    args = [*train_argv(tmp_path, "nodes", 24, 6, 3)[3:], "--dist.comm_hook", "hierarchical"]
    slurm = {"SLURM_NNODES": "2", "SLURM_JOB_ID": f"test-{free_port()}", "HEAD_NODE": "127.0.0.1",
             "GPUS_PER_NODE": "2", "RDZV_PORT": str(free_port()), "MAX_RESTARTS": "0",
             "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    nodes = [subprocess.Popen(["bash", str(REPO / "examples" / "slurm" / "node.sh"), *args], env=base_env() | slurm,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outputs = [node.communicate(timeout=300)[0] for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                node.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(outputs)
    assert plan_record(tmp_path / "nodes")["world_size"] == 4
    with open(tmp_path / "nodes" / "metrics.jsonl") as f:
        train = [r for r in map(json.loads, f) if r["kind"] == "train"]
    assert train and all(r["inter_node_bytes_per_step"] * 2 == r["comm_bytes_per_step"] > 0 for r in train), train
    run_ranks(train_argv(tmp_path, "flat", 24, 6, 3), 4)
    run_python(train_argv(tmp_path, "single", 24, 6, 3))
    nodes, flat = (load_checkpoint(tmp_path / n / "checkpoint.pt")["model"] for n in ("nodes", "flat"))
    assert all(torch.allclose(nodes[k], flat[k], rtol=1e-12, atol=1e-14) for k in flat)
    single = parameters(tmp_path / "single")  # BN running statistics are rank 0's under DDP: parameters only
    assert all(torch.allclose(nodes[k], single[k], rtol=1e-10, atol=1e-12) for k in single)


FAULT_JOB = str(REPO / "tests" / "fault_job.py")
FAULT_RUN = ["--data.source", "synthetic", "--data.synthetic_shape", "1,16,16", "--data.synthetic_train", "256",
             "--data.synthetic_test", "64", "--data.global_batch", "32", "--data.bn_batch", "8",
             "--data.augment", "flip", "--schedule.epochs", "2", "--schedule.warmup_epochs", "1",
             "--schedule.decay", "cosine", "--run.progress", "false", "--run.log_every", "1",
             "--run.checkpoint_every", "3"]


def fault_job(tmp_path, name, *extra):
    cmd = torchrun("--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
                   "--master-port", str(free_port()), FAULT_JOB, *FAULT_RUN, "--run.out_dir", str(tmp_path),
                   "--run.name", name, *extra)
    result = subprocess.run(cmd, env=base_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return result


def test_a_killed_rank_restarts_and_resumes_to_the_same_result(tmp_path):
    """2 ranks under torchrun --max-restarts 1; rank 1 is SIGKILLed mid-epoch at a random step. The run
    restarts by itself from the newest checkpoint and ends bitwise equal to an uninterrupted run, with
    each step recorded once."""
    kill_step = random.Random().choice([4, 5, 7, 10, 11, 13, 14])  # 8 steps an epoch, checkpoints every 3
    fault_job(tmp_path, "straight")
    restarted = fault_job(tmp_path, "killed", "--fault", "kill", "1", str(kill_step))
    assert "exitcode: -9" in restarted.stderr  # the rank really died by SIGKILL, and the job still succeeded
    said = re.search(r"largebatch: restarted by torchrun after: rank 1 \(pid \d+ on \S+\) died: its process ended "
                     r"without recording an error.*; rank 0 stopped after step (\d+); .*resumed from (\S+)",
                     restarted.stderr)
    assert said and int(said.group(1)) >= kill_step - 1, restarted.stderr
    straight, killed = (load_checkpoint(tmp_path / n / "checkpoint.pt") for n in ("straight", "killed"))
    for key, tensor in straight["model"].items():
        assert torch.equal(tensor, killed["model"][key]), (kill_step, key)
    records = [json.loads(line) for line in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 17)), kill_step
    assert [r["epoch"] for r in records if r["kind"] == "epoch"] == [1, 2]
    restart = [r for r in records if r["kind"] == "restart"]
    assert len(restart) == 1 and restart[0]["cause"].startswith("rank 1 ")
    assert restart[0]["resumed_from"] == said.group(2)
