"""`largebatch report RUN_DIR...`: figures and a one-screen summary of finished or running runs.

Each quantity a run records gets one PNG with every run overlaid (the legend label is the run
directory's name; a run keeps one colour in every figure), so runs of different batch sizes or
optimizers are compared on the same axes. A quantity no run records is skipped, and the summary says
which. The summary (printed, and written as summary.txt beside the figures) has two tables, the setup
of each run and what it reached, each within about 100 columns.

The inputs are config.toml and metrics.jsonl only: this module reads JSON and TOML and never imports
torch, so `largebatch report` starts in the time matplotlib takes to load. A path that is not a run
directory, or a damaged line of its metrics, is a ConfigError naming the path (and line), as
`run_dir.require_run` reports a directory that holds no run.
"""

from __future__ import annotations

import argparse
import bisect
import math
import statistics
import textwrap
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largebatch.errors import ConfigError
from largebatch.metrics import METRICS_NAME, read_metrics
from largebatch.plots import Series, line_figure
from largebatch.run_dir import CONFIG_NAME, write_text_atomic
from largebatch.scaling.cli import format_duration

DEFAULT_OUT = Path("report")
SUMMARY_NAME = "summary.txt"
X_AXES = ("step", "epoch")
NAME_WIDTH = 20  # longer run names are shortened in the middle in the summary's tables (not in figures)
TEXT_WIDTH = 100  # the summary's lines after the tables are wrapped to this


@dataclass(frozen=True)
class Run:
    """A run directory as the report reads it: its resolved config and every metrics record, in order."""

    path: Path
    label: str  # legend and table name: the directory's name, or the path as given when names clash
    config: dict[str, Any]
    records: list[dict[str, Any]]

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [r for r in self.records if r["kind"] == kind]

    def epochs_at(self, steps: Sequence[int]) -> list[float]:
        """The fractional epoch after each of `steps` optimizer steps, from the epochs the trainer wrote
        into its train and epoch records (so a batch ramp or a resume at another batch is accounted as
        the trainer accounts it): linear between those records, which is exact within a batch phase, and
        on the last segment's slope beyond the last; nan where the run has no such record yet."""
        known = {0: 0.0} | {r["step"]: float(r["epoch"]) for r in self.records
                            if r["kind"] in ("train", "epoch") and "epoch" in r}
        anchors = sorted(known)
        if len(anchors) < 2:
            return [0.0 if s == 0 else math.nan for s in steps]
        epochs = []
        for s in steps:
            i = min(max(bisect.bisect_left(anchors, s), 1), len(anchors) - 1)  # the segment ending at anchor i
            a, b = anchors[i - 1], anchors[i]
            epochs.append(known[a] + (s - a) * (known[b] - known[a]) / (b - a))
        return epochs


def load_runs(paths: Sequence[Path]) -> list[Run]:
    """Read each run directory; one that holds no metrics.jsonl or config.toml, or whose config.toml is
    not TOML, raises ConfigError naming it (a damaged metrics line: see `read_metrics`)."""
    loaded = []
    for path in map(Path, paths):
        missing = [name for name in (METRICS_NAME, CONFIG_NAME) if not (path / name).is_file()]
        if missing:
            raise ConfigError(f"{path} is not a run directory: it holds no {' or '.join(missing)}")
        try:
            config = tomllib.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path / CONFIG_NAME} is not valid TOML: {e}") from None
        loaded.append((path, config, read_metrics(path)))
    names = [path.name for path, _, _ in loaded]
    clash = len(set(names)) < len(names)  # runs/a/run and runs/b/run: the paths tell them apart
    return [Run(path, str(path) if clash else path.name, config, records) for path, config, records in loaded]


