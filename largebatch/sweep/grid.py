"""The grid file of `largebatch sweep`: which runs a sweep makes, each one a validated Config.

A grid is TOML:

    [sweep]
    name = "quick"                # the sweep directory under out_dir (default: the grid file's stem)
    out_dir = "sweeps"            # relative to the working directory, as run.out_dir is (default "sweeps")
    batches = [256, 1024, 4096]   # global batches: data.global_batch of the runs
    seeds = [0]                   # run.seed of the runs (default [0])
    target_accuracy = 0.85        # run.target_accuracy of every run, and the target of steps-to-target
    stop_at_target = false        # run.stop_at_target of every run (default false)
    baseline = "sgd_goyal"        # optional: the method whose smallest-batch accuracy every method is
                                  # compared with (default: each method's own smallest batch)
    [sweep.overrides]             # fields set in every run: "schedule.epochs" = 4 (or schedule.epochs = 4)
    [sweep.vary]                  # optional: field -> list of values, crossed with everything else,
                                  # e.g. "optim.base_lr" = [0.05, 0.1]

    [[method]]                    # one or more
    name = "sgd_goyal"            # letters, digits, '_' and '.'; names the method's run directories
    recipe = "fmnist_goyal"       # a recipe name, or a TOML path (relative: to the grid file's directory)
    seeds = [0, 1]                # optional: this method's seeds instead of [sweep] seeds (e.g. more seeds
                                  # for the baseline and the best large-batch method only)
    [method.overrides]            # fields set in this method's runs, e.g. "optim.scaling" = "none"

The runs are method × vary values × batch × seed, in that order of nesting. A run's config is its
recipe with the sweep's overrides, then the method's, then its vary values, batch and seed applied;
the sweep alone sets data.global_batch, run.seed, run.target_accuracy, run.stop_at_target,
run.out_dir, run.name, run.progress (off: the sweep prints one line per run) and
run.stop_after_epochs (0: every run trains to its end), so an override of one of those is refused.
A run's directory is out_dir/name/<method>-b<batch>-s<seed>, followed by -<field>=<value> for each
vary field (a '/' in a value written '_').

Every config is built and validated when the grid is planned, before anything runs, so a typo or a
batch that does not divide fails at once, naming the key or the method and batch. Nothing here
imports torch.
"""

from __future__ import annotations

import itertools
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largebatch.api import check_launch, load_config
from largebatch.config import Config, ConfigError
from largebatch.recipes import locate_toml

GRID_DIR = Path(__file__).resolve().parents[1] / "sweeps"
"""The grids shipped with the package, named by their stem (`largebatch sweep quick`)."""

SWEEP_KEYS = ("name", "out_dir", "batches", "seeds", "target_accuracy", "stop_at_target", "baseline", "overrides",
              "vary")
METHOD_KEYS = ("name", "recipe", "seeds", "overrides")
SWEEP_OWNED = {"data.global_batch": "[sweep] batches", "run.seed": "[sweep] seeds",
               "run.target_accuracy": "[sweep] target_accuracy", "run.stop_at_target": "[sweep] stop_at_target",
               "run.out_dir": "[sweep] out_dir", "run.name": "the sweep (one directory per run)",
               "run.progress": "the sweep (one line per run)",
               "run.stop_after_epochs": "the sweep (every run trains to its end)"}
"""Fields the sweep sets in every run, and what sets them."""

_NAME = re.compile(r"^[A-Za-z0-9_.]+$")


@dataclass(frozen=True)
class Method:
    """One way of training: a recipe and the fields that make it this method."""

    name: str
    recipe: str  # a recipe name, or the path of a TOML file
    overrides: Mapping[str, Any]
    seeds: tuple[int, ...] | None = None  # None: the sweep's seeds


@dataclass(frozen=True)
class Grid:
    """A parsed, checked grid file (the configs are built by `plan_runs`)."""

    path: Path
    name: str
    out_dir: Path
    batches: tuple[int, ...]  # ascending
    seeds: tuple[int, ...]
    target_accuracy: float
    stop_at_target: bool
    baseline: str | None
    overrides: Mapping[str, Any]
    vary: Mapping[str, tuple[Any, ...]]
    methods: tuple[Method, ...]

    @property
    def sweep_dir(self) -> Path:
        return self.out_dir / self.name


