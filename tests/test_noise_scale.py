"""The gradient noise scale (McCandlish et al. 2018): the unbiased estimators against their
expectations, the step extension's micro-batch norms against gradients computed one by one, the
estimate on linear regression against its closed form, and 2 gloo ranks against one process."""

import json
import math

import pytest
import torch
from torch import nn

from largebatch.config import ConfigError, DataConfig, plan_batches
from largebatch.dist import Collectives, DistEnv
from largebatch.extensions import StepContext
from largebatch.extensions.noise_scale import NoiseScale
from largebatch.gns import NoiseScaleAverage, unbiased_estimates
from largebatch.plan import Phase, RunPlan
from largebatch.schedule import LrSchedule
from multiproc import run_python, run_ranks
from test_distributed import train_argv


def test_unbiased_estimates_recover_grad_and_trace_from_the_expected_norms():
    grad_sq, trace = 2.5, 40.0
    small, big = 8, 64
    expected = lambda b: grad_sq + trace / b  # E|G_b|^2
    assert unbiased_estimates(expected(small), small, expected(big), big) == pytest.approx((grad_sq, trace))
    with pytest.raises(ValueError, match="small batch < big batch"):
        unbiased_estimates(1.0, 64, 1.0, 64)


def test_the_average_is_a_ratio_of_bias_corrected_moving_averages():
    average = NoiseScaleAverage(decay=0.5)
    assert math.isnan(average.b_simple)
    average.update(2.0, 10.0)
    assert average.mean_grad_sq == pytest.approx(2.0) and average.b_simple == pytest.approx(5.0)
    average.update(4.0, 10.0)  # averages: (0.5*2 + 4)/... ratio of averages, not average of ratios (5 and 2.5)
    assert average.b_simple == pytest.approx((0.5 * 0.5 * 10 + 0.5 * 10) / (0.5 * 0.5 * 2 + 0.5 * 4))