def _number(value: Any) -> float:
    """A record's value as a float; the logger writes non-finite floats as the strings 'nan', 'inf'."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return math.nan
    try:
        return float(value)
    except ValueError:
        return math.nan


# ------------------------------------------------------------------------------------------------
# Figures


@dataclass(frozen=True)
class Quantity:
    """A value of one record kind drawn against the step (or, for per-epoch records, the epoch)."""

    file: str
    kind: str
    key: str
    title: str
    ylabel: str
    logy: bool = False
    scale: float = 1.0
    per_epoch: bool = False  # x is the record's own "epoch" (evaluations happen at epoch ends)


QUANTITIES = (
    Quantity("lr.png", "train", "lr", "learning rate (scaling rule, warmup, decay)", "learning rate"),
    Quantity("train_loss.png", "train", "loss", "training loss (mean over each log window)", "loss"),
    Quantity("test_accuracy.png", "epoch", "test_accuracy", "test accuracy", "test accuracy (%)", scale=100.0,
             per_epoch=True),
    Quantity("images_per_s.png", "train", "images_per_s", "throughput (per log window)", "images/s"),
    Quantity("gns_b_simple.png", "train", "gns_b_simple", "gradient noise scale B_simple (McCandlish et al. 2018)",
             "B_simple (samples)", logy=True),
    Quantity("grad_norm.png", "train", "grad_norm", "global gradient norm before clipping (mean per log window)",
             "L2 norm", logy=True),
)
TRUST_FILE = "trust_ratio.png"
RECORD_FIELDS = ("kind", "step", "time")  # what every record holds besides its values


@dataclass(frozen=True)
class Figure:
    """One PNG to write: its series and axes, as `largebatch.plots.line_figure` takes them."""

    file: str
    series: list[Series]
    xlabel: str
    ylabel: str
    title: str
    logy: bool


@dataclass(frozen=True)
class FigurePlan:
    """The figures the runs give, the quantities none of them records, and a line for each run whose
    points of a figure were left out (not finite, or not positive on a log axis)."""

    figures: list[Figure]
    skipped: list[str]
    notes: list[str]


def _drawable(values: list[float], logy: bool) -> list[float]:
    """`values` with those a figure cannot draw set to nan (matplotlib leaves a gap there)."""
    return [v if math.isfinite(v) and (v > 0 or not logy) else math.nan for v in values]


def _left_out(what: str, xs: list[float], drawn: list[float]) -> list[str]:
    """A note when some points of a line are not drawn, so that a gap in it is never unexplained."""
    missing = sum(math.isnan(x) or math.isnan(y) for x, y in zip(xs, drawn))
    if not missing:
        return []
    return [f"{what}: {missing} of {len(xs)} points not drawn (not finite, <= 0 on a log axis, or at a step "
            "no epoch is recorded for yet)"]


def _steps_or_epochs(run: Run, records: list[dict[str, Any]], x: str) -> list[float]:
    steps = [r["step"] for r in records]
    return run.epochs_at(steps) if x == "epoch" else steps


def plan_figures(runs: Sequence[Run], x: str = "step") -> FigurePlan:
    """The figures of `runs`, step-based quantities against `x` ("step" or "epoch"; epochs put runs of
    different batch sizes, which take different numbers of steps per epoch, on one axis)."""
    figures, skipped, notes = [], [], []
    colours = {run.label: {"color": f"C{i % 10}"} for i, run in enumerate(runs)}
    for q in QUANTITIES:
        series = []
        for run in runs:
            records = [r for r in run.of_kind(q.kind) if q.key in r]
            if not records:
                continue
            xs = [r["epoch"] for r in records] if q.per_epoch else _steps_or_epochs(run, records, x)
            y = [q.scale * _number(r[q.key]) for r in records]
            drawn = _drawable(y, q.logy)
            notes += _left_out(f"{q.file}, {run.label}", xs, drawn)
            series.append(Series(run.label, xs, drawn, style=colours[run.label]))
        if series:
            figures.append(Figure(q.file, series, "epoch" if q.per_epoch else x, q.ylabel, q.title, q.logy))
        else:
            skipped.append(f"{q.key} ({q.kind} records)")
    trust = []
    for run in runs:
        series, left_out = _trust_series(run, x, colours[run.label])
        trust += series
        notes += left_out
    if trust:
        figures.append(Figure(TRUST_FILE, trust, x, "trust ratio",
                              "layer-wise trust ratios: median over layers (solid), min and max (dotted)", True))
    else:
        skipped.append("per-layer trust ratios (trust records)")
    return FigurePlan(figures, skipped, notes)


def _trust_series(run: Run, x: str, style: dict[str, str]) -> tuple[list[Series], list[str]]:
    """The median, min and max over layers of each trust record of `run` (no series without such
    records), and notes on points not drawn.

    Runs of different models have different layers, and a deep one has dozens (too many lines for one
    legend), so per-run statistics across layers are what can be overlaid: the median shows the level
    of the layer-wise lr, the min-max band how far the layers' ratios differ, which is why LARS/LAMB
    exist at all. Ratios span decades across layers, so the axis is logarithmic."""
    records = run.of_kind("trust")
    if not records:
        return [], []
    per_layer = [[_number(v) for k, v in r.items() if k not in RECORD_FIELDS] for r in records]
    per_layer = [[v for v in values if math.isfinite(v)] for values in per_layer]
    xs = _steps_or_epochs(run, records, x)
    series, notes = [], []
    for name, statistic in (("median", statistics.median), ("min", min), ("max", max)):
        label = f"{run.label} {name}"
        y = [statistic(values) if values else math.nan for values in per_layer]
        drawn = _drawable(y, logy=True)
        notes += _left_out(f"{TRUST_FILE}, {label}", xs, drawn)
        series.append(Series(label, xs, drawn,
                             style=style | ({} if name == "median" else {"linestyle": ":", "linewidth": 1.0})))
    return series, notes


# ------------------------------------------------------------------------------------------------
# Summary


@dataclass(frozen=True)
class RunSummary:
    """What a run was and what it reached, from its records (None: the run recorded nothing for it)."""

    label: str
    recipe: str
    global_batches: tuple[int, ...]  # the first; and the last train record's, where a batch ramp changed it
    optimizer: str  # optim.name, "+kfac" with the K-FAC preconditioner
    world_size: int | None
    target_accuracy: float  # run.target_accuracy; 0 when none was set
    status: str  # finished | at target | stopped | not finished
    steps: int
    total_steps: int | None
    epochs: float | None
    final_accuracy: float | None  # of the last evaluation
    best_accuracy: float | None
    time_to_accuracy_s: float | None  # elapsed at the first evaluation at or above the target
    wall_s: float | None
    median_images_per_s: float | None
    skipped_steps: int
    restarts: int


def summarize(run: Run) -> RunSummary:
    """The summary of one run. World size and planned steps are the last session's plan (a resume may
    change them); the global batch is the plan's, and the last train record's where a batch ramp grew it.

    Status: "finished" after a run_final event; "at target" when that run ended early at
    run.target_accuracy (run.stop_at_target); "stopped" when the last session ended on a signal or
    run.stop_after_epochs (session_stop); "not finished" when no session ended (running, or crashed).
    Wall time is run_final's wall_s, else the latest elapsed time recorded (both count from the run's
    start across resumes)."""
    cfg_optim, cfg_run = run.config.get("optim", {}), run.config.get("run", {})
    plans, evals = run.of_kind("plan"), run.of_kind("epoch")
    plan = plans[-1] if plans else {}
    ends = [r for r in run.of_kind("mlperf") if r.get("key") in ("run_final", "session_stop")]
    last_end = ends[-1] if ends else {}
    if last_end.get("key") == "run_final":
        status = "at target" if last_end.get("stopped_at_target") else "finished"
        wall = _number(last_end.get("wall_s"))
    else:
        status = "stopped" if last_end else "not finished"
        times = [_number(r.get("wall_s", r.get("elapsed_s"))) for r in run.records]
        wall = max((t for t in times if math.isfinite(t)), default=math.nan)
    accuracies = [_number(r.get("test_accuracy")) for r in evals]
    target = float(cfg_run.get("target_accuracy", 0.0))
    reached = [_number(r.get("elapsed_s")) for r, a in zip(evals, accuracies) if target and a >= target]
    rates = [v for v in (_number(r.get("images_per_s")) for r in run.of_kind("train")) if math.isfinite(v)]
    steps = max((r["step"] for r in run.records), default=0)
    epochs = run.epochs_at([steps])[0]
    first_batch = plan.get("global_batch", run.config.get("data", {}).get("global_batch"))
    last_batch = next((r["global_batch"] for r in reversed(run.of_kind("train")) if "global_batch" in r), first_batch)
    optimizer = cfg_optim.get("name", "?")
    if cfg_optim.get("preconditioner", "none") != "none":
        optimizer += f"+{cfg_optim['preconditioner']}"
    return RunSummary(
        label=run.label, recipe=Path(str(run.config.get("recipe", "?"))).stem,
        global_batches=tuple(dict.fromkeys(b for b in (first_batch, last_batch) if b is not None)),
        optimizer=optimizer, world_size=plan.get("world_size"), target_accuracy=target, status=status,
        steps=steps, total_steps=plan.get("total_steps"),
        epochs=None if math.isnan(epochs) else epochs,
        final_accuracy=accuracies[-1] if accuracies else None,
        best_accuracy=max((a for a in accuracies if math.isfinite(a)), default=None),
        time_to_accuracy_s=reached[0] if reached else None, wall_s=wall if math.isfinite(wall) else None,
        median_images_per_s=statistics.median(rates) if rates else None,
        skipped_steps=len(run.of_kind("skip")), restarts=len(run.of_kind("restart")))


def _short(name: str, width: int = NAME_WIDTH) -> str:
    """`name` in at most `width` characters, its middle replaced by '~' when too long (run names differ
    at both ends: recipe in front, timestamp or batch at the back)."""
    if len(name) <= width:
        return name
    head = (width - 1) // 2
    return f"{name[:head]}~{name[len(name) - (width - 1 - head):]}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Columns two spaces apart: the first left-aligned (names), the others right-aligned, except
    those whose header ends with '<' (text), left-aligned with the '<' dropped."""
    left = [i == 0 or h.endswith("<") for i, h in enumerate(header)]
    header = [h.rstrip("<") for h in header]
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]
    return ["  ".join(c.ljust(w) if lft else c.rjust(w) for c, w, lft in zip(line, widths, left)).rstrip()
            for line in (header, *rows)]