@dataclass(frozen=True)
class RunSpec:
    """One run of the sweep: where it stands in the grid, its config and its directory."""

    method: str
    vary: tuple[tuple[str, Any], ...]  # (field, value) of each vary field, in the grid's order
    batch: int
    seed: int
    config: Config
    run_dir: Path

    @property
    def series(self) -> str:
        return series_name(self.method, self.vary)

    @property
    def label(self) -> str:
        return f"{self.series} b={self.batch} seed {self.seed}"


def locate_grid(name_or_path: str) -> Path:
    """The TOML file of a shipped grid's name, or the given path if it names a file."""
    return locate_toml(name_or_path, GRID_DIR, "grid")


def load_grid(name_or_path: str) -> Grid:
    """Parse and check a grid file; every key is known and every value of the right kind, or a
    ConfigError names it. Field names and values are checked later, by `plan_runs`."""
    path = locate_grid(name_or_path)
    try:
        tree = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"grid file {path} is not valid TOML: {e}") from None
    _check_keys("the grid file", tree, ("sweep", "method"))
    sweep = tree.get("sweep")
    if not isinstance(sweep, dict):
        raise ConfigError(f"{path}: a grid needs a [sweep] table")
    _check_keys("[sweep]", sweep, SWEEP_KEYS)
    entries = tree.get("method")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{path}: a grid needs one or more [[method]] tables")
    methods = tuple(_method(entry, i, path.parent) for i, entry in enumerate(entries))
    names = [m.name for m in methods]
    if len(set(names)) < len(names):
        raise ConfigError(f"[[method]] name: each method needs its own name, got {', '.join(names)}")
    baseline = sweep.get("baseline")
    if baseline is not None and baseline not in names:
        raise ConfigError(f"[sweep] baseline = {baseline!r}: not a method of the grid ({', '.join(names)})")
    name = sweep.get("name", path.stem)
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"[sweep] name = {name!r}: letters, digits, '_' and '.' only")
    out_dir = sweep.get("out_dir", "sweeps")
    if not isinstance(out_dir, str) or not out_dir:
        raise ConfigError(f"[sweep] out_dir = {out_dir!r}: expected a directory path")
    target = sweep.get("target_accuracy")
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        raise ConfigError(f"[sweep] target_accuracy = {target!r}: a fraction in (0, 1] is required (the accuracy "
                          "whose steps-to-target the sweep reports)")
    stop = sweep.get("stop_at_target", False)
    if not isinstance(stop, bool):
        raise ConfigError(f"[sweep] stop_at_target = {stop!r}: expected true or false")
    vary = _table("[sweep.vary]", sweep.get("vary", {}))
    for key, values in vary.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"[sweep.vary] {key} = {values!r}: expected a non-empty list of values")
    return Grid(path=path, name=name, out_dir=Path(out_dir), batches=tuple(sorted(_ints("batches", sweep, 1))),
                seeds=tuple(_ints("seeds", sweep, 0, default=[0])), target_accuracy=float(target),
                stop_at_target=stop, baseline=baseline, overrides=_overrides("[sweep.overrides]", sweep),
                vary={key: tuple(values) for key, values in _owned_checked("[sweep.vary]", vary).items()},
                methods=methods)


