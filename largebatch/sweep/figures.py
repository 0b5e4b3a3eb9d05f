"""The sweep's three figures, drawn with `largebatch.plots` from a `results.Report`:

- accuracy_vs_batch.png: final test accuracy against the batch (log2), one line per series, error
  bars the standard deviation over seeds;
- steps_to_target.png: steps to the target against the batch (log-log), one line per series, and
  dashed perfect scaling steps(B0) · B0 / B from the smallest batch B0 of the series that reached the
  target at the most batches;
- accuracy_vs_epoch.png: test accuracy against the epoch, one line per finished run.
"""

from __future__ import annotations

from pathlib import Path

from largebatch.plots import Series, line_figure
from largebatch.sweep.results import Report, Row

FIGURE_NAMES = ("accuracy_vs_batch.png", "steps_to_target.png", "accuracy_vs_epoch.png")


def write_figures(report: Report, sweep_dir: Path) -> list[Path]:
    accuracy, steps, curves = (sweep_dir / name for name in FIGURE_NAMES)
    target = f"{100 * report.grid.target_accuracy:g}%"
    return [
        line_figure(accuracy, _accuracy_series(report), xlabel="global batch", ylabel="final test accuracy (%)",
                    title=f"{report.grid.name}: accuracy against batch size", logx=True),
        line_figure(steps, _steps_series(report), xlabel="global batch", ylabel=f"steps to {target}",
                    title=f"{report.grid.name}: steps to {target} test accuracy", logx=True, logy=True),
        line_figure(curves, [Series(r.label, [e for e, _ in r.curve], [100 * a for _, a in r.curve])
                             for r in report.runs],
                    xlabel="epoch", ylabel="test accuracy (%)", title=f"{report.grid.name}: test accuracy per run"),
    ]


def _by_series(report: Report) -> dict[str, list[Row]]:
    rows: dict[str, list[Row]] = {}
    for row in report.rows:
        rows.setdefault(row.series, []).append(row)
    return rows


def _accuracy_series(report: Report) -> list[Series]:
    lines = []
    for name, rows in _by_series(report).items():
        spread = [row.accuracy_std for row in rows]
        yerr = None if all(s is None for s in spread) else [100 * (s or 0.0) for s in spread]
        lines.append(Series(name, [row.batch for row in rows], [100 * row.accuracy for row in rows], yerr))
    return lines


def _steps_series(report: Report) -> list[Series]:
    reached = {name: [row for row in rows if row.steps_to_target is not None]
               for name, rows in _by_series(report).items()}
    lines = [Series(name, [row.batch for row in rows], [row.steps_to_target for row in rows])
             for name, rows in reached.items() if rows]
    best = max(reached.values(), key=len, default=[])  # the first of the best covered, in the grid's order
    if best:
        b0, s0 = best[0].batch, best[0].steps_to_target
        batches = [b for b in report.grid.batches if b >= b0]
        lines.append(Series(f"perfect scaling from {best[0].series} b={b0}", batches, [s0 * b0 / b for b in batches],
                            style={"linestyle": "--", "color": "gray"}))
    return lines