def _percent(fraction: float | None) -> str:
    return "-" if fraction is None or not math.isfinite(fraction) else f"{100 * fraction:.2f}%"


def _maybe(value: Any, fmt: str = "") -> str:
    return "-" if value is None else format(value, fmt)


def _time_to_target(s: RunSummary) -> str:
    if not s.target_accuracy:
        return "-"
    return "not reached" if s.time_to_accuracy_s is None else format_duration(s.time_to_accuracy_s)


def format_summary(summaries: Sequence[RunSummary], plan: FigurePlan, out: Path) -> str:
    """The summary text: the setup table, the results table, then figures written, quantities skipped and notes."""
    setup = _table(["run", "recipe<", "batch", "optimizer<", "world", "target", "finished<"], [
        [_short(s.label), s.recipe, "->".join(map(str, s.global_batches)) or "-", s.optimizer, _maybe(s.world_size),
         _percent(s.target_accuracy) if s.target_accuracy else "-", s.status] for s in summaries])
    results = _table(["run", "epochs", "steps", "final acc", "best acc", "to target", "wall", "images/s", "skipped"], [
        [_short(s.label), _maybe(s.epochs, ".2f"), f"{s.steps}/{_maybe(s.total_steps)}",
         _percent(s.final_accuracy), _percent(s.best_accuracy), _time_to_target(s),
         "-" if s.wall_s is None else format_duration(s.wall_s), _maybe(s.median_images_per_s, ",.0f"),
         str(s.skipped_steps)] for s in summaries])
    after = [f"figures in {out}: {', '.join(f.file for f in plan.figures) or 'none'}"]
    if plan.skipped:
        after.append(f"skipped (no run records it): {', '.join(plan.skipped)}")
    after += [f"note: {s.label}: restarted {s.restarts} time(s) after a lost rank (restart records)"
              for s in summaries if s.restarts]
    after += [f"note: {note}" for note in plan.notes]
    wrapped = [textwrap.fill(line, TEXT_WIDTH, subsequent_indent="  ", break_on_hyphens=False) for line in after]
    return "\n".join([*setup, "", *results, "", *wrapped]) + "\n"


