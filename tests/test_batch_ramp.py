"""The batch ramp (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size"): the
plan's phases against a hand-computed schedule; in training, the samples of every step and its lr;
2 gloo ranks against one process; a resume at and after a batch change against an uninterrupted run."""

import math

import pytest
import torch

import largebatch
from largebatch.checkpoint import load_checkpoint
from largebatch.errors import ConfigError
from largebatch.extensions import Extension
from largebatch.gns import NoiseScaleAverage
from largebatch.plan import RunPlan
from multiproc import run_python, run_ranks
from test_distributed import parameters, train_argv
from test_wiring import config, of_kind, trained

# 256 samples: epoch 0 at batch 32 (8 steps), epoch 1 at 64 (4 steps), epochs 2 and half of 3 at 128 (2 + 1)
RAMP = {"data.global_batch": 32, "data.micro_batch": 16, "data.bn_batch": 16, "schedule.epochs": 3.5,
        "schedule.warmup_epochs": 0, "schedule.decay": "cosine", "optim.base_lr": 0.1, "optim.ref_batch": 32,
        "schedule.batch_ramp_epochs": [1, 2], "schedule.batch_ramp_batches": [64, 128]}
SAMPLES = [32] * 8 + [64] * 4 + [128] * 3
EPOCH_AT_STEP = [i / 8 for i in range(8)] + [1 + i / 4 for i in range(4)] + [2, 2.5, 3]


def hand_lr(step: int, scale: bool) -> float:
    """Cosine from 0.1 over 3.5 epochs at the step's epoch position; "scale": times batch / 32 (linear rule)."""
    e = EPOCH_AT_STEP[step]
    return 0.1 * (1 + math.cos(math.pi * e / 3.5)) / 2 * (SAMPLES[step] / 32 if scale else 1)


@pytest.mark.parametrize("lr_mode", ["keep", "scale"])
def test_the_plan_has_a_phase_per_batch_and_the_hand_computed_lr(lr_mode):
    plan = RunPlan.build(config(RAMP | {"schedule.batch_ramp_lr": lr_mode}), world_size=1, train_samples=256)
    assert [(p.start_epoch, p.start_step, p.batches.global_batch, p.steps_per_epoch, p.batches.accum_steps)
            for p in plan.phases] == [(0, 0, 32, 8, 2), (1, 8, 64, 4, 4), (2, 12, 128, 2, 8)]
    assert plan.total_steps == 15 and [plan.epoch_end(e) for e in range(4)] == [8, 12, 14, 15]
    assert [plan.epoch_at(s) for s in range(15)] == EPOCH_AT_STEP
    assert [plan.batches_at(s).global_batch for s in range(15)] == SAMPLES
    for step in range(15):
        assert plan.lr(step) == pytest.approx(hand_lr(step, lr_mode == "scale"), rel=1e-12), step


def test_without_a_ramp_the_plan_is_the_one_phase_schedule():
    cfg = config({"schedule.epochs": 2.5, "schedule.decay": "cosine"})
    plan = RunPlan.build(cfg, world_size=1, train_samples=256)
    assert len(plan.phases) == 1 and plan.total_steps == 10
    assert [plan.lr(s) for s in range(10)] == [plan.schedule(s) for s in range(10)]


class StepSamples(Extension):
    """The number of training samples each step's forward passes received, on this rank."""

    name = "step_samples"

    def attach(self, ctx) -> None:
        super().attach(ctx)
        self.samples: list[int] = []
        ctx.model.register_forward_pre_hook(self._count)

    def before_step(self, step: int) -> None:
        self.samples.append(0)

    def _count(self, module, inputs) -> None:
        if module.training:
            self.samples[-1] += len(inputs[0])


@pytest.mark.parametrize("lr_mode", ["keep", "scale"])
def test_training_sees_the_ramps_samples_and_lr_at_every_step(tmp_path, lr_mode):
    counter = StepSamples()
    result, records = trained(tmp_path, RAMP | {"schedule.batch_ramp_lr": lr_mode}, extensions=[counter])
    assert counter.samples == SAMPLES and result.steps == 15
    train = of_kind(records, "train")
    assert [r["global_batch"] for r in train] == SAMPLES
    for r in train:
        assert r["lr"] == pytest.approx(hand_lr(r["step"] - 1, lr_mode == "scale"), rel=1e-12)
    assert [(r["step"], r["global_batch"], r["start_epoch"]) for r in of_kind(records, "ramp")] == [(8, 64, 1),
                                                                                                  (12, 128, 2)]
    assert [r["step"] for r in of_kind(records, "epoch")] == [8, 12, 14, 15]


