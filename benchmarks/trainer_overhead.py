"""Trainer overhead: training images/s of `largebatch train` against a minimal hand-written PyTorch
loop on the same model, data and batch, measured alternately in one process.

The hand loop is what a person would write without the library: the whole training set normalised
once into one float tensor, a random permutation, SGD with momentum, forward/backward/step, with
the same model, channels_last layout, batch (one forward pass per step, plain BN) and no
augmentation. The
trainer runs its full path (config, sampler, DataLoader with batched fetch, per-iteration lr,
global-loss check, JSON lines and TensorBoard logging), read from its own `train` records, which
cover every step except the first logging window (warm-up). Target ratio: >= 0.95.

    python benchmarks/trainer_overhead.py [--global-batch 1024] [--steps 40] [--repeats 3]

Prints a table and writes benchmarks/results/trainer_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import largebatch
from largebatch.cli import parse_overrides
from largebatch.data import load_splits
from largebatch.metrics import read_metrics
from largebatch.models import build_model

RESULTS = Path(__file__).parent / "results"


def hand_loop_images_per_s(model_name: str, global_batch: int, steps: int, warmup: int) -> float:
    splits = load_splits("fashion_mnist", augment="none")
    x_all, y_all = splits.train.__getitems__(list(range(len(splits.train))))
    x_all = x_all.contiguous(memory_format=torch.channels_last)
    torch.manual_seed(0)
    model = build_model(model_name, num_classes=10, in_channels=1, image_size=28).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss()
    order = torch.randperm(len(y_all))
    model.train()
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        index = order[(step * global_batch) % (len(order) - global_batch):][:global_batch]
        loss = criterion(model(x_all[index]), y_all[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return steps * global_batch / (time.perf_counter() - start)


def trainer_images_per_s(model_name: str, global_batch: int, steps: int, warmup: int) -> float:
    steps_per_epoch = 60000 // global_batch
    with tempfile.TemporaryDirectory() as out:
        cfg = largebatch.load_config("fmnist_goyal", parse_overrides([
            "--model.name", model_name, "--model.channels_last", "true", "--data.global_batch", str(global_batch),
            "--data.micro_batch", "0", "--data.bn_batch", "0",
            "--data.augment", "none", "--schedule.epochs", str((warmup + steps) / steps_per_epoch),
            "--schedule.warmup_epochs", "0", "--schedule.decay", "none", "--run.log_every", str(warmup),
            "--run.checkpoint", "false", "--run.progress", "false", "--run.out_dir", out, "--run.name", "bench"]))
        run_dir = largebatch.run(cfg).run_dir
        windows = [r for r in read_metrics(run_dir) if r["kind"] == "train"][1:]  # drop the warm-up window
    # Each window logs images/s over `warmup` steps; equal-sized windows, so the harmonic mean is exact.
    return statistics.harmonic_mean([w["images_per_s"] for w in windows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--global-batch", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=40, help="timed steps per measurement (multiple of --warmup)")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    hand, ours = [], []
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        hand.append(hand_loop_images_per_s(args.model, args.global_batch, args.steps, args.warmup))
        ours.append(trainer_images_per_s(args.model, args.global_batch, args.steps, args.warmup))
    result = {
        "benchmark": "trainer_overhead", "model": args.model, "global_batch": args.global_batch,
        "steps": args.steps, "repeats": args.repeats, "threads": torch.get_num_threads(),
        "torch": torch.__version__, "hand_loop_images_per_s": hand, "largebatch_images_per_s": ours,
        "hand_loop_median": statistics.median(hand), "largebatch_median": statistics.median(ours),
    }
    result["ratio"] = result["largebatch_median"] / result["hand_loop_median"]
    print(f"{'loop':<22}{'median images/s':>18}{'runs':>40}")
    print(f"{'hand-written PyTorch':<22}{result['hand_loop_median']:>18.1f}{str([round(v) for v in hand]):>40}")
    print(f"{'largebatch train':<22}{result['largebatch_median']:>18.1f}{str([round(v) for v in ours]):>40}")
    print(f"ratio largebatch / hand-written: {result['ratio']:.3f} (target >= 0.95)")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "trainer_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
