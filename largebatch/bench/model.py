"""`largebatch bench model`: training images/s of one model on synthetic data, the trainer's step with
each fast-path field against a minimal PyTorch loop over the very same network, all in one run.

The baseline is what a user writes first: the registry's network (torchvision's ResNet-50 at 224 px),
autocast at the chosen precision, `torch.optim.SGD(momentum=0.9)` and `loss.backward()`, no host
reads. The other rows are largebatch's `TrainStep` (the trainer's step, built by `build_run`) plain,
then with one fast-path field at a time (`model.channels_last`, `model.compile`, `run.loss_sync =
"log"`, `run.cudnn_benchmark` on a GPU) and with all of them, so that each field is switched on by
default only where it measures faster. Every row trains on one device-resident batch, so the input
pipeline is not measured here (`largebatch bench data` does that).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

FAST_FIELDS = {"channels_last": {"model.channels_last": True}, "compile": {"model.compile": True},
               "loss_sync_log": {"run.loss_sync": "log"}, "cudnn_benchmark": {"run.cudnn_benchmark": True}}


@dataclass(frozen=True)
class Workload:
    model: str
    image_size: int
    channels: int
    classes: int
    batch: int
    precision: str
    device: str


@dataclass(frozen=True)
class ModelRow:
    name: str
    images_per_s: float
    step_ms: float  # median over the timed repeats
    first_step_s: float  # allocation, cuDNN's search, compilation


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench model` in the sub-benchmarks `benchmarks`."""
    model = benchmarks.add_parser(
        "model", help="training images/s of a model: a minimal PyTorch loop vs the trainer's step with each "
                      "fast-path field",
        description="Training images/s of one network on a synthetic device-resident batch: a minimal loop "
                    "(the network, autocast, torch.optim.SGD) against largebatch's training step plain, with each "
                    "fast-path field alone (model.channels_last, model.compile, run.loss_sync = log, "
                    "run.cudnn_benchmark on a GPU) and with all of them. Prints the table with each row's ratio "
                    "to the minimal loop and writes it as JSON.")
    model.add_argument("--model", help="registry model (default resnet50 on a GPU, small_cnn on CPU)")
    model.add_argument("--image-size", type=int, help="input side in px (default 224 on a GPU, 28 on CPU)")
    model.add_argument("--channels", type=int, help="input channels (default 3 on a GPU, 1 on CPU)")
    model.add_argument("--classes", type=int, help="output classes (default 1000 on a GPU, 10 on CPU)")
    model.add_argument("--batch", type=int, help="images per step on the device (default 256 on a GPU, 128 on "
                       "CPU)")
    model.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="autocast precision of every row "
                       "(default bf16 on a GPU, fp32 on CPU)")
    model.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    model.add_argument("--steps", type=int, default=20, help="timed steps per repeat (default 20)")
    model.add_argument("--repeats", type=int, default=5, help="timed rounds, every row in turn; each row's median "
                       "counts (default 5)")
    model.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    model.add_argument("--rows", help=f"comma-separated subset of: baseline, plain, {', '.join(FAST_FIELDS)}, all "
                       "(default: every row the device can run)")
    model.add_argument("--json", type=Path, default=Path("bench_model.json"), help="where the JSON goes")
    model.set_defaults(func=cmd_bench_model)


def workload(args: argparse.Namespace) -> Workload:
    from largebatch.bench.record import bench_device

    device = bench_device(args.device)
    gpu = device == "cuda"
    return Workload(model=args.model or ("resnet50" if gpu else "small_cnn"),
                    image_size=args.image_size or (224 if gpu else 28), channels=args.channels or (3 if gpu else 1),
                    classes=args.classes or (1000 if gpu else 10), batch=args.batch or (256 if gpu else 128),
                    precision=args.precision or ("bf16" if gpu else "fp32"), device=device)


def row_names(w: Workload, requested: str | None) -> list[str]:
    """The rows to measure: `requested` (checked), or all the device can run (cuDNN's search is GPU-only)."""
    known = ["baseline", "plain", *FAST_FIELDS, "all"]
    if requested:
        names = requested.split(",")
        unknown = [n for n in names if n not in known]
        if unknown:
            from largebatch.errors import UserError

            raise UserError(f"--rows: unknown row(s) {', '.join(unknown)}; rows are {', '.join(known)}")
        return names
    return [n for n in known if n != "cudnn_benchmark" or w.device == "cuda"]


