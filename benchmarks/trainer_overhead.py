"""Trainer overhead, training images/s of `largebatch train` against a minimal hand-written PyTorch
loop on the same model, data and batch: now `largebatch bench trainer` (largebatch/bench/trainer.py),
which this script runs with its JSON written to benchmarks/results/trainer_overhead.json; any of its
options can be given, e.g.

    python benchmarks/trainer_overhead.py [--global-batch 1024] [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

from largebatch.cli import main

RESULT = Path(__file__).parent / "results" / "trainer_overhead.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "trainer", "--json", str(RESULT), *sys.argv[1:]]))
