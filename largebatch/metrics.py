"""What a run records: JSON lines (one record per line, `kind` says which), TensorBoard scalars,
MLPerf-style timing events, and a progress bar. Only rank 0 writes; other ranks get a silent logger.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from largebatch.errors import ConfigError
from largebatch.run_dir import write_text_atomic

METRICS_NAME = "metrics.jsonl"


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them readable instead of invalid
    return value


class RunLogger:
    """Appends records to `run_dir/metrics.jsonl` and mirrors numeric fields to TensorBoard.

    Nothing is opened until the first record (or `open`), so a run that ends before it writes
    nothing. A resumed run opens with `after_step`, the step of the checkpoint it continues from:
    records of later steps, which the interrupted session wrote after that checkpoint and the
    resumed one will write again, are dropped from metrics.jsonl and purged from TensorBoard, so
    each step is recorded once."""

    def __init__(self, run_dir: Path | None, tensorboard: bool = True):
        self.enabled = run_dir is not None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.tensorboard = tensorboard
        self._file = None
        self._writer = None

    def open(self, after_step: int | None = None) -> None:
        if not self.enabled or self._file is not None:
            return
        path = self.run_dir / METRICS_NAME
        if after_step is not None and path.exists():
            kept = [line for line in path.read_text(encoding="utf-8").splitlines(keepends=True)
                    if line.strip() and json.loads(line)["step"] <= after_step]
            write_text_atomic(path, "".join(kept))
        self._file = open(path, "a", encoding="utf-8")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where it writes

            self._writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"),
                                         purge_step=None if after_step is None else after_step + 1)

    def log(self, kind: str, step: int, **values: Any) -> None:
        if not self.enabled:
            return
        self.open()
        record = {"kind": kind, "step": step, "time": time.time()} | {k: _json_safe(v) for k, v in values.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._writer.add_scalar(f"{kind}/{key}", value, step)

    def mlperf_event(self, key: str, step: int = 0, **values: Any) -> None:
        """An MLPerf-logging-style event (run_start, run_final, ...) with a millisecond timestamp."""
        self.log("mlperf", step, key=key, time_ms=int(time.time() * 1000), **values)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
        if self._file is not None:
            self._file.close()
        self.enabled = False


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of a run, in order. A line that is not a JSON object with a `kind` and a `step`
    (say, one a crash cut short) raises ConfigError naming the file and the line number, since the
    JSON parser's own message names neither."""
    path = Path(run_dir) / METRICS_NAME
    records = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
                if not line.strip():
                    continue
                record = json.loads(line)
            except ValueError as e:  # UnicodeDecodeError and JSONDecodeError both are
                raise ConfigError(f"{path}, line {number}: not a JSON record ({e})") from None
            if not isinstance(record, dict) or "kind" not in record or "step" not in record:
                raise ConfigError(f"{path}, line {number}: a record needs a 'kind' and a 'step', got "
                                  f"{line.strip()[:80]}")
            records.append(record)
    return records


def progress_bar(total: int, enabled: bool, description: str) -> tqdm:
    return tqdm(total=total, disable=not enabled, desc=description, unit="step", dynamic_ncols=True, leave=False)
