"""A training job with a step extension defined here, outside the library: run as
`python tests/extension_job.py RUN_DIR [--resume] [--section.field VALUE ...]`, alone or as one rank
of a gloo job. The extension plugs into the step through `largebatch.run(..., extensions=[...])`."""

from __future__ import annotations

import sys

import torch

import largebatch
from largebatch.cli import parse_overrides
from largebatch.extensions import Extension


class LossDamping(Extension):
    """Divides the averaged gradient by 1 + an exponential average of the global mean micro-batch loss.

    It reads every micro-batch's loss (after_backward), sums them over ranks with the collectives it is
    handed (on_gradients), rewrites the gradients, and keeps its average and step count as state, so
    a resumed run equals an uninterrupted one only if that state is saved and restored."""

    name = "loss_damping"

    def __init__(self) -> None:
        self.average = 0.0
        self.steps = 0
        self._local = 0.0

    def before_step(self, step: int) -> None:
        self._local, self._micro = 0.0, 0

    def after_backward(self, step: int, micro_batch: int, loss: torch.Tensor) -> None:
        self._local += float(loss)
        self._micro += 1

    def on_gradients(self, step: int) -> None:
        total = self.ctx.collectives.all_reduce_sum(torch.tensor([self._local, self._micro], dtype=torch.float64))
        self.average = 0.5 * self.average + 0.5 * float(total[0] / total[1])
        for p in self.ctx.model.parameters():
            if p.grad is not None:
                p.grad.div_(1.0 + self.average)

    def after_step(self, step: int, applied: bool) -> None:
        self.steps += applied

    def state_dict(self) -> dict[str, float | int]:
        return {"average": self.average, "steps": self.steps}

    def load_state_dict(self, state: dict[str, float | int]) -> None:
        self.average, self.steps = float(state["average"]), int(state["steps"])


def main(argv: list[str]) -> None:
    run_dir, *rest = argv
    resume = "--resume" in rest
    overrides = parse_overrides([a for a in rest if a != "--resume"])
    if resume:
        cfg = largebatch.load_config(overrides=overrides, resume_dir=run_dir)
    else:
        cfg = largebatch.load_config("fmnist_goyal", overrides)
    largebatch.run(cfg, run_dir, resume=resume, extensions=[LossDamping()])


if __name__ == "__main__":
    main(sys.argv[1:])
