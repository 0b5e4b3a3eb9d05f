"""Where a run of a sweep stands on disk, which decides what the sweep does with it:

- new: no directory yet: train it;
- done: its metrics.jsonl holds the "run_final" record (all steps taken, or the target reached under
  run.stop_at_target): skip it;
- resume: a checkpoint but no "run_final": continue from the checkpoint;
- restart: a directory without checkpoint or "run_final" (a run killed before its first checkpoint,
  or one that writes none): train it again from scratch;
- changed: done or resumable, but its config.toml is not the config the grid now gives it: the
  sweep refuses to run rather than mix results of two configs (or throw one away).

Imports torch (through largebatch.checkpoint).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from largebatch.checkpoint import checkpoint_step, checkpoints_in
from largebatch.config import Config, config_to_dict, upgrade_saved
from largebatch.run_dir import CONFIG_NAME
from largebatch.sweep.grid import RunSpec
from largebatch.sweep.records import final_record, run_records

NEW, DONE, RESUME, RESTART, CHANGED = "new", "done", "resume", "restart", "changed"


@dataclass(frozen=True)
class RunStatus:
    state: str  # NEW, DONE, RESUME, RESTART or CHANGED
    checkpoint_step: int | None = None  # RESUME: the step of the newest checkpoint
    changes: tuple[str, ...] = ()  # CHANGED: "field: on disk -> in the grid", one per field

    def describe(self) -> str:
        if self.state == RESUME:
            return f"resume from step {self.checkpoint_step}" if self.checkpoint_step is not None else RESUME
        if self.state == CHANGED:
            return f"changed ({'; '.join(self.changes)})"
        return self.state


def run_status(spec: RunSpec) -> RunStatus:
    if not spec.run_dir.exists():
        return RunStatus(NEW)
    done = final_record(run_records(spec.run_dir)) is not None
    checkpoints = checkpoints_in(spec.run_dir)
    if not done and not checkpoints:
        return RunStatus(RESTART)
    changes = config_changes(spec.run_dir / CONFIG_NAME, config_to_dict(spec.config))
    if changes:
        return RunStatus(CHANGED, changes=changes)
    if done:
        return RunStatus(DONE)
    return RunStatus(RESUME, checkpoint_step(checkpoints[0]))


def config_changes(saved: Path, wanted: Mapping[str, Any]) -> tuple[str, ...]:
    """Each field where the config saved at `saved` differs from `wanted`, as "field: saved -> wanted".
    A field the saved config lacks (one added to largebatch after the run was made) counts as its
    default, so that a new field at its default changes nothing; one `wanted` lacks is not compared."""
    on_disk = _flat(config_to_dict(Config()))
    if saved.is_file():
        on_disk |= _flat(upgrade_saved(tomllib.loads(saved.read_text(encoding="utf-8"))))
    wanted = _flat(wanted)
    return tuple(f"{key}: {on_disk[key]!r} -> {wanted[key]!r}"
                 for key in sorted(wanted) if on_disk.get(key) != wanted[key])


def _flat(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat
