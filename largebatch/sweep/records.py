"""Reading what a run recorded in its metrics.jsonl (`largebatch.metrics`): the records a sweep
decides and reports by. Torch-free."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from largebatch.metrics import METRICS_NAME, read_metrics

Record = Mapping[str, Any]


def run_records(run_dir: Path) -> list[dict[str, Any]]:
    """The run's records in order; none when it has not written any."""
    return read_metrics(run_dir) if (Path(run_dir) / METRICS_NAME).is_file() else []


def final_record(records: Sequence[Record]) -> Record | None:
    """The MLPerf-style "run_final" record, written once the run is finished (all steps taken, or the
    target reached under run.stop_at_target); None before."""
    return next((r for r in records if r["kind"] == "mlperf" and r["key"] == "run_final"), None)


def evaluations(records: Sequence[Record]) -> list[Record]:
    """The "epoch" records: each evaluation on the test set (epoch, step, test_accuracy, test_loss)."""
    return [r for r in records if r["kind"] == "epoch"]
