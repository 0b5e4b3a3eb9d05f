"""`largebatch bench optim`: the time of one optimizer step over a model's parameters, for each way
largebatch runs LARS and LAMB (`impl` = foreach, compiled, fused), against torch's fused SGD and
AdamW, all in one run.

On a CPU a step is bound by memory traffic, and torch's fused SGD and AdamW make the fewest passes
over the parameters a momentum or an Adam step can make (5 and 7); LARS needs 2 more for its norms,
LAMB 3 more than AdamW, so their floors are about 1.4x those two, and the fused kernels are held to
1.5x. The table gives every row's ratio to SGD(fused), the Adam-like rows' also to AdamW(fused), and
each row's first step (allocation, compilation). Also a per-parameter Python-loop LARS, and timm's
Lars and Lamb where timm is installed. On a GPU the same rows run against torch's fused CUDA kernels,
less the fused rows (CPU kernels).

The timing is `largebatch.bench.optim_timing`; the options, the table and the JSON are here and
import no torch, so `largebatch bench optim --help` runs without it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from largebatch.bench.record import bench_device, write_record
from largebatch.config import MODEL_NAMES
from largebatch.errors import UserError

if TYPE_CHECKING:
    from largebatch.bench.optim_timing import OptimRow


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench optim` in the sub-benchmarks `benchmarks`."""
    optim = benchmarks.add_parser(
        "optim", help="time one optimizer step: LARS and LAMB in each impl against torch's fused SGD and AdamW",
        description="Time one optimizer step over a model's parameters (random gradients): torch's SGD and AdamW "
                    "(fused and foreach), largebatch's MomentumSGD, LARS and LAMB in each impl (foreach, compiled, "
                    "fused), a per-parameter Python-loop LARS, and timm's Lars and Lamb where timm is installed. "
                    "Prints each row's median ms per step, its ratio to SGD(fused) (Adam-like rows: also to "
                    "AdamW(fused)) and its first step's seconds, and writes the table as JSON.")
    optim.add_argument("--model", choices=MODEL_NAMES, default="resnet50", help="whose parameters (default "
                       "resnet50: 25.6 M in 161 tensors)")
    optim.add_argument("--steps", type=int, default=20, help="timed rounds, one step of every row each (default 20)")
    optim.add_argument("--threads", type=int, help="torch's CPU threads (default: torch's own number)")
    optim.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the parameters "
                       "are (default: cuda if there is one)")
    optim.add_argument("--json", type=Path, default=Path("bench_optim.json"), help="where the JSON goes (default "
                       "bench_optim.json in the current directory)")
    optim.set_defaults(func=cmd_bench_optim)


def cmd_bench_optim(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Check the options, time every row, print the table, write the JSON."""
    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}")
    if args.steps < 1 or (args.threads is not None and args.threads < 1):
        raise UserError("--steps and --threads: give at least 1")
    import torch

    from largebatch.bench.optim_timing import WARMUP_ROUNDS, measure, model_with_gradients, optimizer_rows

    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible; use cpu or auto")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(bench_device(args.device))
    model = model_with_gradients(args.model, device)
    params = list(model.parameters())
    results = measure(optimizer_rows(device), model, args.steps, device)
    size = sum(p.numel() for p in params)
    print(table(f"{args.model}: {size / 1e6:.2f} M parameters in {len(params)} tensors on {device} "
                f"({torch.get_num_threads()} threads); medians of {args.steps} rounds, after the first steps and "
                f"{WARMUP_ROUNDS} untimed rounds", results))
    if device.type != "cpu":
        print("(LARS fused and LAMB fused are CPU kernels: not measured here)")
    write_record(args.json, "bench_optim", {
        "model": args.model, "parameters": size, "tensors": len(params), "device": str(device),
        "threads": torch.get_num_threads(), "steps": args.steps, "warmup_rounds": WARMUP_ROUNDS,
        "rows": [asdict(r) for r in results]})
    print(f"JSON: {args.json}")
    return 0


def table(header: str, results: list[OptimRow]) -> str:
    """The header, then one line per row."""
    lines = [header, f"{'optimizer':<26}{'ms/step':>10}{'x SGD(fused)':>14}{'x AdamW(fused)':>16}{'first step s':>14}"]
    for r in results:
        adamw = f"{r.x_adamw_fused:>16.2f}" if r.x_adamw_fused is not None else " " * 16
        lines.append(f"{r.name:<26}{r.median_ms:>10.2f}{r.x_sgd_fused:>14.2f}{adamw}{r.first_step_s:>14.2f}")
    return "\n".join(lines)