# ------------------------------------------------------------------------------------------------
# The command


def write_report(paths: Sequence[Path], out: Path, x: str = "step") -> str:
    """Write the figures and summary.txt of the runs at `paths` into `out`; return the summary text.

    A figure this report would write but skips (no run records its quantity) is deleted from `out`,
    so a figure left there by an earlier report of other runs is never taken for one of these."""
    runs = load_runs(paths)
    plan = plan_figures(runs, x)
    out.mkdir(parents=True, exist_ok=True)
    for f in plan.figures:
        line_figure(out / f.file, f.series, xlabel=f.xlabel, ylabel=f.ylabel, title=f.title, logy=f.logy)
    written = {f.file for f in plan.figures}
    for file in {q.file for q in QUANTITIES} | {TRUST_FILE}:
        if file not in written:
            (out / file).unlink(missing_ok=True)
    text = format_summary([summarize(run) for run in runs], plan, out)
    write_text_atomic(out / SUMMARY_NAME, text)
    return text


def cmd_report(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}")
    print(write_report(args.run_dirs, args.out, args.x), end="")
    return 0


def add_report_command(commands: Any) -> argparse.ArgumentParser:
    """Add `report` to the `largebatch` subcommands (an argparse subparsers object)."""
    report = commands.add_parser(
        "report", help="figures and a summary of one or more runs, overlaid",
        description="Figures (PNG, one per quantity, all runs overlaid: lr, training loss, test accuracy, "
                    "images/s, gradient noise scale, gradient norm, layer-wise trust ratios; a quantity no run "
                    "records is skipped) and a one-screen summary of each run (setup, steps, accuracy, "
                    "time to target, wall time, throughput), printed and written as summary.txt.")
    report.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR",
                        help="run directories (each holds config.toml and metrics.jsonl)")
    report.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where the figures and summary.txt go "
                        f"(default {DEFAULT_OUT}/ in the current directory: a comparison of several runs belongs "
                        "to none of them, and run directories stay as training left them)")
    report.add_argument("--x", choices=X_AXES, default="step", help="x axis of the per-step figures (default step; "
                        "epoch puts runs of different batch sizes, which take different steps per epoch, on one "
                        "axis). Test accuracy is always against epochs")
    report.set_defaults(func=cmd_report)
    return report
