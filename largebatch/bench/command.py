"""`largebatch bench SUB`: each sub-benchmark is a module of this package with an `add_parser`."""

from __future__ import annotations

import argparse

from largebatch.bench import bn, comm, data, kfac, model, optim, trainer

SUB_BENCHMARKS = (comm, model, bn, data, optim, trainer, kfac)


def add_bench_command(commands: argparse._SubParsersAction) -> None:
    """`largebatch bench` and one sub-command per module of SUB_BENCHMARKS in the sub-commands `commands`."""
    bench = commands.add_parser("bench", help="measure what a setting costs on this machine",
                                description="Measure what a setting costs on this machine: each sub-command "
                                            "prints a table and writes it as JSON with the machine that measured it.")
    benchmarks = bench.add_subparsers(dest="benchmark", required=True)
    for module in SUB_BENCHMARKS:
        module.add_parser(benchmarks)
