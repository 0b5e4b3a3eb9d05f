"""The sweep's results, from what its finished runs wrote: the accuracy-vs-batch table of Goyal et al.
2017 and the steps-to-target scaling of Shallue et al. 2019, as `results.json` and `results.md`.

Only finished runs (a "run_final" record, config as the grid gives it) are reported; the others are
listed as not finished. Per series (a method and its vary values) and batch: the seeds, the final
test accuracy (mean ± sample standard deviation over seeds), steps to target (mean over the seeds
that reached it, and how many did), epochs to target, epochs trained and wall time. Per series: the
base accuracy, the largest batch within 1 point of it, the scaling efficiency of steps to target
between consecutive batches of the grid, and the bend (`analysis.bend`).

The base is the accuracy at the grid's smallest batch: of the series itself, or, when the grid
names a `baseline` method, of that method's series with the same vary values. Torch-free.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from largebatch.run_dir import write_text_atomic
from largebatch.sweep.analysis import (ACCURACY_TOLERANCE, BEND_EFFICIENCY, Efficiency, bend, first_reaching,
                                       largest_batch_within, mean_std, scaling_efficiencies)
from largebatch.sweep.grid import Grid, RunSpec, series_name
from largebatch.sweep.records import evaluations, final_record, run_records

JSON_NAME = "results.json"
MARKDOWN_NAME = "results.md"


@dataclass(frozen=True)
class RunResult:
    """One finished run, as its records tell it."""

    series: str
    method: str
    batch: int
    seed: int
    run_dir: str
    accuracy: float  # the last evaluation's test accuracy
    loss: float  # the last evaluation's test loss
    epochs: int
    steps: int
    wall_s: float
    steps_to_target: int | None  # the step of the first evaluation reaching the target
    epochs_to_target: int | None  # its epoch
    stopped_at_target: bool
    curve: tuple[tuple[int, float], ...]  # (epoch, test accuracy) of every evaluation

    @property
    def label(self) -> str:
        return f"{self.series} b={self.batch} s={self.seed}"


@dataclass(frozen=True)
class Row:
    """One series at one batch, over its finished seeds."""

    series: str
    batch: int
    seeds: tuple[int, ...]
    accuracy: float
    accuracy_std: float | None  # sample standard deviation; None with one seed
    steps_to_target: float | None  # mean over the seeds that reached the target
    epochs_to_target: float | None
    reached: int  # seeds that reached the target
    epochs: float
    wall_s: float


@dataclass(frozen=True)
class SeriesSummary:
    """How far one series scales: accuracy against its base, and steps to target across batches."""

    series: str
    base_series: str
    base_batch: int
    base_accuracy: float | None  # None while the base run is not finished
    largest_batch_within: int | None
    efficiencies: tuple[Efficiency, ...]
    bend: int | None


@dataclass(frozen=True)
class Report:
    grid: Grid
    runs: tuple[RunResult, ...]
    rows: tuple[Row, ...]
    series: tuple[SeriesSummary, ...]
    missing: tuple[str, ...]  # the grid's runs that are not finished: "label (status)"


def read_run(spec: RunSpec, target: float) -> RunResult:
    """The outcome of a finished run, from its metrics.jsonl."""
    records = run_records(spec.run_dir)
    final, evals, reached = final_record(records), evaluations(records), first_reaching(records, target)
    return RunResult(series=spec.series, method=spec.method, batch=spec.batch, seed=spec.seed,
                     run_dir=str(spec.run_dir), accuracy=evals[-1]["test_accuracy"], loss=evals[-1]["test_loss"],
                     epochs=evals[-1]["epoch"], steps=final["step"], wall_s=final["wall_s"],
                     steps_to_target=None if reached is None else reached["step"],
                     epochs_to_target=None if reached is None else reached["epoch"],
                     stopped_at_target=bool(final.get("stopped_at_target")),
                     curve=tuple((r["epoch"], r["test_accuracy"]) for r in evals))


def build_report(grid: Grid, runs: Sequence[tuple[RunSpec, str | None]]) -> Report:
    """The report of the grid's runs, each given with None when it is finished, or else why not (its
    status, e.g. "resume from step 120"); the finished ones are read from disk."""
    results = tuple(read_run(spec, grid.target_accuracy) for spec, pending in runs if pending is None)
    series = list(dict.fromkeys(spec.series for spec, _ in runs))
    rows = tuple(_row(name, batch, [r for r in results if r.series == name and r.batch == batch])
                 for name in series for batch in grid.batches
                 if any(r.series == name and r.batch == batch for r in results))
    base_of = {spec.series: series_name(grid.baseline or spec.method, spec.vary) for spec, _ in runs}
    summaries = tuple(_summary(grid, name, base_of[name], rows) for name in series)
    missing = tuple(f"{spec.label} ({pending})" for spec, pending in runs if pending is not None)
    return Report(grid, results, rows, summaries, missing)


def _row(series: str, batch: int, results: Sequence[RunResult]) -> Row:
    accuracy, std = mean_std([r.accuracy for r in results])
    reached = [r for r in results if r.steps_to_target is not None]
    return Row(series=series, batch=batch, seeds=tuple(r.seed for r in results), accuracy=accuracy, accuracy_std=std,
               steps_to_target=fmean(r.steps_to_target for r in reached) if reached else None,
               epochs_to_target=fmean(r.epochs_to_target for r in reached) if reached else None,
               reached=len(reached), epochs=fmean(r.epochs for r in results), wall_s=fmean(r.wall_s for r in results))


def _summary(grid: Grid, series: str, base_series: str, rows: Sequence[Row]) -> SeriesSummary:
    own = {row.batch: row for row in rows if row.series == series}
    base = next((row.accuracy for row in rows if row.series == base_series and row.batch == grid.batches[0]), None)
    steps = {batch: own[batch].steps_to_target if batch in own else None for batch in grid.batches}
    within = (largest_batch_within({batch: row.accuracy for batch, row in own.items()}, base)
              if base is not None else None)
    return SeriesSummary(series=series, base_series=base_series, base_batch=grid.batches[0], base_accuracy=base,
                         largest_batch_within=within, efficiencies=tuple(scaling_efficiencies(steps)),
                         bend=bend(steps))


def write_json(report: Report, path: Path) -> Path:
    g = report.grid
    document = {
        "grid": {"path": str(g.path), "name": g.name, "batches": list(g.batches), "seeds": list(g.seeds),
                 "target_accuracy": g.target_accuracy, "stop_at_target": g.stop_at_target, "baseline": g.baseline,
                 "methods": [m.name for m in g.methods],
                 "method_seeds": {m.name: list(m.seeds) for m in g.methods if m.seeds}},
        "conventions": {"accuracy_std": "sample standard deviation over seeds (n - 1); null with one seed",
                        "steps_to_target": "step of the first evaluation at or above target_accuracy, mean over "
                                           "the seeds that reached it",
                        "within_points": 100 * ACCURACY_TOLERANCE, "bend_efficiency": BEND_EFFICIENCY},
        "rows": [asdict(row) for row in report.rows],
        "series": [asdict(s) | {"efficiencies": [asdict(e) | {"efficiency": e.efficiency,
                                                                "per_doubling": e.per_doubling}
                                                  for e in s.efficiencies]}
                   for s in report.series],
        "runs": [asdict(r) for r in report.runs],
        "missing": list(report.missing),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(document, indent=2) + "\n")
    return path


def markdown(report: Report) -> str:
    """results.md: the accuracy-vs-batch table, then how far each series scales."""
    g = report.grid
    target = f"{100 * g.target_accuracy:g}%"
    lines = [f"# Sweep {g.name}", "",
             f"Grid {g.path}: {len(report.runs)} of {len(report.runs) + len(report.missing)} runs finished. "
             f"Accuracy: final test accuracy, mean ± sample standard deviation over seeds (n − 1; none with one "
             f"seed). Steps to {target}: the step of the first evaluation at or above it, mean over the seeds that "
             "reached it.", "",
             f"| method | batch | seeds | final accuracy (%) | steps to {target} | reached | epochs to {target} "
             f"| epochs | wall (s) |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|"]
    for row in report.rows:
        accuracy = f"{100 * row.accuracy:.2f}" + (f" ± {100 * row.accuracy_std:.2f}" if row.accuracy_std is not None
                                                  else "")
        lines.append(f"| {row.series} | {row.batch} | {','.join(map(str, row.seeds))} | {accuracy} "
                     f"| {_number(row.steps_to_target, '.0f')} | {row.reached}/{len(row.seeds)} "
                     f"| {_number(row.epochs_to_target, '.2f')} | {row.epochs:g} | {row.wall_s:.1f} |")
    base = (f"the accuracy of {g.baseline} at batch {g.batches[0]}" if g.baseline
            else f"each method's own accuracy at batch {g.batches[0]}")
    lines += ["", "## Scaling", "",
              f"Base: {base}. Bend: the largest batch up to which every doubling keeps at least "
              f"{100 * BEND_EFFICIENCY:.0f}% of perfect scaling of steps to {target}.", "",
              f"| method | base accuracy (%) | largest batch within {100 * ACCURACY_TOLERANCE:g} pt | bend |",
              "|---|---:|---:|---:|"]
    for s in report.series:
        base_accuracy = None if s.base_accuracy is None else 100 * s.base_accuracy
        lines.append(f"| {s.series} | {_number(base_accuracy, '.2f')} "
                     f"| {_number(s.largest_batch_within, 'd')} | {_number(s.bend, 'd')} |")
    lines += ["", f"Scaling efficiency of steps to {target} from batch B to the next batch B': "
              "(steps(B) / steps(B')) / (B' / B); per doubling: that to the power 1 / log2(B' / B).", "",
              "| method | batches | steps | efficiency | per doubling |", "|---|---|---|---:|---:|"]
    for s in report.series:
        for e in s.efficiencies:
            lines.append(f"| {s.series} | {e.small} → {e.large} | {_number(e.steps_small, '.0f')} → "
                         f"{_number(e.steps_large, '.0f')} | {_percent(e.efficiency)} | {_percent(e.per_doubling)} |")
    if report.missing:
        lines += ["", f"Not finished: {', '.join(report.missing)}."]
    return "\n".join(lines) + "\n"


def write_markdown(report: Report, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, markdown(report))
    return path


def _number(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}%"
