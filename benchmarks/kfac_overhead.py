"""K-FAC's overhead, seconds per training iteration of SGD and of K-FAC + SGD plus one factor and one
inverse update: now `largebatch bench kfac` (largebatch/bench/kfac.py), which this script runs with
its JSON written to benchmarks/results/kfac_overhead.json; any of its options can be given, e.g.

    python benchmarks/kfac_overhead.py [--batch 128] [--intervals 2] [--repeats 3]
"""

from __future__ import annotations

import sys
from pathlib import Path

from largebatch.cli import main

RESULT = Path(__file__).parent / "results" / "kfac_overhead.json"

if __name__ == "__main__":
    sys.exit(main(["bench", "kfac", "--json", str(RESULT), *sys.argv[1:]]))
