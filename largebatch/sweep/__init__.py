"""Batch-size sweeps (`largebatch sweep GRID`): accuracy against batch size as in Goyal et al. 2017's
table, and steps to a target accuracy against batch size as in Shallue et al. 2019.

- `grid`: the grid file (format in its docstring) and the runs it makes, each a validated Config.
- `status`: where a run stands on disk (new, done, resume, restart, changed).
- `runner`: trains the runs one after another through `largebatch.run`, one line per run.
- `records`: the records of a run's metrics.jsonl that a sweep reads.
- `analysis`: steps to target, mean and std over seeds, the batch within 1 point, scaling
  efficiency and the bend, from plain numbers.
- `results`: results.json and results.md from the finished runs; `figures`: the three PNGs.
- `command`: the `sweep` subcommand (`add_sweep_command`).

Only `status` and `runner` import torch.
"""

from largebatch.sweep.analysis import bend, scaling_efficiencies, steps_to_target
from largebatch.sweep.grid import Grid, RunSpec, load_grid, plan_runs

__all__ = ["Grid", "RunSpec", "bend", "load_grid", "plan_runs", "scaling_efficiencies", "steps_to_target"]
