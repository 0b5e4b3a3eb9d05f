"""`largebatch bench kfac`: K-FAC's overhead, as seconds per training iteration of SGD and of K-FAC +
SGD with the same model, data and batch, measured alternately in one process, with the update
intervals of a recipe (by default fmnist_kfac's later intervals, the ones most of a run uses); plus the
time of one factor update and of one inverse update.

The model is the CIFAR-style ResNet-20 on synthetic 3 x 32 x 32 images (the data pipeline is not what
is measured). Each measurement covers whole inverse intervals, so the amortised cost of the stale
updates is in the mean. Target: K-FAC + SGD <= 1.30 x SGD per iteration.

The options, the checks and the table import no torch (the command line imports this module for every
command); the measurements import it when they run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largebatch.bench.record import write_record
from largebatch.bench.trainer import alternate, require_positive
from largebatch.errors import UserError

if TYPE_CHECKING:
    from largebatch.state import RunState


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench kfac` in the sub-benchmarks `benchmarks`."""
    kfac = benchmarks.add_parser(
        "kfac", help="seconds per iteration of K-FAC + SGD against SGD (target <= 1.30), and of one factor and "
                     "one inverse update",
        description="Seconds per training iteration of SGD and of K-FAC + SGD (ResNet-20, synthetic 3x32x32 "
                    "images), the two measured in turn --repeats times over whole inverse intervals, plus the "
                    "time of one factor update and of one inverse update. Prints the medians, each run and the "
                    "ratio (target <= 1.30), and writes them as JSON.")
    kfac.add_argument("--batch", type=int, default=128, help="images per step (default 128)")
    kfac.add_argument("--factor-every", type=int, help="steps between factor updates (default: fmnist_kfac's "
                      "later interval)")
    kfac.add_argument("--inverse-every", type=int, help="steps between inverse updates (default: fmnist_kfac's "
                      "later interval)")
    kfac.add_argument("--intervals", type=int, default=2, help="inverse intervals timed per measurement (default 2)")
    kfac.add_argument("--repeats", type=int, default=3, help="measurements of each, alternated; the medians count "
                      "(default 3)")
    kfac.add_argument("--json", type=Path, default=Path("bench_kfac.json"), help="where the JSON goes (default "
                      "bench_kfac.json in the current directory)")
    kfac.set_defaults(func=cmd_bench_kfac)


