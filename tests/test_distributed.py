"""Real multi-process gloo jobs: k workers with accumulation against one process holding the whole
global batch (with each optimizer, with a step extension and gradient clipping, across a resume),
each rank's own random state across a 2-process resume, the same-seed check, and exact evaluation."""

import json
import re
import signal
import time
from pathlib import Path

import pytest
import torch

from largebatch.checkpoint import load_checkpoint
from largebatch.dist.threads import choose_threads, usable_cores
from multiproc import REPO, run_python, run_ranks, start_ranks

EXTENSION_JOB = str(REPO / "tests" / "extension_job.py")
FAULT_JOB = str(REPO / "tests" / "fault_job.py")

# 12x12 synthetic images keep a float64 run of a real model (small_cnn with ghost BN) to seconds.
SYNTHETIC = ["--data.source", "synthetic", "--data.synthetic_shape", "1,12,12", "--data.synthetic_train", "144",
             "--data.synthetic_test", "37", "--data.augment", "none", "--model.name", "small_cnn",
             "--optim.base_lr", "0.05", "--optim.ref_batch", "24", "--schedule.epochs", "2",
             "--schedule.warmup_epochs", "1", "--schedule.decay", "cosine", "--run.precision", "fp64",
             "--run.progress", "false", "--run.log_every", "1"]


# LARS with BN/bias excluded from the trust ratio: a trust coefficient large enough that the
# layer-wise steps move the weights well beyond rounding.
OPTIMIZER_ARGS = {
    "sgd": [],
    "lars": ["--optim.name", "lars", "--optim.exclude_bn_bias", "true", "--optim.lars.trust_coefficient", "0.05",
             "--optim.base_lr", "1.0"],
    "lamb": ["--optim.name", "lamb", "--optim.exclude_bn_bias", "true", "--optim.weight_decay", "0.01"],
}


def run_args(out, name, global_batch, micro_batch, bn_batch, optimizer="sgd"):
    """The fields of a run of fmnist_goyal on SYNTHETIC, as command-line overrides."""
    return [*SYNTHETIC, *OPTIMIZER_ARGS[optimizer], "--data.global_batch", str(global_batch), "--data.micro_batch",
            str(micro_batch), "--data.bn_batch", str(bn_batch), "--run.out_dir", str(out), "--run.name", name]


def train_argv(out, name, global_batch, micro_batch, bn_batch, optimizer="sgd"):
    return ["-m", "largebatch", "train", "--recipe", "fmnist_goyal",
            *run_args(out, name, global_batch, micro_batch, bn_batch, optimizer)]


def parameters(run_dir):
    state = load_checkpoint(run_dir / "checkpoint.pt")["model"]
    return {k: v for k, v in state.items() if "running_" not in k and "num_batches" not in k}


def epoch_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "epoch"]


@pytest.mark.parametrize("world_size, micro_batches, optimizer",
                         [(2, 3, "sgd"), (3, 2, "sgd"), (2, 3, "lars"), (2, 3, "lamb")])