def trainer_overrides(w: Workload, row: str) -> dict:
    """The config of a trainer row: one batch of the workload's shape per step, BN over the whole batch
    (as the baseline's), plain SGD; the fast-path fields of the row on."""
    base = {"data.source": "synthetic", "data.synthetic_shape": [w.channels, w.image_size, w.image_size],
            "data.synthetic_classes": w.classes, "data.synthetic_train": w.batch, "data.synthetic_test": w.batch,
            "data.global_batch": w.batch, "data.micro_batch": w.batch, "data.bn_batch": 0, "data.augment": "none",
            "model.name": w.model, "model.channels_last": False, "optim.name": "sgd", "run.precision": w.precision,
            "run.checkpoint": False, "run.progress": False, "run.trust_log_every": 0, "dist.device": w.device,
            "schedule.warmup_epochs": 0}
    if row == "all":
        fields = [f for name, f in FAST_FIELDS.items() if name != "cudnn_benchmark" or w.device == "cuda"]
        return base | {k: v for f in fields for k, v in f.items()}
    return base | FAST_FIELDS.get(row, {})


def baseline_step(w: Workload, x, y) -> Callable[[], None]:
    """The minimal loop's step over the registry's network for the workload."""
    import torch

    from largebatch.models import build_model
    from largebatch.precision import autocast_factory, grad_scaler

    torch.manual_seed(0)
    device = torch.device(w.device)
    net = build_model(w.model, num_classes=w.classes, in_channels=w.channels, image_size=w.image_size).to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    autocast, scaler = autocast_factory(w.precision, device), grad_scaler(w.precision, device)
    criterion = torch.nn.CrossEntropyLoss()

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = criterion(net(x), y)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def trainer_step(overrides: dict, x, y) -> Callable[[], None]:
    """The trainer's own step (`TrainStep` over a `build_run` state) configured by `overrides`, fed the
    batch (x, y) in the micro-batches its plan asks for."""
    import itertools

    from largebatch.api import load_config
    from largebatch.build import build_run
    from largebatch.dist import init_distributed
    from largebatch.step import TrainStep

    cfg = load_config("fmnist_goyal", overrides)
    state = build_run(cfg, init_distributed(cfg.dist), run_dir=None)
    micro = state.plan.batches.micro_batch
    take, counter = TrainStep(state), itertools.count()
    batches: Iterator = itertools.cycle(list(zip(x.split(micro), y.split(micro))))
    return lambda: take(batches, next(counter))


def measure(steps_of: dict[str, Callable[[], None]], w: Workload, warmup: int, steps: int,
            repeats: int) -> list[ModelRow]:
    """Each row's images/s: its first step timed alone, `warmup` - 1 more untimed, then `repeats` rounds in
    which every row runs `steps` steps in turn, so that a change in the machine's load hits all rows alike."""
    import torch

    sync = torch.cuda.synchronize if w.device == "cuda" else (lambda: None)

    def timed(step: Callable[[], None], count: int) -> float:
        start = time.perf_counter()
        for _ in range(count):
            step()
        sync()
        return time.perf_counter() - start

    first = {name: timed(step, 1) for name, step in steps_of.items()}
    for step in steps_of.values():
        timed(step, warmup - 1)
    times: dict[str, list[float]] = {name: [] for name in steps_of}
    for _ in range(repeats):
        for name, step in steps_of.items():
            times[name].append(timed(step, steps) / steps)
    medians = {name: statistics.median(t) for name, t in times.items()}
    return [ModelRow(name, w.batch / medians[name], 1000 * medians[name], first[name]) for name in steps_of]


def cmd_bench_model(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from largebatch.bench.record import write_record
    from largebatch.errors import UserError

    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}")
    w = workload(args)
    names = row_names(w, args.rows)
    device = torch.device(w.device)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(w.batch, w.channels, w.image_size, w.image_size, generator=generator).to(device)
    y = torch.randint(0, w.classes, (w.batch,), generator=generator).to(device)
    steps_of = {name: baseline_step(w, x, y) if name == "baseline" else trainer_step(trainer_overrides(w, name), x, y)
                for name in names}
    rows = measure(steps_of, w, args.warmup, args.steps, args.repeats)
    base = rows[names.index("baseline")].images_per_s if "baseline" in names else None
    print(table(w, rows, base, args))
    write_record(args.json, "bench_model", {"workload": asdict(w), "steps": args.steps, "repeats": args.repeats,
                                            "warmup": args.warmup, "baseline_images_per_s": base,
                                            "rows": [asdict(r) | {"ratio_to_baseline": r.images_per_s / base
                                                                  if base else None} for r in rows]})
    print(f"JSON: {args.json}")
    return 0


def table(w: Workload, rows: list[ModelRow], base: float | None, args: argparse.Namespace) -> str:
    lines = [f"{w.model}, {w.channels}x{w.image_size}x{w.image_size}, {w.classes} classes, batch {w.batch}, "
             f"{w.precision} on {w.device}; median of {args.repeats} x {args.steps} steps after {args.warmup} warm-up",
             f"{'row':<18} {'images/s':>10} {'ms/step':>9} {'x baseline':>10} {'first step s':>12}"]
    for r in rows:
        ratio = f"{r.images_per_s / base:.2f}" if base else "-"
        lines.append(f"{r.name:<18} {r.images_per_s:>10.0f} {r.step_ms:>9.1f} {ratio:>10} {r.first_step_s:>12.1f}")
    return "\n".join(lines)
