"""A job that suffers a fault: `python|torchrun tests/fault_job.py [--fault kill|raise|perturb RANK STEP]
[--section.field VALUE ...]`. It runs as `largebatch train --resume auto` does (resume from the
newest checkpoint when there is one). On torchrun's first attempt rank RANK, right after optimizer
step STEP, either kills itself with SIGKILL, as a lost machine would (`kill`), raises an error, as a
bug or bad data would (`raise`), or nudges one of its weights, as a bit flip would (`perturb`)."""

from __future__ import annotations

import os
import signal
import sys

import torch

import largebatch
from largebatch.api import load_for_auto_resume
from largebatch.cli import parse_overrides
from largebatch.extensions import Extension


class Fault(Extension):
    name = "fault"

    def __init__(self, kind: str, rank: int, step: int):
        self.kind, self.rank, self.step = kind, rank, step

    def after_step(self, step: int, applied: bool) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if not (first_attempt and self.ctx.collectives.rank == self.rank and step + 1 == self.step):
            return
        if self.kind == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.kind == "raise":
            raise ValueError(f"injected fault after step {self.step}")
        with torch.no_grad():
            next(self.ctx.model.parameters()).view(-1)[0] += 1e-3


def main(argv: list[str]) -> None:
    extensions = []
    if "--fault" in argv:
        i = argv.index("--fault")
        extensions.append(Fault(argv[i + 1], int(argv[i + 2]), int(argv[i + 3])))
        argv = argv[:i] + argv[i + 4:]
    cfg, run_dir, resume = load_for_auto_resume("fmnist_goyal", parse_overrides(argv))
    largebatch.run(cfg, run_dir, resume=resume, overwrite=not resume, extensions=extensions)


if __name__ == "__main__":
    main(sys.argv[1:])