def test_ddp_with_accumulation_equals_one_process_with_the_global_batch(tmp_path, world_size, micro_batches,
                                                                        optimizer):
    global_batch = 6 * micro_batches * world_size  # micro-batches of 6, BN groups of 3; accumulation != world size
    run_ranks(train_argv(tmp_path, "ddp", global_batch, 6, 3, optimizer), world_size)
    run_python(train_argv(tmp_path, "single", global_batch, global_batch, 3, optimizer))
    run_python(train_argv(tmp_path, "other_bn", global_batch, global_batch, 6, optimizer))

    ddp, single, other_bn = (parameters(tmp_path / n) for n in ("ddp", "single", "other_bn"))
    assert ddp.keys() == single.keys()
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
    # The comparison is sensitive: other BN groups or no training at all give other weights.
    assert any(not torch.allclose(other_bn[k], single[k], rtol=1e-6, atol=1e-8) for k in single)
    steps = load_checkpoint(tmp_path / "ddp" / "checkpoint.pt")["progress"]["step"]
    assert steps == 2 * (144 // global_batch)
    assert plan_record(tmp_path / "ddp")["accum_steps"] == micro_batches

    # Evaluation during training counts the 37 test samples once over 2 or 3 ranks (BN running
    # statistics legitimately differ from the single process's, so scores are compared on one
    # checkpoint in the next test).
    assert epoch_records(tmp_path / "ddp")[-1]["test_samples"] == 37


def plan_record(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return next(r for r in map(json.loads, lines) if r["kind"] == "plan")


def extension_argv(out, name, global_batch, micro_batch, *extra):
    return [EXTENSION_JOB, str(out / name), *SYNTHETIC, "--data.global_batch", str(global_batch),
            "--data.micro_batch", str(micro_batch), "--data.bn_batch", "3", "--optim.clip_grad_norm", "0.05", *extra]


def test_step_extension_and_clipping_across_a_two_process_resume_equal_one_process(tmp_path):
    """An extension defined outside the library (tests/extension_job.py) reads micro-batch losses, sums them
    with the collectives it is handed and rewrites the gradients; clipping acts on the averaged gradient.
    2 ranks x 3 micro-batches, interrupted after one epoch and resumed, equal 1 process x 6 micro-batches."""
    run_ranks(extension_argv(tmp_path, "ddp", 36, 6, "--run.stop_after_epochs", "1"), 2)
    run_ranks(extension_argv(tmp_path, "ddp", 36, 6, "--resume"), 2)
    run_python(extension_argv(tmp_path, "single", 36, 6))
    run_python(train_argv(tmp_path, "plain", 36, 6, 3))  # neither extension nor clipping

    ddp, single, plain = (parameters(tmp_path / n) for n in ("ddp", "single", "plain"))
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
    assert any(not torch.allclose(plain[k], single[k], rtol=1e-6, atol=1e-8) for k in single)
    for name in ("ddp", "single"):
        state = load_checkpoint(tmp_path / name / "checkpoint.pt")
        assert state["loss_damping"]["steps"] == 8 and state["loss_damping"]["average"] > 0
        records = [r for r in map(json.loads, (tmp_path / name / "metrics.jsonl").read_text().splitlines())
                   if r["kind"] == "train"]
        assert records and all(r["clipped"] > 0 for r in records)  # clipping was active


def test_two_process_resume_restores_each_ranks_random_state(tmp_path):
    """Flip augmentation draws from each rank's own generator: a resumed 2-rank run equals an uninterrupted
    one bit for bit only if every rank gets its own generator state back."""
    flip = ["--data.augment", "flip"]
    run_ranks([*train_argv(tmp_path, "straight", 24, 6, 3), *flip], 2)
    run_ranks([*train_argv(tmp_path, "split", 24, 6, 3), *flip, "--run.stop_after_epochs", "1"], 2)
    run_ranks(["-m", "largebatch", "train", "--resume", str(tmp_path / "split")], 2)
    straight, split = parameters(tmp_path / "straight"), parameters(tmp_path / "split")
    for key in straight:
        assert torch.equal(straight[key], split[key]), key
    rng = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["rng"]
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])


def test_same_seed_check_catches_a_rank_built_with_another_seed(tmp_path):
    results = run_ranks(train_argv(tmp_path, "seeds", 24, 6, 3), 2, check=False, rank_argv={1: ["--run.seed", "7"]})
    assert all(r.returncode != 0 for r in results)
    assert "ranks [1] built a model different from rank 0's" in results[0].stdout


def test_distributed_eval_command_counts_each_sample_once(tmp_path):
    run_python(train_argv(tmp_path, "run", 24, 24, 3))
    single = run_python(["-m", "largebatch", "eval", str(tmp_path / "run")]).stdout
    multi = run_ranks(["-m", "largebatch", "eval", str(tmp_path / "run")], 3)[0].stdout
    assert "samples 37" in single
    assert single.strip().splitlines()[-1] == multi.strip().splitlines()[-1]


@pytest.mark.parametrize("requested, current, local, cores, threads, says", [
    (0, 2, 1, 2, 2, ""),  # one process keeps torch's default
    (0, 2, 2, 2, 1, "capped from 2 to 1: 2 processes on this node share 2 cores"),
    (0, 16, 3, 16, 5, "capped from 16 to 5"),
    (0, 4, 8, 4, 1, "capped from 4 to 1"),  # more processes than cores: still one thread each
    (0, 1, 3, 2, 1, ""),  # one thread each already (torchrun's OMP_NUM_THREADS=1): nothing to say
    (3, 2, 2, 2, 3, "warning: run.threads = 3 with 2 processes on this node asks for 6 threads on 2 cores"),
    (1, 2, 2, 2, 1, ""),
])
def test_threads_per_process_are_capped_to_the_cores_of_the_node(requested, current, local, cores, threads, says):
    choice = choose_threads(requested, current, local, cores)
    assert choice.threads == threads and (says in choice.note if says else choice.note == "")


