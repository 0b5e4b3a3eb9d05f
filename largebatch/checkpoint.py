"""Checkpoints that are never half-written and never execute code when read.

A run keeps its last few checkpoints, named by step (`checkpoint-00001200.pt`), and a link
`checkpoint.pt` to the newest. Each is written to a temporary file in the same directory, flushed
to disk, then renamed into place (rename is atomic on POSIX), so a crash at any moment leaves every
named checkpoint complete. Reading picks the newest one that loads, and falls back to the one
before when the newest is damaged. Loading always uses `weights_only=True`: a checkpoint is data,
not a pickle to run, and no message here suggests otherwise.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

from largebatch.errors import CheckpointError

CHECKPOINT_NAME = "checkpoint.pt"  # a link to the newest step checkpoint
FORMAT_VERSION = 1
_STEP_NAME = re.compile(r"^checkpoint-(\d+)\.pt$")


def step_checkpoint_name(step: int) -> str:
    return f"checkpoint-{step:08d}.pt"


def checkpoint_step(path: Path) -> int | None:
    """The step a step checkpoint was written after, from its name; None for a plain checkpoint.pt."""
    match = _STEP_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def checkpoints_in(run_dir: Path) -> list[Path]:
    """The run's step checkpoints, newest first; a plain (not linked) checkpoint.pt of an older run last."""
    run_dir = Path(run_dir)
    found = sorted(((int(m.group(1)), p) for p in run_dir.glob("checkpoint-*.pt") if (m := _STEP_NAME.match(p.name))),
                   reverse=True)
    legacy = run_dir / CHECKPOINT_NAME
    return [p for _, p in found] + ([legacy] if legacy.is_file() and not legacy.is_symlink() else [])


def save_checkpoint(obj: dict[str, Any], run_dir: Path, step: int, keep: int) -> Path:
    """Write the checkpoint of `step` atomically, point checkpoint.pt at it, and delete all but the
    newest `keep` step checkpoints (0 keeps all). Returns the path written."""
    run_dir = Path(run_dir)
    for leftover in run_dir.glob(".checkpoint-*.tmp"):  # from a writer killed mid-write; rank 0 is the only one
        leftover.unlink(missing_ok=True)
    path = run_dir / step_checkpoint_name(step)
    save_atomic(obj, path)
    link = run_dir / f".{CHECKPOINT_NAME}.link"
    link.unlink(missing_ok=True)
    link.symlink_to(path.name)
    os.replace(link, run_dir / CHECKPOINT_NAME)
    if keep:
        for old in [p for p in checkpoints_in(run_dir) if _STEP_NAME.match(p.name)][keep:]:
            old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: Path, map_location: str | torch.device = "cpu") -> tuple[Path, dict[str, Any], list[str]]:
    """The newest checkpoint of the run that loads: (its path, its contents, a line for each newer one
    that was damaged and passed over). Raises CheckpointError when none loads."""
    passed_over = []
    for path in checkpoints_in(run_dir):
        try:
            return path, load_checkpoint(path, map_location), passed_over
        except CheckpointError as e:
            passed_over.append(str(e))
    if passed_over:
        raise CheckpointError(f"no checkpoint in {run_dir} loads: " + "; ".join(passed_over))
    raise CheckpointError(f"{run_dir} holds no checkpoint yet")


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save `obj` to `path` atomically: temp file + fsync + rename + fsync of the directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint safely (weights_only) and check it is one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" not in str(e).lower():
            raise CheckpointError(f"checkpoint {path} is corrupt: {_first_sentence(e)}") from None
        raise CheckpointError(f"checkpoint {path} is not a largebatch checkpoint: it holds objects other than tensors "
                              "and plain data, which are never loaded (a checkpoint is data, not code)") from None
    except Exception as e:  # torch raises several types for truncated / foreign files
        raise CheckpointError(f"checkpoint {path} is corrupt or not a largebatch checkpoint: {type(e).__name__}: "
                              f"{_first_sentence(e)}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a largebatch checkpoint (format {FORMAT_VERSION})")
    return state


def _first_sentence(error: Exception) -> str:
    """The start of a library's error message, without the advice that may follow it."""
    return str(error).strip().splitlines()[0].split(". ")[0] if str(error).strip() else "unreadable"


def capture_rng_state() -> dict[str, Any]:
    """This process's random generators, in a form `weights_only` loading accepts."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
