"""`largebatch sweep GRID`: train a grid of methods × batch sizes × seeds (`grid`), one run after
another in this process (`runner`), and write the accuracy-vs-batch table, steps to target and the
figures into the sweep directory (`results`, `figures`).

Every config of the grid is built before the first run, so a bad grid fails before anything is
written. The command can be run again at any time: finished runs are skipped, interrupted ones
resume from their checkpoint, and the results are rebuilt from all finished runs of the grid.
Parsing the grid and --help run without torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Sequence

from largebatch.api import launched_world_size
from largebatch.errors import ConfigError
from largebatch.sweep.figures import write_figures
from largebatch.sweep.grid import Grid, RunSpec, load_grid, plan_runs
from largebatch.sweep.results import JSON_NAME, MARKDOWN_NAME, build_report, markdown, write_json, write_markdown

DESCRIPTION = """\
Train every run of a grid file (methods x global batches x seeds, and any [sweep.vary] values), one
after another in this process, then write results.md and results.json (final accuracy mean and std
over seeds, steps to the target accuracy, scaling efficiency and the bend, per method and batch) and
three figures into the sweep directory. Run it again to continue: finished runs are skipped, an
interrupted run resumes from its checkpoint (Ctrl-C stops the sweep after a checkpoint)."""
EPILOG = """\
examples:
  largebatch sweep quick --dry-run        # the shipped grid: its runs and where each stands
  largebatch sweep quick                  # train what is left, then write the results
  largebatch sweep my_grid.toml --only lars,sgd_goyal
  largebatch sweep my_grid.toml --only kfac --batches 4096,16384
  largebatch sweep quick --report-only    # rebuild the results from the finished runs

The grid format is described in largebatch/sweep/grid.py; largebatch/sweeps/quick.toml is an example."""


def add_sweep_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `largebatch sweep` to the CLI's subcommands (an argparse subparsers object)."""
    sweep = commands.add_parser("sweep", help="train a grid of methods x batch sizes x seeds and tabulate accuracy "
                                "and steps to target against batch size", description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sweep.set_defaults(func=cmd_sweep)
    sweep.add_argument("grid", help="a shipped grid's name (quick) or the path of a grid TOML file")
    mode = sweep.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="list the runs and where each stands; train nothing")
    mode.add_argument("--report-only", action="store_true", help="rebuild the results and figures from the "
                      "finished runs on disk; train nothing")
    sweep.add_argument("--only", metavar="NAME[,NAME...]", help="train (or list) only these methods; the results "
                       "still cover every finished run of the grid")
    sweep.add_argument("--batches", metavar="B[,B...]", help="train (or list) only the runs at these global batches "
                       "(of the grid's), e.g. the large ones of a slow method first")
    return sweep


def cmd_sweep(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}: fields of the runs are set in the grid file")
    if launched_world_size() > 1:
        raise ConfigError("largebatch sweep trains its runs one after another in one process: run it without "
                          "torchrun")
    grid = load_grid(args.grid)
    runs = plan_runs(grid)
    chosen = _chosen(grid, args.only)
    batches = _chosen_batches(grid, args.batches)
    # These import torch; parsing and checking the grid above, and --help, do not.
    from largebatch.sweep.runner import run_sweep
    from largebatch.sweep.status import CHANGED, DONE, run_status

    statuses = [run_status(spec) for spec in runs]
    todo = [(spec, status) for spec, status in zip(runs, statuses) if spec.method in chosen and spec.batch in batches]
    if args.dry_run:
        for number, (spec, status) in enumerate(todo, 1):
            print(f"[{number}/{len(todo)}] {spec.label}: {status.describe()}  {spec.run_dir}")
        return 0
    failed: Sequence[str] = ()
    if not args.report_only:
        changed = [f"{spec.run_dir}: {'; '.join(status.changes)}" for spec, status in todo if status.state == CHANGED]
        if changed:
            raise ConfigError("the grid no longer gives these runs the config they were made with (field: on disk -> "
                              "in the grid):\n  " + "\n  ".join(changed) + "\ndelete their directories to train them "
                              "with the grid's config, or undo the change to the grid")
        outcome = run_sweep([spec for spec, _ in todo], [status for _, status in todo],
                            lambda line: print(line, flush=True))
        if outcome.stopped_by:
            return 128 + signal.Signals[outcome.stopped_by].value
        failed = outcome.failed
        statuses = [run_status(spec) for spec in runs]
    _report(grid, runs, [None if status.state == DONE else status.describe() for status in statuses])
    if failed:
        print(f"largebatch sweep: {len(failed)} run(s) stopped on a non-finite loss: {', '.join(failed)} (set "
              "\"run.on_nonfinite\" = \"skip\" in the grid's overrides to let them finish)", file=sys.stderr)
        return 1
    return 0


def _chosen(grid: Grid, only: str | None) -> set[str]:
    """The methods --only names (all of them without it); an unknown name is an error."""
    names = [m.name for m in grid.methods]
    if only is None:
        return set(names)
    chosen = {name.strip() for name in only.split(",") if name.strip()}
    unknown = sorted(chosen - set(names))
    if unknown or not chosen:
        raise ConfigError(f"--only {only}: the grid's methods are {', '.join(names)}")
    return chosen


def _chosen_batches(grid: Grid, text: str | None) -> set[int]:
    """The global batches --batches names (all of the grid's without it); one the grid lacks is an error."""
    if text is None:
        return set(grid.batches)
    try:
        chosen = {int(item) for item in text.split(",") if item.strip()}
    except ValueError:
        chosen = set()
    if not chosen or chosen - set(grid.batches):
        raise ConfigError(f"--batches {text}: the grid's batches are {', '.join(map(str, grid.batches))}")
    return chosen


def _report(grid: Grid, runs: Sequence[RunSpec], pending: Sequence[str | None]) -> None:
    """Write and print the results of the grid's finished runs (`pending`: None for those)."""
    report = build_report(grid, list(zip(runs, pending)))
    paths = [write_markdown(report, grid.sweep_dir / MARKDOWN_NAME), write_json(report, grid.sweep_dir / JSON_NAME),
             *write_figures(report, grid.sweep_dir)]
    print()
    print(markdown(report))
    print(f"wrote {', '.join(p.name for p in paths)} in {grid.sweep_dir}")
