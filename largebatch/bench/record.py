"""What every `largebatch bench` result carries: the machine and software that measured it, and when.

A figure without its machine is not comparable with anything, so each sub-benchmark writes its rows
through :func:`write_record`, which puts this header in front of them.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import datetime
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module says."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """The measuring machine: CPU, cores torch may use, GPU (if any), Python and torch versions, and now."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"date": datetime.now().isoformat(timespec="seconds"), "host": platform.node(),
            "cpu": cpu_model(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "gpu": gpu, "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda if gpu else None}


def bench_device(choice: str) -> str:
    """The device a benchmark's `--device auto|cpu|cuda` names: auto is cuda when torch sees a GPU."""
    import torch

    return choice if choice != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def write_record(path: Path, benchmark: str, body: dict[str, Any]) -> dict[str, Any]:
    """Write `body` as JSON at `path` under the benchmark's name and the machine header; returns the record."""
    record = {"benchmark": benchmark, "machine": machine(), **body}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    return record