def cmd_bench_kfac(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Check the options, time SGD and K-FAC + SGD in turn and the two updates, print the table, write the JSON."""
    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}")
    require_positive({"--batch": args.batch, "--factor-every": args.factor_every,
                      "--inverse-every": args.inverse_every, "--intervals": args.intervals, "--repeats": args.repeats})
    from largebatch.api import load_config

    recipe = load_config("fmnist_kfac").kfac
    factor_every = args.factor_every if args.factor_every is not None else recipe.factor_every[-1]
    inverse_every = args.inverse_every if args.inverse_every is not None else recipe.inverse_every[-1]
    steps = args.intervals * inverse_every
    state = partial(run_state, batch=args.batch, factor_every=factor_every, inverse_every=inverse_every)
    sgd, kfac = alternate([lambda: seconds_per_step(state("none"), steps),
                           lambda: seconds_per_step(state("kfac"), steps)], args.repeats)
    factor_s, inverse_s = update_times(state("kfac"))
    body: dict[str, Any] = {
        "model": "resnet20", "input": [3, 32, 32], "batch": args.batch, "factor_every": factor_every,
        "inverse_every": inverse_every, "steps": steps, "repeats": args.repeats,
        "sgd_s_per_step": sgd, "kfac_s_per_step": kfac, "sgd_median": statistics.median(sgd),
        "kfac_median": statistics.median(kfac), "factor_update_s": factor_s, "inverse_update_s": inverse_s}
    body["ratio"] = body["kfac_median"] / body["sgd_median"]
    print(table(body))
    write_record(args.json, "kfac_overhead", body)
    print(f"JSON: {args.json}")
    return 0


def run_state(preconditioner: str, batch: int, factor_every: int, inverse_every: int) -> RunState:
    """A fresh fmnist_kfac run of ResNet-20 on synthetic data, with `preconditioner` ("none" or "kfac")
    and constant update intervals."""
    from largebatch.api import load_config
    from largebatch.build import build_run
    from largebatch.dist import init_distributed

    cfg = load_config("fmnist_kfac", {
        "data.source": "synthetic", "data.synthetic_shape": [3, 32, 32], "data.synthetic_train": batch * 8,
        "data.synthetic_test": batch, "data.global_batch": batch, "data.micro_batch": 0, "data.bn_batch": 0,
        "data.augment": "none", "model.name": "resnet20", "model.channels_last": False,
        "optim.preconditioner": preconditioner, "kfac.factor_every": [factor_every],
        "kfac.inverse_every": [inverse_every], "kfac.every_milestones": [], "run.checkpoint": False,
        "run.progress": False})
    return build_run(cfg, init_distributed(cfg.dist), run_dir=None)


def seconds_per_step(state: RunState, steps: int) -> float:
    """Mean seconds of `steps` training steps, after two untimed ones (steps 0 and 1 update everything)."""
    from largebatch.step import TrainStep

    take = TrainStep(state)

    def batches() -> Iterator:
        while True:
            for indices in state.sampler:
                yield state.splits.train.__getitems__(indices)

    micro_batches = batches()
    for step in range(2):
        take(micro_batches, step)
    start = time.perf_counter()
    for step in range(2, 2 + steps):
        take(micro_batches, step)
    return (time.perf_counter() - start) / steps


def update_times(state: RunState, repeats: int = 3) -> tuple[float, float]:
    """Seconds of one factor update (capture in forward/backward plus averaging, over a plain step) and of
    one inverse update, medians of `repeats`."""
    from largebatch.step import TrainStep

    extension = next(e for e in state.extensions if e.name == "kfac")
    pre = extension.preconditioner
    take = TrainStep(state)
    indices = next(iter(state.sampler))
    factor, inverse = [], []
    for _ in range(repeats):
        for capture in (False, True):
            pre.options = type(pre.options)(**{**pre.options.__dict__, "factor_every": (1 if capture else 10 ** 9,),
                                               "inverse_every": (10 ** 9,)})
            start = time.perf_counter()
            take(iter([state.splits.train.__getitems__(indices)]), 1)
            factor.append((time.perf_counter() - start) * (1 if capture else -1))
        start = time.perf_counter()
        pre.update_inverses()
        inverse.append(time.perf_counter() - start)
    per_repeat = [factor[i] + factor[i + 1] for i in range(0, len(factor), 2)]
    return statistics.median(per_repeat), statistics.median(inverse)


def table(body: dict[str, Any]) -> str:
    """Both medians and runs per iteration, the ratio against its target, and the two updates' seconds."""
    kfac_row = f"K-FAC + SGD (factors /{body['factor_every']}, inverses /{body['inverse_every']})"
    return "\n".join([
        f"{body['model']}, {'x'.join(map(str, body['input']))}, batch {body['batch']}; {body['steps']} timed steps "
        "per run",
        f"{'per iteration':<36}{'median s':>10}  runs",
        f"{'SGD':<36}{body['sgd_median']:>10.4f}  {[round(v, 4) for v in body['sgd_s_per_step']]}",
        f"{kfac_row:<36}{body['kfac_median']:>10.4f}  {[round(v, 4) for v in body['kfac_s_per_step']]}",
        f"ratio K-FAC / SGD: {body['ratio']:.3f} (target <= 1.30)",
        f"one factor update: {body['factor_update_s']:.4f} s (over a plain step); one inverse update: "
        f"{body['inverse_update_s']:.4f} s"])
