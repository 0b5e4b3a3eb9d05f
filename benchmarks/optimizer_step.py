"""One optimizer step over the parameters of torchvision ResNet-50 (25.6 M, 161 tensors) on CPU with
random gradients: median wall time of many steps for SGD(foreach), AdamW(foreach), largebatch LARS
and LAMB (batched norms; eager foreach and torch.compile'd), a per-parameter Python-loop LARS (the
same formula, one tensor at a time) and timm's Lars, all measured in one run, with the first step's
time (allocation, and compilation for the compiled ones). Targets: LARS and LAMB <= 1.10x
SGD(foreach=True) and >= 5x faster than the per-parameter loop.

    python benchmarks/optimizer_step.py [--steps 20] [--threads 2]

Prints a table and writes benchmarks/results/optimizer_step.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision

from largebatch.optim import LAMB, LARS, param_groups

RESULTS = Path(__file__).parent / "results"


class LoopLARS(torch.optim.Optimizer):
    """LARS as most hand-written versions are: a Python loop, two norms and three ops per tensor."""

    def __init__(self, params, lr, momentum=0.9, weight_decay=0.0, trust_coefficient=0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      trust_coefficient=trust_coefficient, trust=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                g, wd = p.grad, group["weight_decay"]
                w_norm, g_norm = p.norm(), g.norm()
                local = 1.0
                if group["trust"] and w_norm > 0 and g_norm > 0:
                    local = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm)
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(g.add(p, alpha=wd).mul_(local * group["lr"]))
                p.sub_(buf)


def optimizers(model):
    groups = lambda: param_groups(model, 1e-4, exclude_bn_bias=True)  # noqa: E731
    made = {
        "SGD(foreach=True)": lambda: torch.optim.SGD(groups(), lr=0.1, momentum=0.9, foreach=True),
        "AdamW(foreach=True)": lambda: torch.optim.AdamW(groups(), lr=1e-3, foreach=True),
        "largebatch LARS": lambda: LARS(groups(), lr=0.1, momentum=0.9),
        "largebatch LAMB": lambda: LAMB(groups(), lr=1e-3),
        "largebatch LARS compiled": lambda: LARS(groups(), lr=0.1, momentum=0.9, compiled=True),
        "largebatch LAMB compiled": lambda: LAMB(groups(), lr=1e-3, compiled=True),
        "per-parameter loop LARS": lambda: LoopLARS(groups(), lr=0.1),
    }
    try:
        from timm.optim import Lars

        made["timm Lars"] = lambda: Lars(groups(), lr=0.1, momentum=0.9)
    except ImportError:
        pass
    return made


def time_steps(make, steps: int) -> tuple[float, float]:
    """(median ms of `steps` steps after 3 warm-up steps, seconds of the first step)."""
    optimizer = make()
    times = []
    for _ in range(steps + 3):
        start = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times[3:]), times[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50()
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    snapshot = [p.detach().clone() for p in model.parameters()]
    results, first_step = {}, {}
    for name, make in optimizers(model).items():
        results[name], first_step[name] = time_steps(make, args.steps)
        with torch.no_grad():  # every optimizer starts from the same weights
            for p, saved in zip(model.parameters(), snapshot):
                p.copy_(saved)
    sgd, loop = results["SGD(foreach=True)"], results["per-parameter loop LARS"]
    print(f"{'optimizer':<28}{'median ms/step':>16}{'x SGD(foreach)':>16}{'loop / this':>14}{'first step s':>14}")
    for name, ms in results.items():
        print(f"{name:<28}{ms:>16.1f}{ms / sgd:>16.2f}{loop / ms:>14.2f}{first_step[name]:>14.1f}")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "optimizer_step.json").write_text(json.dumps({
        "benchmark": "optimizer_step", "model": "torchvision resnet50", "steps": args.steps, "threads": args.threads,
        "torch": torch.__version__, "median_ms": results, "first_step_s": first_step,
        "ratio_to_sgd_foreach": {k: v / sgd for k, v in results.items()},
    }, indent=2) + "\n")


if __name__ == "__main__":
    main()
