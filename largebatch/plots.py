"""PNG line plots for reports and sweeps: one quantity per figure, several runs (or methods) overlaid.

matplotlib is imported here with the Agg backend, so plotting works without a display and the
rest of the package does not import it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

FIGURE_SIZE = (8.0, 5.0)  # inches
DPI = 100  # so a figure is 800 x 500 pixels


@dataclass(frozen=True)
class Series:
    """One line: its legend label, x and y values, and optional error bars (a std per point)."""

    label: str
    x: Sequence[float]
    y: Sequence[float]
    yerr: Sequence[float] | None = None
    style: dict = field(default_factory=dict)  # extra matplotlib keywords, e.g. {"linestyle": "--"}


def line_figure(path: Path, series: Sequence[Series], *, xlabel: str, ylabel: str, title: str,
                logx: bool = False, logy: bool = False) -> Path:
    """Write a PNG of `series` overlaid on one axes to `path` (FIGURE_SIZE at DPI) and return the path."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=FIGURE_SIZE, dpi=DPI)
    try:
        for s in series:
            if s.yerr is not None:
                ax.errorbar(s.x, s.y, yerr=s.yerr, label=s.label, marker="o", capsize=3, **s.style)
            else:
                ax.plot(s.x, s.y, label=s.label, marker="o" if len(s.x) <= 30 else None, **s.style)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
        if logx:
            ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend(fontsize="small")
        fig.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    finally:
        plt.close(fig)
    return path
