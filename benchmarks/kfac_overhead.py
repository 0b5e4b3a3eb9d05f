"""K-FAC's overhead: seconds per training iteration of SGD and of K-FAC + SGD with the same model,
data and batch, measured alternately in one process, with the update intervals of a recipe (by
default fmnist_kfac's later intervals, the ones most of a run uses); plus the time of one factor
update and of one inverse update.

The model is the CIFAR-style ResNet-20 on synthetic 3 x 32 x 32 images (the data pipeline is not what
is measured). Each measurement covers whole inverse intervals, so the amortised cost of the stale
updates is in the mean. Target: K-FAC + SGD <= 1.30 x SGD per iteration.

    python benchmarks/kfac_overhead.py [--batch 128] [--intervals 2] [--repeats 3]

Prints a table and writes benchmarks/results/kfac_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import largebatch
from largebatch.build import build_run
from largebatch.dist import init_distributed
from largebatch.state import RunState
from largebatch.step import TrainStep

RESULTS = Path(__file__).parent / "results"


def run_state(preconditioner: str, batch: int, factor_every: int, inverse_every: int) -> RunState:
    cfg = largebatch.load_config("fmnist_kfac", {
        "data.source": "synthetic", "data.synthetic_shape": [3, 32, 32], "data.synthetic_train": batch * 8,
        "data.synthetic_test": batch, "data.global_batch": batch, "data.micro_batch": 0, "data.bn_batch": 0,
        "data.augment": "none", "model.name": "resnet20", "model.channels_last": False,
        "optim.preconditioner": preconditioner, "kfac.factor_every": [factor_every],
        "kfac.inverse_every": [inverse_every], "kfac.every_milestones": [], "run.checkpoint": False,
        "run.progress": False})
    return build_run(cfg, init_distributed(cfg.dist), run_dir=None)


def seconds_per_step(state: RunState, steps: int) -> float:
    """Mean seconds of `steps` training steps, after two untimed ones (steps 0 and 1 update everything)."""
    take = TrainStep(state)

    def batches():
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--factor-every", type=int, default=None, help="default: fmnist_kfac's later interval")
    parser.add_argument("--inverse-every", type=int, default=None, help="default: fmnist_kfac's later interval")
    parser.add_argument("--intervals", type=int, default=2, help="inverse intervals timed per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    recipe = largebatch.load_config("fmnist_kfac").kfac
    factor_every = args.factor_every or recipe.factor_every[-1]
    inverse_every = args.inverse_every or recipe.inverse_every[-1]
    steps = args.intervals * inverse_every

    sgd, kfac = [], []
    for _ in range(args.repeats):  # alternate, so drifts in machine load hit both alike
        sgd.append(seconds_per_step(run_state("none", args.batch, factor_every, inverse_every), steps))
        kfac.append(seconds_per_step(run_state("kfac", args.batch, factor_every, inverse_every), steps))
    factor_s, inverse_s = update_times(run_state("kfac", args.batch, factor_every, inverse_every))
    result = {
        "benchmark": "kfac_overhead", "model": "resnet20", "input": [3, 32, 32], "batch": args.batch,
        "factor_every": factor_every, "inverse_every": inverse_every, "steps": steps, "repeats": args.repeats,
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "sgd_s_per_step": sgd, "kfac_s_per_step": kfac, "sgd_median": statistics.median(sgd),
        "kfac_median": statistics.median(kfac), "factor_update_s": factor_s, "inverse_update_s": inverse_s,
    }
    result["ratio"] = result["kfac_median"] / result["sgd_median"]
    print(f"{'per iteration':<36}{'median s':>10}  runs")
    print(f"{'SGD':<36}{result['sgd_median']:>10.4f}  {[round(v, 4) for v in sgd]}")
    print(f"{f'K-FAC + SGD (factors /{factor_every}, inverses /{inverse_every})':<36}{result['kfac_median']:>10.4f}  "
          f"{[round(v, 4) for v in kfac]}")
    print(f"ratio K-FAC / SGD: {result['ratio']:.3f} (target <= 1.30)")
    print(f"one factor update: {factor_s:.4f} s (over a plain step); one inverse update: {inverse_s:.4f} s")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kfac_overhead.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
