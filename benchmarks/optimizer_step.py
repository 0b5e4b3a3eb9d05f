"""One optimizer step over the parameters of torchvision ResNet-50 (25.6 M, 161 tensors): now
`largebatch bench optim` (largebatch/bench/optim.py), which this script runs with its JSON written to
benchmarks/results/optimizer_step.json; any of its options can be given, e.g.

    python benchmarks/optimizer_step.py [--steps 20] [--threads 2] [--model resnet50] [--device cpu]
"""

from __future__ import annotations

import sys
from pathlib import Path

from largebatch.cli import main

RESULT = Path(__file__).parent / "results" / "optimizer_step.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "optim", "--json", str(RESULT), *sys.argv[1:]]))
