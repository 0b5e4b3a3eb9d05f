"""K-FAC's accuracy on Fashion-MNIST against first-order training, per epoch.

`--part a` (default): at the default batch 1024, SGD as fmnist_goyal (9 epochs) against K-FAC + SGD
as fmnist_kfac (4.5 epochs); reports after how many epochs K-FAC first reaches SGD's final accuracy
(the target is at most half of SGD's epochs).
`--part b`: at global batch 4096 and 16,384, K-FAC + SGD against SGD with linear scaling and warmup
and against LARS (fmnist_lars16k), the same epochs for all, for each seed.

    python benchmarks/kfac_accuracy.py [--part a|b] [--seeds 0 1] [--epochs 20] [--batches 4096] [--methods kfac]

Prints a table and writes benchmarks/results/kfac_accuracy_<part>.json; part b adds its rows to that
file after every run, replacing a row of the same batch, seed and method, so seeds can be run apart.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import largebatch
from largebatch.metrics import read_metrics

RESULTS = Path(__file__).parent / "results"


def accuracies(recipe: str, overrides: dict) -> list[tuple[float, float]]:
    """(epochs trained, test accuracy) at each evaluation of a run of `recipe` with `overrides` (the last
    one after a fraction of an epoch when the run's length is fractional)."""
    with tempfile.TemporaryDirectory() as out:
        cfg = largebatch.load_config(recipe, overrides | {"run.out_dir": out, "run.name": "run",
                                                          "run.checkpoint": False, "run.progress": False})
        result = largebatch.run(cfg)
        if result.stopped_by:  # a signal ended the run early: its accuracy is no row of the table
            raise SystemExit(f"{recipe} stopped by {result.stopped_by} after {result.steps} steps")
        records = read_metrics(result.run_dir)
    steps_per_epoch = next(r["steps_per_epoch"] for r in records if r["kind"] == "plan")
    return [(r["step"] / steps_per_epoch, r["test_accuracy"]) for r in records if r["kind"] == "epoch"]


def part_a(seeds: list[int]) -> dict:
    rows = []
    for seed in seeds:
        sgd = accuracies("fmnist_goyal", {"run.seed": seed})
        kfac = accuracies("fmnist_kfac", {"run.seed": seed})
        (sgd_epochs, sgd_final) = sgd[-1]
        reached = next((epochs for epochs, acc in kfac if acc >= sgd_final), None)
        rows.append({"seed": seed, "sgd": sgd, "kfac": kfac, "sgd_epochs": sgd_epochs, "sgd_final": sgd_final,
                     "kfac_epochs_to_sgd_final": reached})
        print(f"seed {seed}: SGD {sgd_epochs:g} epochs -> {100 * sgd_final:.2f}%; K-FAC "
              f"{', '.join(f'{e:.2g} ep {100 * a:.2f}%' for e, a in kfac)}; reaches SGD's final accuracy after "
              f"{reached if reached is None else f'{reached:.3g}'} epochs (target <= {sgd_epochs / 2:g})")
    return {"part": "a", "rows": rows}


def part_b(seeds: list[int], epochs: float, batches: list[int], only: list[str]) -> None:
    path = RESULTS / "kfac_accuracy_b.json"
    earlier = json.loads(path.read_text()) if path.exists() else {"epochs": epochs, "rows": []}
    if earlier["epochs"] != epochs:
        raise SystemExit(f"{path} holds {earlier['epochs']}-epoch runs; move it away to record {epochs:g}-epoch ones")
    rows = earlier["rows"]
    methods = {
        "sgd": ("fmnist_goyal", {}),
        "kfac": ("fmnist_kfac", {}),
        "lars": ("fmnist_lars16k", {}),
    }
    for batch in batches:
        for seed in seeds:
            for name, (recipe, extra) in methods.items():
                if name not in only:
                    continue
                overrides = {"data.global_batch": batch, "schedule.epochs": epochs, "run.seed": seed} | extra
                accs = accuracies(recipe, overrides)
                key = (batch, seed, name)
                rows = [r for r in rows if (r["batch"], r["seed"], r["method"]) != key]
                rows.append({"batch": batch, "seed": seed, "method": name, "accuracies": accs, "final": accs[-1][1]})
                write(path, {"part": "b", "epochs": epochs, "rows": rows})
                print(f"batch {batch:>6}  seed {seed}  {name:<5} {epochs:g} epochs: {100 * accs[-1][1]:.2f}%")


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("a", "b"), default="a")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--epochs", type=float, default=20, help="part b: epochs of every run")
    parser.add_argument("--batches", type=int, nargs="+", default=[4096, 16384], help="part b: global batches")
    parser.add_argument("--methods", nargs="+", choices=("sgd", "kfac", "lars"), default=["sgd", "kfac", "lars"],
                        help="part b: methods to run (the others' rows in the JSON are kept)")
    args = parser.parse_args()
    if args.part == "a":
        write(RESULTS / "kfac_accuracy_a.json", part_a(args.seeds))
    else:
        part_b(args.seeds, args.epochs, args.batches, args.methods)


if __name__ == "__main__":
    main()
