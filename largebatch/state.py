"""The run's state in one place: the parts a run is made of, and one `state_dict()` over the stateful ones.

A checkpoint is `RunState.state_dict()`: `{name: part.state_dict()}` for the model, optimizer,
GradScaler, sampler, progress, every rank's random generators and each stateful extension (as
torchtitan's checkpointer holds a dict of stateful objects). A new stateful part is one `register`
call; saving and restoring do not change.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from largebatch import checkpoint
from largebatch.config import Config
from largebatch.data import DataSplits
from largebatch.data.sampler import GlobalBatchSampler
from largebatch.dist.env import Collectives, DistEnv
from largebatch.errors import CheckpointError
from largebatch.extensions import Extension, is_stateful
from largebatch.metrics import RunLogger
from largebatch.plan import RunPlan


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


@dataclass
class Progress:
    """Where training stands: the epoch and step counters, skipped steps and the clock."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken (including skipped ones)
    skipped_steps: int = 0
    elapsed_s: float = 0.0  # training time of earlier sessions of this run
    time_to_accuracy_s: float | None = None

    def state_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for f in fields(self):
            setattr(self, f.name, state[f.name])


class RankRngStates:
    """Every rank's random generators (augmentation draws differ per rank). `state_dict` gathers them
    from all ranks (a collective: every rank calls it); `load_state_dict` restores this rank's own,
    when the checkpoint was written by as many ranks as there are now."""

    def __init__(self, collectives: Collectives):
        self.collectives = collectives

    def state_dict(self) -> list[dict[str, Any]]:
        return self.collectives.all_gather_objects(checkpoint.capture_rng_state())

    def load_state_dict(self, states: list[dict[str, Any]]) -> None:
        if len(states) == self.collectives.world_size:
            checkpoint.restore_rng_state(states[self.collectives.rank])
        elif self.collectives.rank == 0:
            print(f"largebatch: warning: the checkpoint was written by {len(states)} processes and this run has "
                  f"{self.collectives.world_size}: random generators start again from the seed, so augmentations "
                  "differ from an uninterrupted run (the model, optimizer and data order are restored)",
                  file=sys.stderr)


@dataclass
class RunState:
    """One run: its config, process, plan, data and components, and the registry of its stateful parts.

    Built by `largebatch.build.build_run`; trained by `largebatch.train`."""

    cfg: Config
    env: DistEnv
    plan: RunPlan
    splits: DataSplits
    model: nn.Module  # the model itself: state dicts, evaluation, module hooks
    ddp_model: nn.Module  # what the step runs forward through: DDP's wrapper (the model at world size 1), compiled
    # when model.compile is set
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    sampler: GlobalBatchSampler
    autocast: Callable[[], AbstractContextManager]
    criterion: nn.Module
    place: Callable[[torch.Tensor, torch.Tensor], tuple]  # a batch to the device, dtype and memory format
    logger: RunLogger
    extensions: Sequence[Extension] = ()

    def __post_init__(self) -> None:
        self.collectives = Collectives(self.env)
        self.progress = Progress()
        self.parts: dict[str, Stateful] = {}
        for name, part in (("model", self.model), ("optimizer", self.optimizer), ("scaler", self.scaler),
                           ("sampler", self.sampler), ("progress", self.progress),
                           ("rng", RankRngStates(self.collectives))):
            self.register(name, part)
        for extension in self.extensions:
            if is_stateful(extension):
                self.register(extension.name, extension)

    def register(self, name: str, part: Stateful) -> None:
        """Add a part whose state is saved and restored with the run."""
        if name in self.parts or name == "format":
            raise ValueError(f"a stateful part named {name!r} is already registered")
        self.parts[name] = part

    def state_dict(self) -> dict[str, Any]:
        """Every stateful part's state, by name. A collective: every rank must call it."""
        return {name: part.state_dict() for name, part in self.parts.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.load_state_dict(state[name])

    def save(self, run_dir: Path | None) -> Path | None:
        """Write the checkpoint of the current step atomically into `run_dir` (given to rank 0 only;
        every rank calls this) and return its path."""
        state = self.state_dict()
        if run_dir is None:
            return None
        return checkpoint.save_checkpoint({"format": checkpoint.FORMAT_VERSION, **state}, run_dir,
                                          self.progress.step, self.cfg.run.keep_checkpoints)

    def restore(self, run_dir: Path) -> tuple[Path, list[str]]:
        """Load the newest checkpoint of `run_dir` that loads into every part (weights_only: data,
        never code); returns its path and a line for each damaged newer one passed over."""
        path, state, passed_over = checkpoint.load_latest(run_dir, map_location=self.env.device)
        missing = [name for name in self.parts if name not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} holds no state for {', '.join(missing)}: it was written by a "
                                  "run without these parts")
        self.load_state_dict(state)
        return path, passed_over