class Regression(nn.Module):
    """y = w·x without bias: per-sample loss (w·x - y)² / 2, gradient (w·x - y) x."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(weight.clone())

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return 0.5 * (x @ self.w - y).square().mean()


def attached(model: nn.Module, micro_batch: int, accum: int, decay: float = 0.9, loss_scale: float = 1.0):
    batches = plan_batches(DataConfig(global_batch=micro_batch * accum, micro_batch=micro_batch, bn_batch=0), 1)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                  backend=None)
    plan = RunPlan((Phase(0, 0, batches, steps_per_epoch=1),), LrSchedule(peak_lr=0.0, steps_per_epoch=1, total_epochs=1),
                   train_samples=batches.global_batch, ghost_bn_batch=0)
    ctx = StepContext(model, torch.optim.SGD(model.parameters(), lr=0.0), plan,
                      Collectives(env), log=lambda *a, **k: None, loss_scale=lambda: loss_scale)
    extension = NoiseScale(decay)
    extension.attach(ctx)
    return extension


def step(extension: NoiseScale, model: Regression, micro_batches, loss_scale: float = 1.0) -> None:
    """What TrainStep does around the extension: scaled, accumulated backward passes, then unscaling."""
    model.zero_grad(set_to_none=True)
    extension.before_step(0)
    for x, y in micro_batches:
        (model.loss(x, y) * loss_scale / len(micro_batches)).backward()
    model.w.grad /= loss_scale
    extension.on_gradients(0)


def test_micro_batch_norms_are_each_micro_batch_gradient_unscaled():
    """The hooks see each micro-batch's own gradient, though the step accumulates them into .grad and the
    loss carries 1/accum and a loss scale; the global norm is that of the mean gradient."""
    torch.manual_seed(0)
    model = Regression(torch.randn(5, dtype=torch.float64))
    micro = [(torch.randn(4, 5, dtype=torch.float64), torch.randn(4, dtype=torch.float64)) for _ in range(3)]
    extension = attached(model, micro_batch=4, accum=3, loss_scale=256.0)
    step(extension, model, micro, loss_scale=256.0)
    grads = [torch.autograd.grad(model.loss(x, y), model.w)[0] for x, y in micro]
    (micro_sq, global_sq, micro_batch, global_batch), = extension._pending
    assert (micro_batch, global_batch) == (4, 12)
    assert micro_sq.item() == pytest.approx(sum(g.square().sum().item() for g in grads) / 3, rel=1e-12)
    assert global_sq.item() == pytest.approx(torch.stack(grads).mean(0).square().sum().item(), rel=1e-12)
    # a new step starts from zero
    step(extension, model, micro, loss_scale=256.0)
    assert extension._pending[1][0].item() == pytest.approx(micro_sq.item(), rel=1e-12)


def test_estimate_on_linear_regression_is_within_20_percent_of_the_closed_form():
    """x ~ N(0, I_d), y = w*·x + ε, ε ~ N(0, σ²), at w = w* + δ: G = δ and, by Isserlis' theorem,
    Σ = (|δ|² + σ²) I + δδᵀ, so B_simple = (d(|δ|² + σ²) + |δ|²) / |δ|²."""
    d, sigma, micro_batch, accum, steps = 10, 1.0, 8, 8, 400
    generator = torch.Generator().manual_seed(1)
    w_star = torch.randn(d, dtype=torch.float64, generator=generator)
    delta = torch.randn(d, dtype=torch.float64, generator=generator)
    delta /= delta.norm()  # |δ|² = 1
    model = Regression(w_star + delta)
    extension = attached(model, micro_batch, accum, decay=0.99)
    for _ in range(steps):
        micro = []
        for _ in range(accum):
            x = torch.randn(micro_batch, d, dtype=torch.float64, generator=generator)
            micro.append((x, x @ w_star + sigma * torch.randn(micro_batch, dtype=torch.float64, generator=generator)))
        step(extension, model, micro)
    true_b_simple = (d * (1 + sigma ** 2) + 1) / 1
    estimate = extension.fold().b_simple
    assert estimate == pytest.approx(true_b_simple, rel=0.2), (estimate, true_b_simple)
    logged = extension.log_values()
    assert logged["gns_b_simple"] == estimate
    assert logged["gns_grad_sq"] == pytest.approx(1.0, rel=0.2) and logged["gns_trace"] == pytest.approx(21, rel=0.2)


def test_a_non_finite_step_is_left_out_of_the_average():
    model = Regression(torch.ones(3, dtype=torch.float64))
    extension = attached(model, micro_batch=2, accum=2)
    micro = [(torch.ones(2, 3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))] * 2
    step(extension, model, [(torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, 1.0]], dtype=torch.float64),
                             torch.zeros(2, dtype=torch.float64)), micro[0]])
    before = dict(vars(extension.fold()))
    step(extension, model, [(torch.full((2, 3), math.inf, dtype=torch.float64), torch.zeros(2, dtype=torch.float64)),
                            micro[0]])
    assert vars(extension.fold()) == before


def test_one_micro_batch_per_step_is_refused_with_the_fields_to_change():
    model = Regression(torch.ones(3))
    with pytest.raises(ConfigError, match="data.micro_batch"):
        attached(model, micro_batch=8, accum=1)


def gns_records(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in r.items() if k.startswith("gns_")} for r in map(json.loads, lines) if r["kind"] == "train"]


def test_two_processes_estimate_what_one_process_does_with_the_same_micro_batches(tmp_path):
    """2 ranks x 3 micro-batches of 6 and 1 process x 6 micro-batches of 6 see the same samples, so the same
    micro-batch gradients and the same mean gradient: the logged estimates agree at every step."""
    argv = ["--run.noise_scale", "true", "--run.noise_scale_decay", "0.8"]
    run_ranks([*train_argv(tmp_path, "ddp", 36, 6, 3), *argv], 2)
    run_python([*train_argv(tmp_path, "one", 36, 6, 3), *argv])
    ddp, one = gns_records(tmp_path / "ddp"), gns_records(tmp_path / "one")
    assert len(one) == 8 and all(r.keys() == {"gns_b_simple", "gns_grad_sq", "gns_trace"} for r in one)
    for a, b in zip(ddp, one, strict=True):
        for key in b:
            assert a[key] == pytest.approx(b[key], rel=1e-9), key