def test_a_resume_at_the_batch_change_and_one_within_a_later_phase_are_exact(tmp_path):
    whole, _ = trained(tmp_path, RAMP | {"run.checkpoint": True})
    expected = load_checkpoint(whole.run_dir / "checkpoint.pt")["model"]
    first, _ = trained(tmp_path, RAMP | {"run.checkpoint": True, "run.stop_after_epochs": 1})
    assert first.steps == 8
    cfg = largebatch.load_config(overrides={"run.stop_after_epochs": 0, "run.max_steps": 10}, resume_dir=first.run_dir)
    assert largebatch.run(cfg, first.run_dir, resume=True).steps == 10  # stops inside the batch-64 phase
    cfg = largebatch.load_config(overrides={"run.max_steps": 0}, resume_dir=first.run_dir)
    assert largebatch.run(cfg, first.run_dir, resume=True).steps == 15
    resumed = load_checkpoint(first.run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    records = largebatch.metrics.read_metrics(first.run_dir)
    assert [r["step"] for r in of_kind(records, "train")] == list(range(1, 16))  # each step once
    assert [r["step"] for r in of_kind(records, "ramp")] == [8, 12]


def test_two_processes_through_a_ramp_equal_one_process(tmp_path):
    """The ramp's phases split over 2 ranks (per-worker 18 -> 36, accumulation 3 -> 6) give the float64
    parameters and the per-step lr of one process holding every global batch."""
    ramp = ["--schedule.batch_ramp_epochs", "1", "--schedule.batch_ramp_batches", "72", "--schedule.epochs", "3"]
    run_ranks([*train_argv(tmp_path, "ddp", 36, 6, 3), *ramp], 2)
    run_python([*train_argv(tmp_path, "one", 36, 6, 3), *ramp])
    ddp, one = parameters(tmp_path / "ddp"), parameters(tmp_path / "one")
    for key in one:
        torch.testing.assert_close(ddp[key], one[key], rtol=1e-10, atol=1e-12, msg=key)
    lrs = [[(r["step"], r["lr"], r["global_batch"]) for r in of_kind(largebatch.metrics.read_metrics(tmp_path / n),
                                                                     "train")] for n in ("ddp", "one")]
    assert lrs[0] == lrs[1] and [b for _, _, b in lrs[0]] == [36] * 4 + [72] * 4


@pytest.mark.parametrize("overrides, message", [
    ({"schedule.batch_ramp_epochs": [1]}, "one entry each"),
    ({"schedule.batch_ramp_epochs": [2, 1], "schedule.batch_ramp_batches": [64, 128]}, "strictly increasing"),
    ({"schedule.batch_ramp_epochs": [4], "schedule.batch_ramp_batches": [64]}, "< schedule.epochs"),
    ({"schedule.batch_ramp_epochs": [1], "schedule.batch_ramp_batches": [32]}, "larger than the one before"),
])
def test_a_bad_ramp_names_its_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(RAMP | overrides)


def test_a_ramp_batch_that_does_not_split_over_the_workers_is_named_before_the_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    cfg = config(RAMP | {"data.global_batch": 48, "schedule.batch_ramp_batches": [96, 128],
                         "run.out_dir": str(tmp_path)})
    with pytest.raises(ConfigError, match=r"schedule.batch_ramp_batches\[1\] = 128"):
        largebatch.run(cfg)
    assert not any(tmp_path.iterdir())


NOISE_RAMP = {k: v for k, v in RAMP.items() if not k.startswith("schedule.batch_ramp")} | {
    "schedule.epochs": 4, "run.noise_scale": True, "schedule.batch_ramp_by_noise_scale": True,
    "schedule.batch_ramp_max": 128, "run.checkpoint": True}


@pytest.fixture
def b_simple_of_100(monkeypatch):
    """The estimate pinned, so the ramp's decisions are known: 32 -> 64 (<= 100), never 128."""
    monkeypatch.setattr(NoiseScaleAverage, "b_simple", property(lambda self: 100.0))


def test_the_noise_scale_ramp_doubles_while_the_doubled_batch_is_within_b_simple(tmp_path, b_simple_of_100):
    result, records = trained(tmp_path, NOISE_RAMP)
    assert [r["global_batch"] for r in of_kind(records, "train")] == [32] * 8 + [64] * 4 * 3
    assert [(r["epoch"], r["b_simple"], r["global_batch"], r["next_global_batch"])
            for r in of_kind(records, "ramp_decision")] == [(1, 100.0, 32, 64), (2, 100.0, 64, 64), (3, 100.0, 64, 64)]
    assert [(r["step"], r["global_batch"]) for r in of_kind(records, "ramp")] == [(8, 64)]
    assert load_checkpoint(result.run_dir / "checkpoint.pt")["batch_ramp"] == {"changes": [[1, 64]]}


def test_the_noise_scale_ramp_stops_at_its_largest_batch_and_resumes_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(NoiseScaleAverage, "b_simple", property(lambda self: 1e9))
    whole, records = trained(tmp_path, NOISE_RAMP)
    assert [r["global_batch"] for r in of_kind(records, "train")] == [32] * 8 + [64] * 4 + [128] * 2 * 2
    first, _ = trained(tmp_path, NOISE_RAMP | {"run.stop_after_epochs": 2})
    cfg = largebatch.load_config(overrides={"run.stop_after_epochs": 0}, resume_dir=first.run_dir)
    assert largebatch.run(cfg, first.run_dir, resume=True).steps == whole.steps == 16
    expected = load_checkpoint(whole.run_dir / "checkpoint.pt")["model"]
    resumed = load_checkpoint(first.run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)


@pytest.mark.parametrize("overrides, message", [
    ({"schedule.batch_ramp_max": 96}, "times a power of 2"),
    ({"run.noise_scale": False}, "needs run.noise_scale"),
    ({"schedule.batch_ramp_epochs": [1], "schedule.batch_ramp_batches": [64]}, "decides the batch changes itself"),
])
def test_a_bad_noise_scale_ramp_names_its_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        config(NOISE_RAMP | overrides)