def plan_runs(grid: Grid) -> list[RunSpec]:
    """Every run of the grid with its validated config, in the grid's order; a config that does not
    build (a bad field or value, a batch that does not divide) raises a ConfigError naming the method
    and batch, before any run starts."""
    runs = []
    for method in grid.methods:
        for values in itertools.product(*grid.vary.values()):
            vary = tuple(zip(grid.vary, values))
            for batch, seed in itertools.product(grid.batches, method.seeds or grid.seeds):
                run_name = "-".join([f"{method.name}-b{batch}-s{seed}",
                                     *(f"{key}={format_value(value)}".replace("/", "_") for key, value in vary)])
                owned = {"data.global_batch": batch, "run.seed": seed, "run.target_accuracy": grid.target_accuracy,
                         "run.stop_at_target": grid.stop_at_target, "run.out_dir": str(grid.sweep_dir),
                         "run.name": run_name, "run.progress": False, "run.stop_after_epochs": 0}
                overrides = {**grid.overrides, **method.overrides, **dict(vary), **owned}
                try:
                    config = load_config(method.recipe, overrides)
                    check_launch(config, world_size=1)  # the sweep trains in this one process
                except ConfigError as e:
                    where = ", ".join([f"method {method.name!r}", *(f"{k} = {v!r}" for k, v in vary),
                                       f"batch {batch}"])
                    raise ConfigError(f"{where}: {e}") from None
                runs.append(RunSpec(method.name, vary, batch, seed, config, grid.sweep_dir / run_name))
    dirs = [run.run_dir for run in runs]
    if len(set(dirs)) < len(dirs):
        twice = next(d for d in dirs if dirs.count(d) > 1)
        raise ConfigError(f"[sweep.vary]: two runs would share the directory {twice}: give each value once (a '/' "
                          "in a value is written '_' in the name)")
    return runs


def series_name(method: str, vary: Sequence[tuple[str, Any]]) -> str:
    """What a line of the plots and a block of the tables stand for: a method with its vary values."""
    return " ".join([method, *(f"{key}={format_value(value)}" for key, value in vary)])


def format_value(value: Any) -> str:
    """A field value as it appears in run names and labels: TOML's spelling of booleans, lists joined by commas."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return ",".join(map(format_value, value))
    return str(value)


def _method(entry: Any, index: int, grid_dir: Path) -> Method:
    where = f"[[method]] #{index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: expected a table")
    _check_keys(where, entry, METHOD_KEYS)
    name, recipe = entry.get("name"), entry.get("recipe")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{where} name = {name!r}: required; letters, digits, '_' and '.' only")
    if not isinstance(recipe, str) or not recipe:
        raise ConfigError(f"[[method]] {name!r}: recipe is required (a recipe name or the path of a TOML file)")
    if (recipe.endswith(".toml") or "/" in recipe) and not Path(recipe).is_absolute():
        recipe = str(grid_dir / recipe)
    seeds = tuple(_ints("seeds", entry, 0, where=f"[[method]] {name!r}")) if "seeds" in entry else None
    return Method(name, recipe, _overrides(f"[[method]] {name!r} overrides", entry), seeds)


def _check_keys(where: str, table: Mapping[str, Any], allowed: Sequence[str]) -> None:
    for key in table:
        if key not in allowed:
            raise ConfigError(f"{where}: unknown key {key!r}; the keys are {', '.join(allowed)}")


def _table(where: str, value: Any) -> dict[str, Any]:
    """A table of fields as {dotted field: value}: `schedule.epochs = 4` and `"schedule.epochs" = 4` alike."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table of fields, got {value!r}")
    flat: dict[str, Any] = {}
    for key, item in value.items():
        if isinstance(item, dict):
            flat.update({f"{key}.{sub}": v for sub, v in _table(where, item).items()})
        else:
            flat[key] = item
    return flat


def _overrides(where: str, parent: Mapping[str, Any]) -> dict[str, Any]:
    return _owned_checked(where, _table(where, parent.get("overrides", {})))


def _owned_checked(where: str, fields: dict[str, Any]) -> dict[str, Any]:
    """`fields`, unless one of them is a field the sweep sets itself."""
    for key in fields:
        if key in SWEEP_OWNED:
            raise ConfigError(f"{where}: {key} is set by {SWEEP_OWNED[key]}, not by overrides")
    return fields


def _ints(key: str, table: Mapping[str, Any], low: int, default: list[int] | None = None,
          where: str = "[sweep]") -> list[int]:
    """A non-empty list of distinct integers >= low."""
    values = table.get(key, default)
    if (not isinstance(values, list) or not values
            or any(isinstance(v, bool) or not isinstance(v, int) or v < low for v in values)):
        raise ConfigError(f"{where} {key} = {values!r}: expected a non-empty list of integers >= {low}")
    if len(set(values)) < len(values):
        raise ConfigError(f"{where} {key} = {values!r}: each value once")
    return values
