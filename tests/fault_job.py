"""A job that can lose a rank: `torchrun ... tests/fault_job.py [--kill-rank R --kill-after-step S]
[--section.field VALUE ...]`. It runs as `largebatch train --resume auto` does (resume from the newest
checkpoint when there is one), and on torchrun's first attempt rank R kills itself with SIGKILL
right after optimizer step S, as a lost machine would."""

from __future__ import annotations

import os
import signal
import sys

import largebatch
from largebatch.api import load_for_auto_resume
from largebatch.cli import parse_overrides
from largebatch.extensions import Extension


class KillAfterStep(Extension):
    name = "kill_after_step"

    def __init__(self, rank: int, step: int):
        self.rank, self.step = rank, step

    def after_step(self, step: int, applied: bool) -> None:
        first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first_attempt and self.ctx.collectives.rank == self.rank and step + 1 == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def main(argv: list[str]) -> None:
    extensions = []
    if "--kill-rank" in argv:
        i = argv.index("--kill-rank")
        extensions.append(KillAfterStep(int(argv[i + 1]), int(argv[i + 3])))
        argv = argv[:i] + argv[i + 4:]
    cfg, run_dir, resume = load_for_auto_resume("fmnist_goyal", parse_overrides(argv))
    largebatch.run(cfg, run_dir, resume=resume, overwrite=not resume, extensions=extensions)


if __name__ == "__main__":
    main(sys.argv[1:])
