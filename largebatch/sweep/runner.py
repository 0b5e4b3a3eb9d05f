"""Training a sweep's runs one after another in this process, each through `largebatch.run`, with
one line per run instead of a progress bar.

A run that is done is skipped, a resumable one continues from its checkpoint, any other starts
(`status`). Ctrl-C or SIGTERM ends the run in progress as `largebatch train` does (the step
finishes, a checkpoint is written) and then the sweep, so the same command continues it. A run whose
loss becomes non-finite (run.on_nonfinite = "stop") is reported and the sweep goes on with the
next: at large batches, divergence is one of the outcomes a sweep is there to see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from largebatch.api import run
from largebatch.checkpoint import checkpoint_step
from largebatch.errors import NonFiniteLossError
from largebatch.sweep.grid import RunSpec
from largebatch.sweep.status import DONE, RESTART, RESUME, RunStatus

if TYPE_CHECKING:
    from largebatch.train import TrainResult


@dataclass(frozen=True)
class SweepOutcome:
    stopped_by: str | None  # the signal that ended the sweep early
    failed: tuple[str, ...]  # labels of the runs that stopped on a non-finite loss


def run_sweep(runs: Sequence[RunSpec], statuses: Sequence[RunStatus],
              echo: Callable[[str], None]) -> SweepOutcome:
    """Train each of `runs` that is not done, as its status says, and `echo` a line for each."""
    failed = []
    for number, (spec, status) in enumerate(zip(runs, statuses), 1):
        head = f"[{number}/{len(runs)}] {spec.label}"
        if status.state == DONE:
            echo(f"{head}: skipped (done)")
            continue
        try:
            result = run(spec.config, spec.run_dir, resume=status.state == RESUME,
                         overwrite=status.state == RESTART)
        except NonFiniteLossError as e:
            echo(f"{head}: failed: {e}")
            failed.append(spec.label)
            continue
        if result.stopped_by:
            saved = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint (run.checkpoint = false)"
            echo(f"{head}: stopped by {result.stopped_by} after step {result.steps}, {saved}; the same command "
                 "continues the sweep")
            return SweepOutcome(result.stopped_by, tuple(failed))
        echo(f"{head}: {describe(result)}")
    return SweepOutcome(None, tuple(failed))


def describe(result: TrainResult) -> str:
    """`88.41% after 4 epochs, 812 steps, 41.2 s (resumed from step 120)`."""
    if result.already_finished:
        return f"nothing left to train ({result.steps} steps taken)"
    resumed = ""
    if result.resumed_from is not None:
        step = checkpoint_step(result.resumed_from)
        resumed = f" (resumed from {result.resumed_from.name if step is None else f'step {step}'})"
    return (f"{100 * result.test.accuracy:.2f}% after {result.epochs} epochs, {result.steps} steps, "
            f"{result.wall_s:.1f} s{resumed}")
