"""Fashion-MNIST at a global batch of 16,384: LARS against momentum SGD with the linear scaling rule
and gradual warmup, at the same epochs, model, data, BN batch, schedule shape and seeds.

The LARS runs are the recipe `fmnist_lars16k`. The SGD runs are the same recipe with Goyal et al.'s
optimizer: lr = base_lr * 16384 / 256 (base_lr as tuned at small batch, fmnist_goyal's 0.05, plus any
others given, so the outcome does not hang on one lr), ramped per iteration from base_lr over the
same warmup, momentum SGD with momentum correction and L2 weight decay (not on BN and bias).

    python benchmarks/lars_vs_sgd.py [--seeds 0 1] [--sgd-base-lr 0.05 0.0125] [--epochs 20]

Each run takes about 7 minutes on 2 CPU cores. Prints a table (final test accuracy of every run, the
mean over seeds) and writes benchmarks/results/lars_vs_sgd.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

import largebatch

RESULTS = Path(__file__).parent / "results"
RECIPE = "fmnist_lars16k"


def sgd_overrides(base_lr: float) -> dict:
    return {"optim.name": "sgd", "optim.base_lr": base_lr, "optim.ref_batch": 256, "optim.scaling": "linear",
            "optim.sgd.lr_in_momentum": True, "optim.sgd.momentum_correction": True, "schedule.warmup_from": "base_lr"}


def final_accuracy(overrides: dict, seed: int, epochs: float | None) -> tuple[float, float]:
    """(final test accuracy, wall seconds) of one run of the recipe with these overrides."""
    overrides = {**overrides, "run.seed": seed, "run.progress": False, "run.checkpoint": False}
    if epochs is not None:
        overrides["schedule.epochs"] = epochs
    with tempfile.TemporaryDirectory() as tmp:
        cfg = largebatch.load_config(RECIPE, overrides | {"run.out_dir": tmp})
        result = largebatch.run(cfg)
    return result.test.accuracy, result.wall_s


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--sgd-base-lr", type=float, nargs="+", default=[0.05])
    parser.add_argument("--epochs", type=float, default=None, help="default: the recipe's")
    args = parser.parse_args()
    runs = {"LARS (fmnist_lars16k)": {}}
    runs.update({f"SGD, linear scaling from {lr}/256, warmup": sgd_overrides(lr) for lr in args.sgd_base_lr})
    results = {}
    for name, overrides in runs.items():
        per_seed = [final_accuracy(overrides, seed, args.epochs) for seed in args.seeds]
        results[name] = {"accuracy": [a for a, _ in per_seed], "wall_s": [w for _, w in per_seed],
                         "overrides": overrides}
    print(f"{'optimizer':<44}{'test accuracy per seed':>28}{'mean':>9}")
    for name, r in results.items():
        accs = " ".join(f"{100 * a:.2f}" for a in r["accuracy"])
        print(f"{name:<44}{accs:>28}{100 * statistics.mean(r['accuracy']):>8.2f}%")
    cfg = largebatch.load_config(RECIPE, {} if args.epochs is None else {"schedule.epochs": args.epochs})
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lars_vs_sgd.json").write_text(json.dumps({
        "benchmark": "lars_vs_sgd", "recipe": RECIPE, "global_batch": cfg.data.global_batch,
        "epochs": cfg.schedule.epochs, "seeds": args.seeds, "torch": torch.__version__, "runs": results,
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
