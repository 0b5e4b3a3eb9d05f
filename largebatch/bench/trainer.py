"""`largebatch bench trainer`: training images/s of `largebatch train` against a minimal hand-written
PyTorch loop on the same model, data and batch, measured alternately in one process.

The hand loop is what a person would write without the library: the whole Fashion-MNIST training set
normalised once into one float tensor, a random permutation, SGD with momentum, forward/backward/step,
with the same model, channels_last layout, batch (one forward pass per step, plain BN) and no
augmentation. The trainer runs its full path (config, sampler, DataLoader with batched fetch,
per-iteration lr, global-loss check, JSON lines and TensorBoard logging), read from its own `train`
records, which cover every step except the first logging window (warm-up). Target ratio: >= 0.95.

The options, the checks and the table import no torch (the command line imports this module for every
command); the two measurements import it when they run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from largebatch.bench.record import write_record
from largebatch.config import MODEL_NAMES
from largebatch.errors import UserError

TRAIN_IMAGES = 60000  # Fashion-MNIST's training set, which both loops read


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench trainer` in the sub-benchmarks `benchmarks`."""
    trainer = benchmarks.add_parser(
        "trainer", help="images/s of largebatch train against a minimal hand-written loop (target >= 0.95)",
        description="Training images/s of `largebatch train` (its full path: sampler, DataLoader, lr schedule, "
                    "loss check, logging) against a minimal hand-written PyTorch loop with the same model, "
                    "Fashion-MNIST data and batch, the two measured in turn --repeats times. Prints the medians, "
                    "each run and the ratio (target >= 0.95), and writes them as JSON.")
    trainer.add_argument("--model", choices=MODEL_NAMES, default="small_cnn", help="registry model (default "
                         "small_cnn)")
    trainer.add_argument("--global-batch", type=int, default=1024, help="images per step (default 1024)")
    trainer.add_argument("--steps", type=int, default=40, help="timed steps per measurement, a multiple of "
                         "--warmup (default 40)")
    trainer.add_argument("--warmup", type=int, default=5, help="untimed steps first; also the trainer's logging "
                         "window (default 5)")
    trainer.add_argument("--repeats", type=int, default=3, help="measurements of each loop, alternated; the "
                         "medians count (default 3)")
    trainer.add_argument("--json", type=Path, default=Path("bench_trainer.json"), help="where the JSON goes "
                         "(default bench_trainer.json in the current directory)")
    trainer.set_defaults(func=cmd_bench_trainer)


def cmd_bench_trainer(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Check the options, measure both loops in turn, print the table, write the JSON."""
    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}")
    require_positive({"--global-batch": args.global_batch, "--steps": args.steps, "--warmup": args.warmup,
                      "--repeats": args.repeats})
    if args.steps % args.warmup:
        raise UserError(f"--steps {args.steps}: give a multiple of --warmup {args.warmup} (the trainer logs its "
                        "images/s every --warmup steps)")
    if args.global_batch >= TRAIN_IMAGES:
        raise UserError(f"--global-batch {args.global_batch}: give fewer than the training set's {TRAIN_IMAGES} "
                        "images")
    hand, ours = alternate([partial(loop, args.model, args.global_batch, args.steps, args.warmup)
                            for loop in (hand_loop_images_per_s, trainer_images_per_s)], args.repeats)
    body: dict[str, Any] = {
        "model": args.model, "global_batch": args.global_batch, "steps": args.steps, "repeats": args.repeats,
        "hand_loop_images_per_s": hand, "largebatch_images_per_s": ours,
        "hand_loop_median": statistics.median(hand), "largebatch_median": statistics.median(ours)}
    body["ratio"] = body["largebatch_median"] / body["hand_loop_median"]
    print(table(body))
    write_record(args.json, "trainer_overhead", body)
    print(f"JSON: {args.json}")
    return 0


def require_positive(options: dict[str, int | None]) -> None:
    """Refuse, naming each, the options given (not None) below 1."""
    wrong = [f"{name} {value}" for name, value in options.items() if value is not None and value < 1]
    if wrong:
        raise UserError(f"{', '.join(wrong)}: give at least 1")


def alternate(measurements: Sequence[Callable[[], float]], repeats: int) -> list[list[float]]:
    """Each measurement's `repeats` results, the measurements taken in turn within each round, so that a
    drift in the machine's load hits all of them alike."""
    results: list[list[float]] = [[] for _ in measurements]
    for _ in range(repeats):
        for measure, values in zip(measurements, results):
            values.append(measure())
    return results


def hand_loop_images_per_s(model_name: str, global_batch: int, steps: int, warmup: int) -> float:
    """Images/s of the hand-written loop over `steps` steps after `warmup` untimed ones."""
    import torch

    from largebatch.data import load_splits
    from largebatch.models import build_model

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
    """Images/s of a `largebatch.run` of fmnist_goyal set up as the hand loop, from its `train` records
    (one every `warmup` steps) less the first."""
    import tempfile

    from largebatch.api import load_config, run
    from largebatch.metrics import read_metrics

    steps_per_epoch = TRAIN_IMAGES // global_batch
    with tempfile.TemporaryDirectory() as out:
        cfg = load_config("fmnist_goyal", {
            "model.name": model_name, "model.channels_last": True, "data.global_batch": global_batch,
            "data.micro_batch": 0, "data.bn_batch": 0, "data.augment": "none",
            "schedule.epochs": (warmup + steps) / steps_per_epoch, "schedule.warmup_epochs": 0,
            "schedule.decay": "none", "run.log_every": warmup, "run.checkpoint": False, "run.progress": False,
            "run.out_dir": out, "run.name": "bench"})
        run_dir = run(cfg).run_dir
        windows = [r for r in read_metrics(run_dir) if r["kind"] == "train"][1:]  # drop the warm-up window
    # Each window logs images/s over `warmup` steps; equal-sized windows, so the harmonic mean is exact.
    return statistics.harmonic_mean([w["images_per_s"] for w in windows])


def table(body: dict[str, Any]) -> str:
    """Both loops' median images/s and runs, then the ratio against its target."""
    hand, ours = body["hand_loop_images_per_s"], body["largebatch_images_per_s"]
    return "\n".join([
        f"{body['model']}, global batch {body['global_batch']}; {body['steps']} timed steps per run",
        f"{'loop':<22}{'median images/s':>18}{'runs':>40}",
        f"{'hand-written PyTorch':<22}{body['hand_loop_median']:>18.1f}{str([round(v) for v in hand]):>40}",
        f"{'largebatch train':<22}{body['largebatch_median']:>18.1f}{str([round(v) for v in ours]):>40}",
        f"ratio largebatch / hand-written: {body['ratio']:.3f} (target >= 0.95)"])
