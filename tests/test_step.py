"""The training step's extension points and guards, observed on what they protect: the order of the
points, weights and optimizer state untouched by a skipped step, GradScaler's scale lowered after an
overflow, and gradient clipping against a float64 re-derivation."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

import largebatch
from largebatch.build import build_run
from largebatch.dist import init_distributed
from largebatch.extensions import Extension
from largebatch.metrics import read_metrics
from largebatch.step import TrainStep

TINY = {"data.source": "synthetic", "data.synthetic_shape": [1, 8, 8], "data.synthetic_train": 64,
        "data.synthetic_test": 16, "data.global_batch": 16, "data.micro_batch": 8, "data.bn_batch": 8,
        "data.augment": "none", "schedule.epochs": 2, "schedule.warmup_epochs": 0, "schedule.decay": "none",
        "run.progress": False, "run.checkpoint": False, "run.precision": "fp64", "run.log_every": 1}


def build(extensions=(), **overrides):
    cfg = largebatch.load_config("fmnist_goyal", TINY | overrides)
    return build_run(cfg, init_distributed(cfg.dist), None, extensions)


def batches(state, step=0):
    state.sampler.set_epoch(0, step)
    loader = torch.utils.data.DataLoader(state.splits.train, batch_sampler=state.sampler,
                                         collate_fn=largebatch.data.collate_batch)
    return iter(loader)


def snapshot(state):
    params = {k: v.detach().clone() for k, v in state.model.named_parameters()}
    buffers = {i: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for i, s in
               enumerate(state.optimizer.state_dict()["state"].values())}
    return params, buffers


class Recorder(Extension):
    name = "recorder"

    def __init__(self):
        self.calls = []

    def before_step(self, step):
        self.calls.append(("before_step", step, self.ctx.optimizer.param_groups[0]["lr"]))

    def after_backward(self, step, micro_batch, loss):
        self.calls.append(("after_backward", step, micro_batch))

    def on_gradients(self, step):
        self.calls.append(("on_gradients", step, all(p.grad is not None for p in self.ctx.model.parameters())))

    def after_step(self, step, applied):
        self.calls.append(("after_step", step, applied))


def test_extension_points_are_called_in_order():
    recorder = Recorder()
    state = build([recorder])
    step = TrainStep(state)
    micro = batches(state)
    step(micro, 0)
    step(micro, 1)
    lr = state.plan.schedule(0)
    assert recorder.calls == [("before_step", 0, lr), ("after_backward", 0, 0), ("after_backward", 0, 1),
                              ("on_gradients", 0, True), ("after_step", 0, True),
                              ("before_step", 1, lr), ("after_backward", 1, 0), ("after_backward", 1, 1),
                              ("on_gradients", 1, True), ("after_step", 1, True)]
    assert recorder.ctx.plan is state.plan and recorder.ctx.model is state.model


class PoisonStep(Extension):
    """Makes the model's output NaN on one step (a forward hook) and records whether that step changed anything."""

    name = "poison"

    def __init__(self, bad_step):
        self.bad_step, self.current, self.unchanged = bad_step, -1, None

    def attach(self, ctx):
        super().attach(ctx)
        ctx.model.register_forward_hook(lambda module, args, out: out * math.nan if self.current == self.bad_step
                                        else out)

    def before_step(self, step):
        self.current = step
        self.before = [t.detach().clone() for t in (*self.ctx.model.parameters(), *self.ctx.model.buffers())]

    def after_step(self, step, applied):
        if step == self.bad_step:
            self.applied = applied
            now = (*self.ctx.model.parameters(), *self.ctx.model.buffers())
            self.unchanged = all(torch.equal(a, t) for a, t in zip(self.before, now))


def test_skipped_step_leaves_weights_and_bn_statistics_unchanged(tmp_path):
    poison = PoisonStep(bad_step=2)
    cfg = largebatch.load_config("fmnist_goyal", TINY | {"run.on_nonfinite": "skip", "run.out_dir": str(tmp_path),
                                                         "run.name": "skip"})
    result = largebatch.run(cfg, extensions=[poison])
    assert poison.applied is False and poison.unchanged is True
    assert result.skipped_steps == 1 and result.steps == 8
    assert [r["step"] for r in read_metrics(tmp_path / "skip") if r["kind"] == "skip"] == [2]