def test_two_processes_launched_without_a_thread_limit_are_capped(tmp_path):
    """Ranks started without OMP_NUM_THREADS (torchrun sets it; a hand launch may not) on a node with fewer
    cores than processes x torch's threads run one thread each, and rank 0 says so."""
    cores = usable_cores()
    env = {"OMP_NUM_THREADS": str(cores)}  # what torch would take by default, made explicit for the test
    results = run_ranks([*train_argv(tmp_path, "capped", 24, 6, 3), "--schedule.epochs", "1"], 2, env=env)
    assert f"torch threads per process capped from {cores} to {max(1, cores // 2)}" in results[0].stdout
    plans = [r for r in map(json.loads, (tmp_path / "capped" / "metrics.jsonl").open()) if r["kind"] == "plan"]
    assert plans[0]["threads"] == max(1, cores // 2)


def test_a_killed_rank_is_named_by_the_survivor_in_one_line(tmp_path):
    """Rank 1 is SIGKILLed mid-run (a lost machine); rank 0 stops with one line naming the dead rank, its pid
    and cause, the step and the newest checkpoint, not with a gloo traceback."""
    argv = [*train_argv(tmp_path, "lost", 24, 6, 3), "--schedule.epochs", "20", "--run.checkpoint_every", "2"]
    procs = start_ranks(argv, 2)
    metrics = tmp_path / "lost" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    try:
        while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 5):
            assert time.monotonic() < deadline and procs[0].poll() is None
            time.sleep(0.05)
        procs[1].send_signal(signal.SIGKILL)
        out, _ = procs[0].communicate(timeout=120)
    finally:
        for proc in procs:
            proc.kill()
    assert procs[0].returncode == 1, out
    lost = re.search(rf"largebatch train: error: rank 1 \(pid {procs[1].pid} on \S+\) died: its process ended "
                     r"without recording an error: killed by a signal .*; rank 0 stopped after step (\d+); the newest "
                     r"checkpoint is (\S+);", out)
    assert lost and "Traceback" not in out, out
    assert int(lost.group(1)) >= 5 and Path(lost.group(2)).parent == tmp_path / "lost"


def test_a_rank_that_raises_is_named_with_its_error_by_the_survivor(tmp_path):
    argv = [FAULT_JOB, *run_args(tmp_path, "raised", 24, 6, 3), "--fault", "raise", "1", "3"]  # fault_job: fmnist_goyal
    survivor, failed = run_ranks(argv, 2, check=False)
    assert failed.returncode != 0 and "ValueError: injected fault after step 3" in failed.stdout
    named = re.search(r"RankLostError: rank 1 \(pid \d+ on \S+\) failed in step 3: ValueError: injected fault after "
                      r"step 3; rank 0 stopped after step 3; no checkpoint was written yet", survivor.stdout)
    assert named, survivor.stdout


def test_resume_under_another_world_size_says_what_is_not_restored(tmp_path):
    run_ranks([*train_argv(tmp_path, "two", 24, 6, 3), "--run.stop_after_epochs", "1"], 2)
    resumed = run_python(["-m", "largebatch", "train", "--resume", str(tmp_path / "two")])
    assert "written by 2 processes and this run has 1" in resumed.stderr
    assert "final test accuracy" in resumed.stdout


def test_comm_hooks_on_two_simulated_nodes_of_two_processes(tmp_path):
    """4 gloo ranks as 2 nodes x 2: every hook's averaged float64 gradient against the exact mean of the
    ranks' own gradients; the hierarchical one sends half of its bytes across nodes, fp16 half of fp32."""
    run_ranks([str(REPO / "tests" / "comm_job.py"), str(tmp_path), "2"], 4)
    result = json.loads((tmp_path / "comm.json").read_text())
    numel = result["numel"]
    assert numel % 2 == 1  # the shards of the hierarchical hook needed padding
    assert result["none"]["error"] < 1e-14 and result["hierarchical"]["error"] < 1e-14
    assert 0 < result["fp16"]["error"] < 2 ** -10 and 0 < result["hierarchical_fp16"]["error"] < 2 ** -10
    assert result["fp16"]["bytes"] * 2 == numel * 4 == result["hierarchical_fp16"]["bytes"] * 2
    assert result["hierarchical"]["bytes"] == numel * 8  # a float64 model keeps float64 on the wire
    assert result["fp16"]["inter_node_bytes"] == result["fp16"]["bytes"]  # a flat all-reduce spans the nodes
    for hook in ("hierarchical", "hierarchical_fp16"):  # one shard of each bucket per rank crosses nodes
        assert 0.5 <= result[hook]["inter_node_bytes"] / result[hook]["bytes"] < 0.5 + 4 / numel


