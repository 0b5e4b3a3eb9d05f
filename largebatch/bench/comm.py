"""`largebatch bench comm`: what DDP's gradient communication costs per step, for the model and
micro-batch a recipe trains, over a grid of bucket sizes (`dist.bucket_cap_mb`) and communication
hooks (`dist.comm_hook`) on the current backend. It prints a table and the best setting, the one
whose backward pass leaves the least communication exposed, as the overrides to train with, and
writes the table as JSON. The compute is the same at every grid point, so the exposed
communication, measured step by step against the same step without the all-reduce, is what tells
the points apart, with less of the machine's noise than the step times themselves.

Under torchrun it measures on the launched processes; run plainly it starts `--nproc` local
processes itself. The timing is `largebatch.bench.comm_timing`; the options, the checks, the table
and the JSON are here and import no torch, so `largebatch bench comm --help` runs without it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largebatch import recipes
from largebatch.api import (
    check_data_path,
    check_device,
    is_main_process,
    launched_world_size,
    load_config,
)
from largebatch.bench.record import write_record
from largebatch.config import Config, ConfigError, DistConfig, plan_batches

if TYPE_CHECKING:
    from largebatch.bench.comm_timing import CommResult, CommRow, Grid

HOOKS = next(f for f in dataclasses.fields(DistConfig) if f.name == "comm_hook").metadata["choices"]
DEFAULT_HOOKS = ("none", "fp16", "bf16")  # those of them the backend cannot carry are left out
DEFAULT_BUCKETS_MB = (1.0, 5.0, 25.0, 100.0)
SWEPT = {"dist.bucket_cap_mb": "--bucket-mb", "dist.comm_hook": "--hooks"}
MIB = 1024 * 1024


def bucket_sizes(text: str) -> tuple[float, ...]:
    """`--bucket-mb 1,5,25,100` -> the sizes in MiB, each > 0."""
    try:
        sizes = tuple(float(item) for item in text.split(","))
    except ValueError:
        sizes = ()
    if not sizes or not all(0 < size < math.inf for size in sizes):
        raise argparse.ArgumentTypeError(f"{text!r}: give bucket sizes in MiB > 0, comma-separated, e.g. 1,5,25,100")
    return sizes


def hook_names(text: str) -> tuple[str, ...]:
    """`--hooks none,fp16` -> the names, each a value `dist.comm_hook` allows."""
    names = tuple(text.split(","))
    unknown = [name for name in names if name not in HOOKS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{','.join(unknown)!r}: allowed hooks are {', '.join(HOOKS)}")
    return names


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `minimum`."""

    def parse(text: str) -> int:
        if not text.lstrip("-").isdigit() or int(text) < minimum:
            raise argparse.ArgumentTypeError(f"{text!r}: give an integer >= {minimum}")
        return int(text)

    return parse


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench comm` in the sub-benchmarks `benchmarks`."""
    comm = benchmarks.add_parser(
        "comm", help="time DDP's gradient all-reduce over bucket sizes and comm hooks",
        description="Time what DDP's gradient communication costs per step for the model and micro-batch a "
                    "recipe trains, over a grid of bucket sizes (dist.bucket_cap_mb) and comm hooks "
                    "(dist.comm_hook) on the current backend: under torchrun on the launched processes, "
                    "otherwise on --nproc local processes it starts. Prints a table (buckets built, bytes sent "
                    "per step, ms per step, exposed communication), the setting with the least exposed "
                    "communication as the overrides to train with, and writes it all as JSON.",
        epilog="Any recipe field can be overridden as --section.field VALUE, e.g. --model.name resnet18 "
               "--data.micro_batch 32 --dist.first_bucket_cap_mb 0.5 (see `largebatch train --help`); the "
               "bucket size and the hook are the grid's. Under torchrun: torchrun --nproc-per-node N -m "
               "largebatch bench comm ...")
    comm.add_argument("--recipe", default=recipes.SGD_RECIPE, help=f"the recipe whose model and micro-batch are "
                      f"measured (default {recipes.SGD_RECIPE})")
    comm.add_argument("--bucket-mb", type=bucket_sizes, default=DEFAULT_BUCKETS_MB, metavar="MB,...",
                      help="bucket sizes (dist.bucket_cap_mb) to measure (default 1,5,25,100)")
    comm.add_argument("--hooks", type=hook_names, metavar="HOOK,...", help=f"comm hooks to measure, of "
                      f"{', '.join(HOOKS)} (default none,fp16,bf16 less those the backend cannot carry)")
    comm.add_argument("--nproc", type=at_least(2), help="local processes to start when not under torchrun "
                      "(default 2)")
    comm.add_argument("--warmup", type=at_least(2), default=3, help="untimed steps first; DDP rebuilds its "
                      "buckets after the first (default 3)")
    comm.add_argument("--repeats", type=at_least(1), default=10, help="timed steps, with and without the "
                      "all-reduce, whose medians are reported (default 10)")
    comm.add_argument("--json", type=Path, default=Path("bench_comm.json"), help="where the JSON goes (default "
                      "bench_comm.json in the current directory)")
    comm.set_defaults(func=cmd_bench_comm)


def with_dist(cfg: Config, **changes: Any) -> Config:
    """`cfg` with fields of its dist section changed (unchecked: the callers' values are checked)."""
    return dataclasses.replace(cfg, dist=dataclasses.replace(cfg.dist, **changes))


def hooks_to_measure(cfg: Config, requested: tuple[str, ...] | None) -> tuple[str, ...]:
    """The hooks asked for, each one the device and backend can carry (else an error naming --hooks), or
    by default those of DEFAULT_HOOKS that they can carry."""

    def refusal(hook: str) -> str:
        try:
            check_device(with_dist(cfg, comm_hook=hook))
        except ConfigError as e:
            return str(e)
        return ""

    if requested is None:
        return tuple(hook for hook in DEFAULT_HOOKS if not refusal(hook))
    for hook in requested:
        if why := refusal(hook):
            raise ConfigError(f"--hooks {hook}: {why}")
    return requested


def cmd_bench_comm(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Check everything before a process starts, measure the grid, then (on rank 0) the table and the JSON."""
    from largebatch.cli import parse_overrides  # the command line imports this module

    overrides = parse_overrides(extra)
    for key, option in SWEPT.items():
        if key in overrides:
            raise ConfigError(f"--{key}: bench comm measures a grid of it; give {option}")
    cfg = load_config(args.recipe, overrides)
    launched = launched_world_size()
    if launched > 1 and args.nproc is not None:
        raise ConfigError(f"--nproc {args.nproc}: under torchrun the {launched} launched processes are measured")
    nproc = launched if launched > 1 else args.nproc or 2
    plan_batches(cfg.data, nproc)
    check_data_path(cfg)
    check_device(with_dist(cfg, comm_hook="none"))
    hooks = hooks_to_measure(cfg, args.hooks)

    from largebatch.bench.comm_timing import Grid, measure_launched, measure_spawned

    grid = Grid(hooks, args.bucket_mb, args.warmup, args.repeats)
    result = measure_launched(cfg, grid) if launched > 1 else measure_spawned(cfg, grid, nproc)
    if not is_main_process():
        return 0
    best = min(result.rows, key=lambda row: row.exposed_ms)
    print(table(cfg, grid, result))
    print(f"best: {best_overrides(best)} (the least exposed communication: {best.exposed_ms:.1f} ms of "
          f"{best.step_ms:.1f} ms per step)")
    write_json(args.json, cfg, overrides, grid, result, best)
    print(f"JSON: {args.json}")
    return 0


def best_overrides(row: CommRow) -> str:
    """The row's setting as the options that train with it."""
    return f"--dist.bucket_cap_mb {row.bucket_cap_mb:g} --dist.comm_hook {row.hook}"


def table(cfg: Config, grid: Grid, result: CommResult) -> str:
    """A header saying what was measured, then one line per grid point."""
    r = result
    lines = [f"{cfg.model.name} ({cfg.recipe}): {r.gradient_bytes / MIB:.2f} MiB of gradients, micro-batch "
             f"{r.micro_batch}, {r.world_size} processes on {r.backend} ({r.device}, {r.threads} thread(s) each), "
             f"first bucket {cfg.dist.first_bucket_cap_mb:g} MiB; medians of {grid.repeats} steps after "
             f"{grid.warmup} warm-up",
             "ms/step: forward + backward of one micro-batch with DDP's all-reduce; exposed comm: minus the same "
             "step under no_sync",
             f"{'hook':<18} {'bucket MiB':>10} {'buckets':>7} {'MiB sent/step':>13} {'ms/step':>9} "
             f"{'exposed comm ms':>15}"]
    for row in r.rows:
        lines.append(f"{row.hook:<18} {row.bucket_cap_mb:>10g} {len(row.bucket_bytes):>7} "
                     f"{row.bytes_per_step / MIB:>13.3f} {row.step_ms:>9.2f} {row.exposed_ms:>15.2f}")
    return "\n".join(lines)


def write_json(path: Path, cfg: Config, overrides: dict[str, Any], grid: Grid, result: CommResult,
               best: CommRow) -> None:
    """The table as JSON: what was measured (recipe, overrides, model, machine), every row, the best."""
    rows = [dataclasses.asdict(row) | {"buckets": len(row.bucket_bytes)} for row in result.rows]
    write_record(path, "bench_comm", {
        "recipe": cfg.recipe, "overrides": overrides, "model": cfg.model.name,
        "first_bucket_cap_mb": cfg.dist.first_bucket_cap_mb, "warmup": grid.warmup, "repeats": grid.repeats,
        **{k: v for k, v in dataclasses.asdict(result).items() if k != "rows"},
        "rows": rows, "best": rows[result.rows.index(best)], "best_overrides": best_overrides(best)})