def test_stop_on_nonfinite_names_the_step(tmp_path):
    cfg = largebatch.load_config("fmnist_goyal", TINY | {"run.out_dir": str(tmp_path), "run.name": "stop"})
    with pytest.raises(largebatch.errors.NonFiniteLossError, match="at step 3 "):
        largebatch.run(cfg, extensions=[PoisonStep(bad_step=3)])


class InfGradient(Extension):
    """Writes inf into one gradient entry (an fp16 overflow) once switched on."""

    name = "inf_gradient"
    active = False

    def after_backward(self, step, micro_batch, loss):
        if self.active:
            next(self.ctx.model.parameters()).grad.view(-1)[0] = math.inf


def test_gradscaler_overflow_skips_the_update_and_lowers_the_scale():
    overflow = InfGradient()
    state = build([overflow], **{"optim.sgd.momentum": 0.9})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    state = dataclasses.replace(state, scaler=scaler)  # fp16's loss scaling, on the CPU
    TrainStep(state)(batches(state), 0)  # a clean first step fills the momentum buffers
    assert scaler.get_scale() == 2.0 ** 10
    params, buffers = snapshot(state)
    assert buffers and all(buffers.values())
    overflow.active = True
    outcome = TrainStep(state)(batches(state, 1), 1)
    assert outcome.applied  # the loss is finite; the overflow is in the gradients
    assert scaler.get_scale() == 2.0 ** 9
    after_params, after_buffers = snapshot(state)
    assert all(torch.equal(params[k], after_params[k]) for k in params)
    assert all(torch.equal(buffers[i][k], after_buffers[i][k]) for i in buffers for k in buffers[i])


class GradientRecorder(Extension):
    """Copies the gradients as the optimizer will see them (it runs after the built-in clipping)."""

    name = "gradient_recorder"

    def on_gradients(self, step):
        self.grads = [p.grad.detach().clone() for p in self.ctx.model.parameters()]


def reference_gradient(model, micro_batches, criterion):
    """float64 gradient of the mean loss over the micro-batches (each of equal size), by hand."""
    model = copy.deepcopy(model).double()
    model.zero_grad()
    for x, y in micro_batches:
        (criterion(model(x.double()), y) / len(micro_batches)).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("max_norm, clips, loss_scale",
                         [(0.01, True, None), (1e6, False, None), (0.01, True, 2.0 ** 12)],
                         ids=["clipping", "below-threshold", "clipping-loss-scaled"])
def test_gradient_clipping_against_float64_reference(max_norm, clips, loss_scale):
    """Extensions, clipping first, see the averaged gradient unscaled, also under fp16-style loss scaling."""
    recorder = GradientRecorder()
    state = build([recorder], **{"optim.clip_grad_norm": max_norm})
    if loss_scale:
        state = dataclasses.replace(state, scaler=torch.amp.GradScaler("cpu", init_scale=loss_scale))
    micro = list(batches(state))[:2]  # the two micro-batches of step 0
    reference = reference_gradient(state.model, micro, state.criterion)
    TrainStep(state)(iter(micro), 0)

    norm = torch.cat([g.flatten() for g in reference]).norm().item()
    assert (norm > max_norm) == clips
    coefficient = min(1.0, max_norm / (norm + 1e-6))  # torch.nn.utils.clip_grad_norm_'s epsilon
    for got, want in zip(recorder.grads, reference):
        torch.testing.assert_close(got, want * coefficient, rtol=1e-10, atol=1e-14)
    clipped_norm = torch.cat([g.flatten() for g in recorder.grads]).norm().item()
    assert clipped_norm == pytest.approx(min(norm, max_norm), rel=1e-4)
    logged = state.extensions[0].log_values()
    assert logged["grad_norm"] == pytest.approx(norm, rel=1e-12)
    assert logged["clipped"] == float(clips)


def test_a_skipped_step_lowers_the_loss_scale():
    """Under fp16's loss scaling a non-finite loss skips the step and lowers the scale, as an overflow
    does; otherwise a run whose loss overflows at the current scale would skip forever."""
    poison = PoisonStep(bad_step=0)
    state = build([poison], **{"run.on_nonfinite": "skip"})
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    state = dataclasses.replace(state, scaler=scaler)
    outcome = TrainStep(state)(batches(state), 0)
    assert not outcome.applied and poison.unchanged
    assert scaler.get_scale() == 2.0 ** 9