def test_fp16_hook_through_the_config_trains_like_one_process(tmp_path):
    run_ranks([*train_argv(tmp_path, "fp16", 24, 6, 3), "--dist.comm_hook", "fp16"], 2)
    run_python(train_argv(tmp_path, "single", 24, 6, 3))
    fp16, single = parameters(tmp_path / "fp16"), parameters(tmp_path / "single")
    assert any(not torch.allclose(fp16[k], single[k], rtol=1e-10, atol=1e-12) for k in single)  # the hook acted
    # One all-reduce is within fp16's rounding (the test above); over 12 steps the small gradient components that
    # fp16 loses without loss scaling add up, so the trained tensors agree to a few percent.
    for key in single:
        assert ((fp16[key] - single[key]).norm() / single[key].norm()).item() < 0.1, key


def test_a_rank_that_diverges_is_caught_within_check_every_steps(tmp_path):
    argv = [str(REPO / "tests" / "fault_job.py"), *SYNTHETIC, "--data.global_batch", "24", "--data.micro_batch", "6",
            "--data.bn_batch", "3", "--dist.check_every", "2", "--run.out_dir", str(tmp_path), "--run.name", "d",
            "--fault", "perturb", "1", "3"]
    results = run_ranks(argv, 2, check=False)
    assert all(r.returncode != 0 for r in results)
    assert ("after step 4 the ranks no longer hold the same parameters: rank(s) [1] differ from rank 0, first in "
            "'features.0.weight'") in results[0].stdout


KFAC = ["--optim.preconditioner", "kfac", "--kfac.inverse_dtype", "fp64", "--kfac.factor_every", "1",
        "--kfac.inverse_every", "2", "--kfac.damping", "0.01"]


@pytest.mark.parametrize("inverse", ["cholesky", "eigen"])
def test_kfac_on_two_and_three_processes_equals_one_process(tmp_path, inverse):
    """Factors averaged over the ranks as triangles, each inverse made by its owner and broadcast: the
    factors, the inverses (Cholesky's are unique; eigenvectors are not, so eigen compares the run) and
    the float64 parameters equal one process with the whole global batch in 6 micro-batches."""
    argv = [*KFAC, "--kfac.inverse", inverse]
    run_python([*train_argv(tmp_path, "one", 24, 4, 4), *argv])
    worlds = (2, 3) if inverse == "cholesky" else (3,)
    for world in worlds:
        run_ranks([*train_argv(tmp_path, f"w{world}", 24, 4, 4), *argv], world)
    one = load_checkpoint(tmp_path / "one" / "checkpoint.pt")
    for world in worlds:
        many = load_checkpoint(tmp_path / f"w{world}" / "checkpoint.pt")
        for name, tensor in parameters(tmp_path / "one").items():
            assert torch.allclose(tensor, many["model"][name], rtol=1e-9, atol=1e-12), (world, name)
        for name, factors in one["kfac"]["factors"].items():
            for x, y in zip(factors, many["kfac"]["factors"][name]):
                assert torch.allclose(x, y, rtol=1e-9, atol=1e-14), (world, name)
        for name, inverse_state in one["kfac"]["inverses"].items():
            if inverse == "cholesky":
                for x, y in zip(inverse_state["tensors"], many["kfac"]["inverses"][name]["tensors"]):
                    assert torch.allclose(x, y, rtol=1e-8, atol=1e-10), (world, name)


def test_loss_sync_log_on_two_processes_trains_like_one_and_both_stop_at_a_nonfinite_step(tmp_path):
    """run.loss_sync = log keeps the loss on the device and agrees on stop signals only at log steps: two
    ranks still take the very steps of one process, and a non-finite loss stops every rank at the same
    check, naming the step (none waits for the other in a collective)."""
    log = ["--run.loss_sync", "log", "--run.log_every", "4"]
    run_ranks([*train_argv(tmp_path, "log", 24, 6, 3), *log], 2)
    run_python(train_argv(tmp_path, "single", 24, 24, 3))
    ddp, single = parameters(tmp_path / "log"), parameters(tmp_path / "single")
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-10, atol=1e-12, msg=key)
    diverging = [*train_argv(tmp_path, "diverge", 24, 6, 3), *log, "--optim.base_lr", "1e30",
                 "--schedule.warmup_epochs", "0"]
    for result in run_ranks(diverging, 2, timeout=120, check=False):
        assert result.returncode != 0 and "at step 1, found after step 3 (run.loss_sync = 'log'" in result.stdout
