"""Every config field reaches the component it configures.

A field that validates, appears in `--help` and is saved in config.toml can still be dropped on
its way to a constructor (a keyword left out in `build.py`, a constant where the trainer should
pass the epoch), and nothing but a changed training result would show it. So each leaf field of
`largebatch.config.Config` has a probe in `PROBES` that builds a run (or trains a tiny one) at two
values of the field and observes the difference where the field takes effect: the lr schedule, an
optimizer step checked against the update computed by hand, module attributes, the records in
metrics.jsonl, the files of the run directory. `test_every_config_field_has_a_wiring_probe` makes a
new field without a probe fail. One more test checks what no field names: that the trainer moves
the sampler to each epoch, so every epoch draws a new order of the data.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import shutil
import tempfile
import tomllib
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.testing import assert_close

import largebatch
from largebatch.build import build_run
from largebatch.checkpoint import load_checkpoint
from largebatch.config import Config
from largebatch.data.prepare import prepare
from largebatch.dist import DistEnv, ddp, init_distributed
from largebatch.errors import NonFiniteLossError
from largebatch.extensions import Extension
from largebatch.extensions.grad_clip import GradClip
from largebatch.metrics import read_metrics
from largebatch.models.cifar_resnet import BasicBlock
from largebatch.models.ghost_bn import GhostBatchNorm2d
from largebatch.recipes import RECIPE_DIR
from largebatch.run_dir import CONFIG_NAME
from largebatch.state import RunState
from largebatch.step import TrainStep

# A run of a second or less: 256 synthetic 1x16x16 images, 4 steps of 64 per epoch in micro-batches
# of 32 with BN over groups of 16, no augmentation (so the data a step sees is reproducible).
SMALL = {"data.source": "synthetic", "data.synthetic_shape": [1, 16, 16], "data.synthetic_train": 256,
         "data.synthetic_test": 64, "data.global_batch": 64, "data.micro_batch": 32, "data.bn_batch": 16,
         "data.augment": "none", "data.eval_batch": 64, "schedule.epochs": 1, "schedule.warmup_epochs": 0.5,
         "run.progress": False, "run.checkpoint": False, "run.log_every": 1}

PROBES: dict[str, Callable[..., None]] = {}


def probe(field: str) -> Callable:
    """Register the decorated function as the probe of config field `field`; its parameters name
    pytest fixtures (tmp_path, monkeypatch, capsys)."""

    def register(check: Callable[..., None]) -> Callable[..., None]:
        PROBES[field] = check
        return check

    return register


def config_fields(cls: type = Config, prefix: str = "") -> set[str]:
    """The dotted names of every leaf field of the config; a dataclass-typed field is a sub-table."""
    types_ = typing.get_type_hints(cls)
    names = set()
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(types_[f.name]):
            names |= config_fields(types_[f.name], f"{prefix}{f.name}.")
        else:
            names.add(prefix + f.name)
    return names


# ---------------------------------------------------------------------------------------------------
# Building and running through the config.


def config(overrides: dict | None = None, recipe: str = "fmnist_goyal") -> Config:
    return largebatch.load_config(recipe, SMALL | (overrides or {}))


def built(overrides: dict | None = None) -> RunState:
    """Every part of a run at world size 1, as the trainer builds it, writing nowhere."""
    cfg = config(overrides)
    return build_run(cfg, init_distributed(cfg.dist), run_dir=None)


def trained(tmp_path: Path, overrides: dict | None = None, extensions=(), recipe: str = "fmnist_goyal"):
    """Train through `largebatch.run` into a fresh out_dir under tmp_path; the result and its records."""
    out_dir = tempfile.mkdtemp(dir=tmp_path)
    cfg = config({"run.out_dir": out_dir, "run.name": "run"} | (overrides or {}), recipe)
    result = largebatch.run(cfg, extensions=extensions)
    return result, read_metrics(result.run_dir)


def of_kind(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r["kind"] == kind]


def parameters_of(state: RunState) -> dict[str, nn.Parameter]:
    return dict(state.model.named_parameters())


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


@dataclass(frozen=True)
class SeenBatch:
    training: bool
    samples: tuple[int, ...]  # a hash of each sample's values


class InputRecorder(Extension):
    """Records every batch the model's forward receives (training steps and evaluation alike)."""

    name = "input_recorder"

    def __init__(self):
        self.batches: list[SeenBatch] = []

    def attach(self, ctx) -> None:
        super().attach(ctx)
        ctx.model.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach()
        self.batches.append(SeenBatch(module.training, tuple(hash(s.numpy().tobytes()) for s in x)))

    def sizes(self, training: bool) -> list[int]:
        return [len(b.samples) for b in self.batches if b.training == training]


def test_each_epoch_trains_on_a_new_order_of_the_data(tmp_path):
    """The trainer moves the sampler to each epoch: epoch 1 sees every sample again, in another order."""
    recorder = InputRecorder()
    trained(tmp_path, {"schedule.epochs": 2}, extensions=[recorder])
    train_batches = [b.samples for b in recorder.batches if b.training]
    epoch0, epoch1 = train_batches[:8], train_batches[8:]
    assert len(epoch1) == 8 and epoch1 != epoch0
    assert sorted(sum(epoch0, ())) == sorted(sum(epoch1, ()))


# ---------------------------------------------------------------------------------------------------
# data


def write_npz(path: Path, train: int, side: int) -> Path:
    """A tiny npz data set of `train` training and 32 test grayscale side x side images, 10 classes."""
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.integers(0, 256, (train, side, side), dtype=np.uint8), y_train=np.arange(train) % 10,
             x_test=rng.integers(0, 256, (32, side, side), dtype=np.uint8), y_test=np.arange(32) % 10)
    return path


@probe("data.source")
def data_source_picks_the_reader(tmp_path):
    synthetic = built({"data.source": "synthetic"}).splits
    npz = built({"data.source": "npz", "data.path": str(write_npz(tmp_path / "d.npz", 128, 12))}).splits
    assert (len(synthetic.train), synthetic.image_size) == (256, 16)
    assert (len(npz.train), npz.image_size) == (128, 12)


@probe("data.path")
def data_path_picks_the_file(tmp_path):
    for train in (96, 128):
        path = write_npz(tmp_path / f"train{train}.npz", train, 12)
        assert len(built({"data.source": "npz", "data.path": str(path)}).splits.train) == train


@probe("data.augment")
def data_augment_flips_training_images():
    indices = list(range(64))

    def two_draws(augment: str) -> tuple[torch.Tensor, torch.Tensor]:
        train = built({"data.augment": augment}).splits.train
        return train.__getitems__(indices)[0], train.__getitems__(indices)[0]

    plain_a, plain_b = two_draws("none")
    flip_a, flip_b = two_draws("flip")
    assert torch.equal(plain_a, plain_b)
    assert not torch.equal(flip_a, flip_b)


@probe("data.global_batch")
def data_global_batch_sets_the_steps():
    for global_batch, steps_per_epoch, accum_steps in ((64, 4, 2), (128, 2, 4)):
        plan = built({"data.global_batch": global_batch}).plan
        assert (plan.steps_per_epoch, plan.batches.accum_steps) == (steps_per_epoch, accum_steps)


@probe("data.micro_batch")
def data_micro_batch_cuts_the_samplers_batches():
    for micro_batch, accum_steps in ((32, 2), (16, 4)):
        state = built({"data.micro_batch": micro_batch})
        assert {len(indices) for indices in state.sampler} == {micro_batch}
        assert state.plan.batches.accum_steps == accum_steps


@probe("data.bn_batch")
def data_bn_batch_sets_the_ghost_bn_groups():
    for bn_batch, groups in ((16, {16}), (8, {8}), (0, set())):
        model = built({"data.bn_batch": bn_batch}).model
        assert {m.bn_batch for m in model.modules() if isinstance(m, GhostBatchNorm2d)} == groups


@probe("data.eval_batch")
def data_eval_batch_sets_the_evaluation_forward_passes(tmp_path):
    for eval_batch, sizes in ((64, [64]), (24, [24, 24, 16])):
        recorder = InputRecorder()
        trained(tmp_path, {"data.eval_batch": eval_batch}, extensions=[recorder])
        assert recorder.sizes(training=False) == sizes


@probe("data.workers")
def data_workers_reach_both_loaders(tmp_path, monkeypatch):
    workers_asked: list[int] = []

    class RecordingLoader(torch.utils.data.DataLoader):
        def __init__(self, *args, **kwargs):
            workers_asked.append(kwargs["num_workers"])
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingLoader)
    for workers in (0, 1):
        workers_asked.clear()
        trained(tmp_path, {"data.workers": workers})
        assert workers_asked == [workers, workers]  # the training loader, then the evaluation loader


def image_folder(root: Path, bad: int = 0) -> Path:
    """root/{train,val}/{a,b}/ with 8 small PNGs per class and split, the first `bad` training files junk."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / label / f"{i}.png")
    for path in sorted((root / "train" / "a").iterdir())[:bad]:
        path.write_bytes(b"not an image")
    return root


FOLDER = {"data.source": "folder", "data.augment": "none", "data.global_batch": 8, "data.micro_batch": 0,
          "data.bn_batch": 0}


@probe("data.image_size")
def data_image_size_sets_the_folder_crop(tmp_path):
    root = image_folder(tmp_path / "images")
    for size in (16, 32):
        state = built(FOLDER | {"data.path": str(root), "data.image_size": size})
        x, _ = state.splits.train.__getitems__([0])
        assert state.splits.image_size == size and x.shape[-2:] == (size, size)


@probe("data.on_bad_image")
def data_on_bad_image_stops_or_skips(tmp_path):
    root = image_folder(tmp_path / "images", bad=2)
    with pytest.raises(largebatch.errors.DatasetError, match="2 unreadable image"):
        built(FOLDER | {"data.path": str(root), "data.on_bad_image": "stop"})
    state = built(FOLDER | {"data.path": str(root), "data.on_bad_image": "skip"})
    assert state.splits.skipped_images == 2 and len(state.splits.train) == 14


@probe("data.verify")
def data_verify_hashes_the_prepared_files_or_checks_their_sizes(tmp_path):
    prepare(str(image_folder(tmp_path / "images")), tmp_path / "prepared", workers=1)
    shard = tmp_path / "prepared" / "train-000000.tar"
    damaged = bytearray(shard.read_bytes())
    damaged[1000] ^= 0x01  # inside the first JPEG: the same size, another sha256
    shard.write_bytes(bytes(damaged))
    prepared = FOLDER | {"data.source": "prepared", "data.path": str(tmp_path / "prepared")}
    with pytest.raises(largebatch.errors.DatasetError, match=f"{shard} is damaged: sha256"):
        built(prepared | {"data.verify": "sha256"})
    assert len(built(prepared | {"data.verify": "size"}).splits.train) == 16


@probe("data.synthetic_shape")
def data_synthetic_shape_sets_the_images():
    for shape in ([1, 16, 16], [3, 12, 12]):
        splits = built({"data.synthetic_shape": shape}).splits
        assert list(splits.train[0][0].shape) == shape
        assert (splits.in_channels, splits.image_size) == (shape[0], shape[1])


@probe("data.synthetic_classes")
def data_synthetic_classes_sets_the_labels_and_logits():
    for classes in (10, 3):
        state = built({"data.synthetic_classes": classes})
        assert state.splits.num_classes == classes and state.model.fc.out_features == classes
        assert int(state.splits.train.labels.max()) < classes


@probe("data.synthetic_train")
def data_synthetic_train_sets_the_training_set():
    for samples, steps_per_epoch in ((256, 4), (128, 2)):
        state = built({"data.synthetic_train": samples})
        assert (len(state.splits.train), state.plan.steps_per_epoch) == (samples, steps_per_epoch)


@probe("data.synthetic_test")
def data_synthetic_test_sets_the_test_set():
    for samples in (64, 32):
        assert len(built({"data.synthetic_test": samples}).splits.test) == samples


# ---------------------------------------------------------------------------------------------------
# model


@probe("model.name")
def model_name_picks_the_network():
    for name, cls in (("small_cnn", "SmallCNN"), ("resnet20", "CifarResNet")):
        assert type(built({"model.name": name}).model).__name__ == cls


@probe("model.zero_init_residual")
def model_zero_init_residual_zeroes_the_last_gammas():
    for zero, gamma in ((False, 1.0), (True, 0.0)):
        model = built({"model.name": "resnet20", "model.zero_init_residual": zero}).model
        last_gammas = [m.bn2.weight for m in model.modules() if isinstance(m, BasicBlock)]
        assert len(last_gammas) == 9 and all(torch.all(g == gamma) for g in last_gammas)


@probe("model.bn_momentum")
def model_bn_momentum_reaches_every_bn():
    for momentum in (0.1, 0.3):
        assert {m.momentum for m in batch_norms(built({"model.bn_momentum": momentum}).model)} == {momentum}


@probe("model.bn_eps")
def model_bn_eps_reaches_every_bn():
    for eps in (1e-5, 1e-3):
        assert {m.eps for m in batch_norms(built({"model.bn_eps": eps}).model)} == {eps}


@probe("model.channels_last")
def model_channels_last_lays_out_weights_and_inputs():
    for channels_last in (False, True):
        state = built({"model.channels_last": channels_last, "data.synthetic_shape": [3, 16, 16]})
        kernels = [p for p in state.model.parameters() if p.dim() == 4]
        x, _ = state.place(torch.zeros(2, 3, 16, 16), torch.zeros(2, dtype=torch.long))
        for tensor in (*kernels, x):
            assert tensor.is_contiguous(memory_format=torch.channels_last) == channels_last


# ---------------------------------------------------------------------------------------------------
# optim: the learning rate, as the run's schedule gives it for each step


# base_lr 0.1 stated for 32 samples: peak 0.2 at the global batch 64; 4 steps per epoch over 4
# epochs, one epoch of gradual warmup from base_lr, then lr *= 0.1 at epochs 2 and 3.
LR_BASE = {"optim.base_lr": 0.1, "optim.ref_batch": 32, "optim.scaling": "linear", "schedule.epochs": 4,
           "schedule.warmup_epochs": 1, "schedule.warmup_mode": "gradual", "schedule.warmup_from": "base_lr",
           "schedule.decay": "step", "schedule.milestones": [2, 3], "schedule.gamma": 0.1}
COSINE_AT_EPOCH_3 = (1 + math.cos(math.pi * 2 / 3)) / 2  # 2 of the 3 decay epochs done


def lr_sequence(overrides: dict) -> list[float]:
    plan = built(LR_BASE | overrides).plan
    return [plan.lr(step) for step in range(plan.total_steps)]


def lr_probe(field: str, cases: list[tuple], fixed: dict | None = None) -> None:
    """Register a probe of `field`: for each (value, {step: lr}) the run's schedule gives these lrs."""

    def check() -> None:
        for value, expected in cases:
            lrs = lr_sequence((fixed or {}) | {field: value})
            assert {step: lrs[step] for step in expected} == pytest.approx(expected), f"{field} = {value!r}"

    probe(field)(check)


lr_probe("optim.base_lr", [(0.1, {0: 0.1, 4: 0.2}), (0.05, {0: 0.05, 4: 0.1})])
lr_probe("optim.ref_batch", [(32, {4: 0.2}), (64, {4: 0.1})])
lr_probe("optim.scaling", [("linear", {4: 0.2}), ("sqrt", {4: 0.1 * math.sqrt(2)}), ("none", {4: 0.1})])
lr_probe("schedule.warmup_epochs", [(1, {2: 0.15}), (2, {2: 0.125})])
lr_probe("schedule.warmup_mode", [("gradual", {2: 0.15}), ("constant", {2: 0.1}), ("none", {2: 0.2})])
lr_probe("schedule.warmup_from", [("base_lr", {0: 0.1, 2: 0.15}), ("zero", {0: 0.0, 2: 0.1})])
lr_probe("schedule.decay", [("step", {12: 0.002}), ("cosine", {12: 0.2 * COSINE_AT_EPOCH_3}),
                            ("poly", {12: 0.2 / 9}), ("none", {12: 0.2})])
lr_probe("schedule.milestones", [([2, 3], {8: 0.02}), ([3], {8: 0.2})])
lr_probe("schedule.gamma", [(0.1, {8: 0.02, 12: 0.002}), (0.5, {8: 0.1, 12: 0.05})])
lr_probe("schedule.poly_power", [(2.0, {12: 0.2 / 9}), (1.0, {12: 0.2 / 3})], fixed={"schedule.decay": "poly"})
lr_probe("schedule.final_lr", [(0.0, {12: 0.2 * COSINE_AT_EPOCH_3}),
                               (0.04, {12: 0.04 + 0.16 * COSINE_AT_EPOCH_3})], fixed={"schedule.decay": "cosine"})


# A batch ramp to 128 (2 steps per epoch): at epoch 2, 8 + 2 * 2 steps; at epoch 3, 12 + 2.
lr_probe("schedule.batch_ramp_lr", [("keep", {7: 0.2, 8: 0.02}), ("scale", {7: 0.2, 8: 0.04})],
         fixed={"schedule.batch_ramp_epochs": [2], "schedule.batch_ramp_batches": [128]})


@probe("schedule.batch_ramp_epochs")
def schedule_batch_ramp_epochs_grow_the_batch_there():
    for epochs, steps in (((), 16), ((2,), 12), ((3,), 14)):
        ramp = {"schedule.batch_ramp_epochs": epochs, "schedule.batch_ramp_batches": [128] * len(epochs)}
        assert len(lr_sequence(ramp)) == steps


@probe("schedule.batch_ramp_batches")
def schedule_batch_ramp_batches_are_the_new_batches():
    for batches, steps in (((128,), 12), ((256,), 10)):
        plan = built(LR_BASE | {"schedule.batch_ramp_epochs": [2], "schedule.batch_ramp_batches": batches}).plan
        assert plan.total_steps == steps and plan.batches_at(steps - 1).global_batch == batches[0]


NOISE_RAMP = {"schedule.epochs": 3, "run.noise_scale": True, "schedule.batch_ramp_by_noise_scale": True}


@probe("schedule.batch_ramp_by_noise_scale")
def schedule_batch_ramp_by_noise_scale_grows_the_batch_as_the_estimate_allows(tmp_path, monkeypatch):
    monkeypatch.setattr(largebatch.gns.NoiseScaleAverage, "b_simple", property(lambda self: 1e9))
    for by_noise, batches in ((False, [64] * 12), (True, [64] * 4 + [128] * 2 + [256] * 1)):
        _, records = trained(tmp_path, NOISE_RAMP | {"schedule.batch_ramp_by_noise_scale": by_noise,
                                                     "schedule.batch_ramp_max": 256 if by_noise else 0})
        assert [r["global_batch"] for r in of_kind(records, "train")] == batches


@probe("schedule.batch_ramp_max")
def schedule_batch_ramp_max_caps_the_noise_scale_ramp(tmp_path, monkeypatch):
    monkeypatch.setattr(largebatch.gns.NoiseScaleAverage, "b_simple", property(lambda self: 1e9))
    _, records = trained(tmp_path, NOISE_RAMP | {"schedule.batch_ramp_max": 128})
    assert [r["global_batch"] for r in of_kind(records, "train")] == [64] * 4 + [128] * 2 * 2


@probe("schedule.epochs")
def schedule_epochs_sets_the_length():
    for epochs, steps in ((4, 16), (2, 8)):
        assert len(lr_sequence({"schedule.epochs": epochs})) == steps


# ---------------------------------------------------------------------------------------------------
# optim: the optimizer, one or two steps with known gradients against the update computed by hand

# float64 weights, no weight decay unless a probe sets it, and every option the updates computed by
# hand below assume. exclude_bn_bias puts CONV (a kernel) in the "decay" group, with the layer-wise
# trust ratio, and GAMMA (a BN scale) in "no_decay", without it.
OPTIM_BASE = {"run.precision": "fp64", "optim.weight_decay": 0.0, "optim.exclude_bn_bias": True,
              "optim.sgd.momentum": 0.9, "optim.sgd.nesterov": False, "optim.sgd.lr_in_momentum": True,
              "optim.sgd.momentum_correction": True, "optim.lars.momentum": 0.9, "optim.lars.nesterov": False,
              "optim.lars.trust_coefficient": 0.001, "optim.lars.mode": "lars", "optim.lars.eps": 0.0,
              "optim.lamb.betas": [0.9, 0.999], "optim.lamb.eps": 1e-6, "optim.lamb.bias_correction": True,
              "optim.lamb.trust_clip": 0.0}
CONV, GAMMA = "features.0.weight", "features.1.weight"


@dataclass
class Stepped:
    state: RunState
    before: dict[str, torch.Tensor]  # the parameters before the first step
    grads: list[dict[str, torch.Tensor]]  # the gradients of each step

    def param(self, name: str) -> torch.Tensor:
        return parameters_of(self.state)[name].detach()

    def optimizer_state(self, name: str) -> dict:
        return self.state.optimizer.state[parameters_of(self.state)[name]]


def stepped(overrides: dict, lrs: tuple[float, ...] = (0.1,)) -> Stepped:
    """The configured optimizer after one step per lr in `lrs`, each with fresh random gradients."""
    state = built(OPTIM_BASE | overrides)
    params = parameters_of(state)
    before = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(0)
    grads = []
    for lr in lrs:
        grads.append({name: torch.randn(p.shape, generator=generator, dtype=p.dtype) for name, p in params.items()})
        for name, p in params.items():
            p.grad = grads[-1][name].clone()
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.step()
    return Stepped(state, before, grads)


@probe("optim.name")
def optim_name_picks_the_optimizer():
    for name, cls in (("sgd", "MomentumSGD"), ("lars", "LARS"), ("lamb", "LAMB")):
        assert type(built({"optim.name": name}).optimizer).__name__ == cls


@probe("optim.weight_decay")
def optim_weight_decay_enters_the_step():
    for weight_decay in (0.0, 0.01):
        s = stepped({"optim.weight_decay": weight_decay})
        assert_close(s.param(CONV), s.before[CONV] - 0.1 * (s.grads[0][CONV] + weight_decay * s.before[CONV]))


@probe("optim.exclude_bn_bias")
def optim_exclude_bn_bias_spares_bn_from_weight_decay():
    for exclude, groups, gamma_decay in ((False, ["decay"], 0.01), (True, ["decay", "no_decay"], 0.0)):
        s = stepped({"optim.exclude_bn_bias": exclude, "optim.weight_decay": 0.01})
        assert [g["name"] for g in s.state.optimizer.param_groups] == groups
        assert_close(s.param(GAMMA), s.before[GAMMA] - 0.1 * (s.grads[0][GAMMA] + gamma_decay * s.before[GAMMA]))


@probe("optim.label_smoothing")
def optim_label_smoothing_enters_the_loss():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, -2.0]])
    labels = torch.tensor([0, 2])
    for smoothing in (0.0, 0.2):
        criterion = built({"optim.label_smoothing": smoothing}).criterion
        assert_close(criterion(logits, labels), F.cross_entropy(logits, labels, label_smoothing=smoothing))


def global_grad_norm(model: nn.Module) -> float:
    return torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])).item()


def take_train_step(state: RunState) -> None:
    micro_batches = (state.splits.train.__getitems__(indices) for indices in state.sampler)
    TrainStep(state)(micro_batches, 0)


@probe("optim.clip_grad_norm")
def optim_clip_grad_norm_clips_the_step(tmp_path):
    unclipped = built({"optim.clip_grad_norm": 0.0})
    assert not any(isinstance(e, GradClip) for e in unclipped.extensions)
    take_train_step(unclipped)
    assert global_grad_norm(unclipped.model) > 0.01
    clipped = built({"optim.clip_grad_norm": 0.001})
    take_train_step(clipped)
    assert global_grad_norm(clipped.model) == pytest.approx(0.001, rel=1e-4)
    _, records = trained(tmp_path, {"optim.clip_grad_norm": 0.001})
    assert all(r["grad_norm"] > 0.001 and r["clipped"] == 1.0 for r in of_kind(records, "train"))


@probe("optim.sgd.momentum")
def sgd_momentum_decays_the_buffer():
    for momentum in (0.9, 0.5):
        s = stepped({"optim.sgd.momentum": momentum}, lrs=(0.1, 0.1))
        g1, g2 = s.grads[0][CONV], s.grads[1][CONV]
        assert_close(s.optimizer_state(CONV)["momentum_buffer"], 0.1 * (momentum * g1 + g2))


@probe("optim.sgd.nesterov")
def sgd_nesterov_looks_ahead():
    for nesterov, factor in ((False, 1.0), (True, 1.9)):  # momentum 0.9: w - lr g (1 + m) with Nesterov
        s = stepped({"optim.sgd.nesterov": nesterov})
        assert_close(s.param(CONV), s.before[CONV] - 0.1 * factor * s.grads[0][CONV])


@probe("optim.sgd.lr_in_momentum")
def sgd_lr_in_momentum_scales_the_buffer():
    for lr_inside, scale in ((True, 0.1), (False, 1.0)):
        s = stepped({"optim.sgd.lr_in_momentum": lr_inside})
        assert_close(s.optimizer_state(CONV)["momentum_buffer"], scale * s.grads[0][CONV])


@probe("optim.sgd.momentum_correction")
def sgd_momentum_correction_rescales_the_buffer_when_the_lr_changes():
    for correction in (True, False):
        s = stepped({"optim.sgd.momentum_correction": correction}, lrs=(0.1, 0.2))
        g1, g2 = s.grads[0][CONV], s.grads[1][CONV]
        old = 0.9 * 0.1 * g1 * (0.2 / 0.1 if correction else 1.0)
        assert_close(s.optimizer_state(CONV)["momentum_buffer"], old + 0.2 * g2)


LARS = {"optim.name": "lars"}


def lars_trust(s: Stepped, name: str, eta: float = 0.001, eps: float = 0.0) -> torch.Tensor:
    """LARS's trust ratio eta |w| / (|g| + wd |w| + eps) of the first step (weight decay 0)."""
    return eta * s.before[name].norm() / (s.grads[0][name].norm() + eps)


@probe("optim.lars.momentum")
def lars_momentum_decays_the_buffer():
    for momentum in (0.9, 0.5):
        s = stepped(LARS | {"optim.lars.momentum": momentum}, lrs=(0.1, 0.1))
        g1, g2 = s.grads[0][GAMMA], s.grads[1][GAMMA]  # no trust ratio on GAMMA: plain momentum SGD
        assert_close(s.optimizer_state(GAMMA)["momentum_buffer"], 0.1 * (momentum * g1 + g2))


@probe("optim.lars.nesterov")
def lars_nesterov_looks_ahead():
    for nesterov, factor in ((False, 1.0), (True, 1.9)):
        s = stepped(LARS | {"optim.lars.nesterov": nesterov})
        assert_close(s.param(GAMMA), s.before[GAMMA] - 0.1 * factor * s.grads[0][GAMMA])


@probe("optim.lars.trust_coefficient")
def lars_trust_coefficient_sets_the_local_lr():
    for eta in (0.001, 0.02):
        s = stepped(LARS | {"optim.lars.trust_coefficient": eta})
        assert_close(s.optimizer_state(CONV)["local_lr"], lars_trust(s, CONV, eta=eta))


@probe("optim.lars.mode")
def lars_mode_clips_the_local_lr():
    for mode, divisor in (("lars", 1.0), ("larc_clip", 0.5)):  # larc_clip: min(trust / lr, 1), lr 0.5
        s = stepped(LARS | {"optim.lars.mode": mode}, lrs=(0.5,))
        assert lars_trust(s, CONV) / divisor < 1
        assert_close(s.optimizer_state(CONV)["local_lr"], lars_trust(s, CONV) / divisor)


@probe("optim.lars.eps")
def lars_eps_enters_the_trust_ratio():
    for eps in (0.0, 5.0):
        s = stepped(LARS | {"optim.lars.eps": eps})
        assert_close(s.optimizer_state(CONV)["local_lr"], lars_trust(s, CONV, eps=eps))


def impl_picks_the_update(overrides: dict, field: str, kernel: str, monkeypatch) -> None:
    """`field` = "fused" runs the fused kernel `kernel` once per group, to the foreach step's result;
    "compiled" reaches the optimizer (a compiled step takes a minute: only the switch is checked)."""
    from largebatch.optim import fused

    calls = []
    run_kernel = getattr(fused, kernel)
    monkeypatch.setattr(fused, kernel, lambda *args, **kwargs: calls.append(kernel) or run_kernel(*args, **kwargs))
    reference = stepped(overrides | {field: "foreach"}, lrs=(0.1, 0.2))
    assert not calls
    s = stepped(overrides | {field: "fused"}, lrs=(0.1, 0.2))
    assert s.state.optimizer.impl == "fused" and len(calls) == 2 * len(s.state.optimizer.param_groups)
    for name in (CONV, GAMMA):
        assert_close(s.param(name), reference.param(name))
    assert built(overrides | {field: "compiled"}).optimizer.impl == "compiled"


@probe("optim.lars.impl")
def lars_impl_picks_the_update(monkeypatch):
    impl_picks_the_update(LARS, "optim.lars.impl", "lars_step_", monkeypatch)


LAMB = {"optim.name": "lamb"}


def lamb_first_update(s: Stepped, name: str, eps: float = 1e-6) -> torch.Tensor:
    """LAMB's first update of a parameter with bias correction and no weight decay: g / (|g| + eps)."""
    g = s.grads[0][name]
    return g / (g.abs() + eps)


@probe("optim.lamb.betas")
def lamb_betas_weigh_the_moments():
    for b1, b2 in ((0.9, 0.999), (0.5, 0.9)):
        s = stepped(LAMB | {"optim.lamb.betas": [b1, b2]})
        g, state = s.grads[0][CONV], s.optimizer_state(CONV)
        assert_close(state["exp_avg"], (1 - b1) * g)
        assert_close(state["exp_avg_sq"], (1 - b2) * g * g)


@probe("optim.lamb.eps")
def lamb_eps_enters_the_update():
    for eps in (1e-6, 0.5):
        s = stepped(LAMB | {"optim.lamb.eps": eps})
        assert_close(s.param(GAMMA), s.before[GAMMA] - 0.1 * lamb_first_update(s, GAMMA, eps))


@probe("optim.lamb.bias_correction")
def lamb_bias_correction_rescales_the_moments():
    s = stepped(LAMB | {"optim.lamb.bias_correction": True})
    assert_close(s.param(GAMMA), s.before[GAMMA] - 0.1 * lamb_first_update(s, GAMMA))
    s = stepped(LAMB | {"optim.lamb.bias_correction": False})
    g = s.grads[0][GAMMA]  # m = (1 - b1) g, v = (1 - b2) g^2, used as they are
    assert_close(s.param(GAMMA), s.before[GAMMA] - 0.1 * (1 - 0.9) * g / (math.sqrt(1 - 0.999) * g.abs() + 1e-6))


@probe("optim.lamb.trust_clip")
def lamb_trust_clip_caps_the_trust_ratio():
    s = stepped(LAMB | {"optim.lamb.trust_clip": 0.0})
    ratio = s.before[CONV].norm() / lamb_first_update(s, CONV).norm()
    assert ratio > 0.001
    assert_close(s.optimizer_state(CONV)["trust_ratio"], ratio)
    s = stepped(LAMB | {"optim.lamb.trust_clip": 0.001})
    assert_close(s.optimizer_state(CONV)["trust_ratio"], torch.tensor(0.001, dtype=torch.float64))


@probe("optim.lamb.impl")
def lamb_impl_picks_the_update(monkeypatch):
    impl_picks_the_update(LAMB, "optim.lamb.impl", "lamb_step_", monkeypatch)


# ---------------------------------------------------------------------------------------------------
# dist


@probe("dist.device")
def dist_device_places_the_model():
    assert {p.device.type for p in built({"dist.device": "cpu"}).model.parameters()} == {"cpu"}
    if torch.cuda.is_available():
        assert {p.device.type for p in built({"dist.device": "cuda"}).model.parameters()} == {"cuda"}
    else:
        with pytest.raises(RuntimeError, match="dist.device = 'cuda' but no CUDA device"):
            built({"dist.device": "cuda"})


@probe("dist.backend")
def dist_backend_reaches_the_process_group(monkeypatch):
    """As rank 0 of a 2-process job, with torch's process group replaced by a recorder."""
    requested: list[str] = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **_: requested.append(backend))
    monkeypatch.setattr(largebatch.dist.env, "_attempt_store", lambda *args: None)  # no rendezvous either
    for backend in ("gloo", "nccl"):
        env = init_distributed(config({"dist.backend": backend}).dist)
        assert env.backend == backend and requested[-1] == backend


def ddp_arguments(monkeypatch, overrides: dict) -> dict:
    """What `build_run` hands DistributedDataParallel, in a process that believes it is distributed."""
    received: dict = {}

    def record(module: nn.Module, **kwargs) -> nn.Module:
        received.update(kwargs)
        return module

    monkeypatch.setattr(ddp, "DistributedDataParallel", record)
    monkeypatch.setattr(ddp, "check_same_init", lambda model, env: None)
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"), backend="gloo")
    build_run(config(overrides), env, run_dir=None)
    return received


@probe("dist.comm_hook")
def dist_comm_hook_is_registered_on_ddp(monkeypatch):
    hooks: list[tuple[str, int]] = []
    monkeypatch.setattr(ddp, "register_comm_hook", lambda model, name, local: hooks.append((name, local)))
    for name in ("none", "fp16", "hierarchical_fp16"):
        ddp_arguments(monkeypatch, {"dist.comm_hook": name})
    assert hooks == [("none", 1), ("fp16", 1), ("hierarchical_fp16", 1)]  # the node layout from the environment
    for name in ("bf16", "hierarchical_bf16"):
        with pytest.raises(largebatch.errors.ConfigError, match=f"'{name}' needs the nccl backend"):
            largebatch.api.check_device(config({"dist.comm_hook": name, "dist.backend": "gloo"}))


@probe("dist.check_every")
def dist_check_every_adds_the_consistency_check():
    from largebatch.extensions.consistency import RankConsistencyCheck

    assert not any(isinstance(e, RankConsistencyCheck) for e in built({"dist.check_every": 0}).extensions)
    checks = [e for e in built({"dist.check_every": 3}).extensions if isinstance(e, RankConsistencyCheck)]
    assert [c.every for c in checks] == [3]


def record_bucket(seen, bucket):  # unannotated: DDP checks a hook's annotations as objects
    """A comm hook that notes each gradient bucket's bytes, then all-reduces it as DDP would."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    seen.append(bucket.buffer().numel() * bucket.buffer().element_size())
    return default_hooks.allreduce_hook(None, bucket)


def ddp_buckets(overrides: dict) -> tuple[list[int], nn.Module]:
    """The bytes of each gradient bucket, in all-reduce order, that the DDP made by `build_run` sends on
    its third step (DDP rebuilds its buckets in gradient-ready order after the first), in a gloo
    process group of this process alone; and the model."""
    torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
    try:
        env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=torch.device("cpu"),
                      backend="gloo")
        state = build_run(config(overrides), env, run_dir=None)
        seen: list[int] = []
        state.ddp_model.register_comm_hook(seen, record_bucket)
        x, y = state.place(*state.splits.train.__getitems__(list(range(32))))
        for _ in range(3):
            seen.clear()
            state.criterion(state.ddp_model(x), y).backward()
        return seen, state.model
    finally:
        torch.distributed.destroy_process_group()


@probe("dist.bucket_cap_mb")
def dist_bucket_cap_mb_sizes_ddps_buckets():
    """small_cnn's 0.22 MiB of gradients: one bucket under 25 MiB, two under 0.05 MiB (the first bucket
    held to bucket_cap_mb too, though first_bucket_cap_mb is 1 MiB)."""
    (whole,), model = ddp_buckets({"dist.bucket_cap_mb": 25.0})
    assert whole == sum(p.numel() * p.element_size() for p in model.parameters())
    buckets, _ = ddp_buckets({"dist.bucket_cap_mb": 0.05})
    assert len(buckets) == 2 and sum(buckets) == whole


@probe("dist.first_bucket_cap_mb")
def dist_first_bucket_cap_mb_sizes_ddps_first_bucket():
    """The first bucket holds the gradients ready first: the classifier's, alone under a 0.01 MiB cap;
    the later buckets keep bucket_cap_mb."""
    small, model = ddp_buckets({"dist.bucket_cap_mb": 0.05, "dist.first_bucket_cap_mb": 0.01})
    large, _ = ddp_buckets({"dist.bucket_cap_mb": 0.05, "dist.first_bucket_cap_mb": 0.05})
    assert small[0] == sum(p.numel() * p.element_size() for p in model.fc.parameters()) < large[0]
    assert len(small) == len(large) + 1 and sum(small) == sum(large) and small[-1] == large[-1]


@probe("dist.broadcast_buffers")
def dist_broadcast_buffers_reaches_ddp(monkeypatch):
    for broadcast in (True, False):
        received = ddp_arguments(monkeypatch, {"dist.broadcast_buffers": broadcast})
        assert received.get("forward_sync_buffers", received.get("broadcast_buffers")) is broadcast


# ---------------------------------------------------------------------------------------------------
# run


@probe("recipe")
def recipe_names_the_run(tmp_path):
    copy = shutil.copy(RECIPE_DIR / "fmnist_goyal.toml", tmp_path / "wiring_recipe.toml")
    for recipe, name in (("fmnist_goyal", "fmnist_goyal"), (str(copy), "wiring_recipe")):
        result, _ = trained(tmp_path, {"run.name": ""}, recipe=recipe)
        assert re.fullmatch(rf"{name}-\d{{8}}-\d{{6}}", result.run_dir.name)
        assert tomllib.loads((result.run_dir / CONFIG_NAME).read_text())["recipe"] == name


@probe("run.out_dir")
def run_out_dir_holds_the_run(tmp_path):
    for out_dir in (tmp_path / "a", tmp_path / "b"):
        result, _ = trained(tmp_path, {"run.out_dir": str(out_dir)})
        assert result.run_dir == out_dir / "run" and (out_dir / "run" / "metrics.jsonl").is_file()


@probe("run.name")
def run_name_names_the_run_directory(tmp_path):
    for name in ("first", "second"):
        result, _ = trained(tmp_path, {"run.name": name})
        assert result.run_dir.name == name and (result.run_dir / "metrics.jsonl").is_file()


@probe("run.seed")
def run_seed_sets_the_init_and_the_data_order():
    first, second = built({"run.seed": 0}), built({"run.seed": 1})
    assert not torch.equal(parameters_of(first)[CONV], parameters_of(second)[CONV])
    assert next(iter(first.sampler)) != next(iter(second.sampler))
    assert not torch.equal(first.splits.train.images, second.splits.train.images)


@probe("run.precision")
def run_precision_sets_weights_and_autocast(tmp_path, monkeypatch):
    x = torch.randn(2, 1, 16, 16)
    cases = (("fp32", False, torch.float32, torch.float32), ("bf16", False, torch.float32, torch.bfloat16),
             ("fp64", False, torch.float64, torch.float64), ("auto", True, torch.float32, torch.bfloat16),
             ("auto", False, torch.float32, torch.float32))
    for precision, native, weights, logits in cases:
        # auto follows the CPU's bf16 instructions, faked both ways here
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda native=native: native)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        state = built({"run.precision": precision})
        assert {p.dtype for p in state.model.parameters()} == {weights}
        with state.autocast():
            assert state.model(state.place(x, torch.zeros(2, dtype=torch.long))[0]).dtype == logits
    _, records = trained(tmp_path, {"run.precision": "auto"})  # the plan record says what auto became
    assert next(r for r in records if r["kind"] == "plan")["precision"] == "fp32"


@probe("run.threads")
def run_threads_sets_torchs_threads():
    before = torch.get_num_threads()
    try:
        built({"run.threads": 0})
        assert torch.get_num_threads() == before
        built({"run.threads": before + 1})
        assert torch.get_num_threads() == before + 1
    finally:
        torch.set_num_threads(before)


@probe("run.log_every")
def run_log_every_spaces_the_train_records(tmp_path):
    for every, steps in ((1, [1, 2, 3, 4, 5, 6, 7, 8]), (3, [3, 6])):
        _, records = trained(tmp_path, {"schedule.epochs": 2, "run.log_every": every})
        assert [r["step"] for r in of_kind(records, "train")] == steps


@probe("run.trust_log_every")
def run_trust_log_every_spaces_the_trust_records(tmp_path):
    for every, steps in ((0, []), (3, [3, 6])):
        _, records = trained(tmp_path, LARS | {"schedule.epochs": 2, "run.trust_log_every": every})
        assert [r["step"] for r in of_kind(records, "trust")] == steps


@probe("run.eval_every")
def run_eval_every_spaces_the_evaluations(tmp_path):
    for every, epochs in ((1, [1, 2, 3]), (2, [2, 3])):
        _, records = trained(tmp_path, {"schedule.epochs": 3, "run.eval_every": every})
        assert [r["epoch"] for r in of_kind(records, "epoch")] == epochs


@probe("run.stop_after_epochs")
def run_stop_after_epochs_ends_the_session(tmp_path):
    for stop_after, epochs, steps, last_event in ((0, 2, 8, "run_final"), (1, 1, 4, "session_stop")):
        result, records = trained(tmp_path, {"schedule.epochs": 2, "run.stop_after_epochs": stop_after})
        assert (result.epochs, result.steps, records[-1]["key"]) == (epochs, steps, last_event)


@probe("run.checkpoint")
def run_checkpoint_writes_the_checkpoint(tmp_path):
    result, _ = trained(tmp_path, {"run.checkpoint": False})
    assert not (result.run_dir / "checkpoint.pt").exists()
    result, _ = trained(tmp_path, {"run.checkpoint": True})
    assert load_checkpoint(result.run_dir / "checkpoint.pt")["progress"]["step"] == 4


def step_checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("checkpoint-*.pt"))


@probe("run.checkpoint_every")
def run_checkpoint_every_adds_checkpoints_within_epochs(tmp_path):
    base = {"run.checkpoint": True, "run.keep_checkpoints": 0}
    result, _ = trained(tmp_path, base | {"run.checkpoint_every": 0})
    assert step_checkpoints(result.run_dir) == ["checkpoint-00000004.pt"]  # the epoch end only
    result, _ = trained(tmp_path, base | {"run.checkpoint_every": 1})
    assert step_checkpoints(result.run_dir) == [f"checkpoint-{s:08d}.pt" for s in (1, 2, 3, 4)]
    assert load_checkpoint(result.run_dir / "checkpoint-00000002.pt")["progress"]["step"] == 2


@probe("run.keep_checkpoints")
def run_keep_checkpoints_prunes_the_oldest(tmp_path):
    base = {"run.checkpoint": True, "run.checkpoint_every": 1}
    result, _ = trained(tmp_path, base | {"run.keep_checkpoints": 2})
    assert step_checkpoints(result.run_dir) == ["checkpoint-00000003.pt", "checkpoint-00000004.pt"]
    result, _ = trained(tmp_path, base | {"run.keep_checkpoints": 0})
    assert len(step_checkpoints(result.run_dir)) == 4


@probe("run.target_accuracy")
def run_target_accuracy_times_the_run(tmp_path):
    result, _ = trained(tmp_path, {"run.target_accuracy": 0.0})
    assert result.time_to_accuracy_s is None
    result, _ = trained(tmp_path, {"run.target_accuracy": 0.01})
    assert result.test.accuracy >= 0.01 and 0 < result.time_to_accuracy_s <= result.wall_s


@probe("run.stop_at_target")
def run_stop_at_target_ends_the_run_at_the_first_evaluation_reaching_it(tmp_path):
    three_epochs = {"schedule.epochs": 3, "run.target_accuracy": 0.01, "run.checkpoint": True}
    result, records = trained(tmp_path, three_epochs | {"run.stop_at_target": False})
    assert result.epochs == 3 and len(of_kind(records, "epoch")) == 3
    result, records = trained(tmp_path, three_epochs | {"run.stop_at_target": True})
    assert result.epochs == 1 and [r["epoch"] for r in of_kind(records, "epoch")] == [1]
    final = [r for r in of_kind(records, "mlperf") if r["key"] == "run_final"]
    assert len(final) == 1 and final[0]["stopped_at_target"] is True
    cfg = largebatch.load_config(resume_dir=result.run_dir)
    assert largebatch.run(cfg, result.run_dir, resume=True).already_finished


@probe("run.noise_scale")
def run_noise_scale_logs_the_estimate(tmp_path):
    for on in (False, True):
        _, records = trained(tmp_path, {"run.noise_scale": on})
        assert all(("gns_b_simple" in r) is on for r in of_kind(records, "train"))
    assert all(math.isfinite(r["gns_b_simple"]) for r in of_kind(records, "train"))
    with pytest.raises(largebatch.errors.ConfigError, match="two micro-batches"):
        trained(tmp_path, {"run.noise_scale": True, "data.micro_batch": 64})


@probe("run.noise_scale_decay")
def run_noise_scale_decay_averages_the_estimates(tmp_path):
    runs = [of_kind(trained(tmp_path, {"run.noise_scale": True, "run.noise_scale_decay": decay})[1], "train")
            for decay in (0.0, 0.9)]
    # bias-corrected: the first step's average is that step's estimate whatever the decay; later ones differ
    assert runs[0][0]["gns_trace"] == runs[1][0]["gns_trace"]
    assert all(a["gns_trace"] != b["gns_trace"] for a, b in zip(runs[0][1:], runs[1][1:]))


@probe("run.max_steps")
def run_max_steps_ends_the_run_early_and_a_resume_without_it_continues_exactly(tmp_path):
    result, records = trained(tmp_path, {"run.max_steps": 0, "run.checkpoint": True})
    assert result.steps == 4
    full = load_checkpoint(result.run_dir / "checkpoint.pt")["model"]
    result, records = trained(tmp_path, {"run.max_steps": 3, "run.checkpoint": True})
    assert result.steps == 3 and [r["step"] for r in of_kind(records, "train")] == [1, 2, 3]
    assert [r["key"] for r in of_kind(records, "mlperf")] == ["run_start", "run_final"]
    cfg = largebatch.load_config(resume_dir=result.run_dir)
    assert largebatch.run(cfg, result.run_dir, resume=True).already_finished
    cfg = largebatch.load_config(overrides={"run.max_steps": 0}, resume_dir=result.run_dir)
    assert largebatch.run(cfg, result.run_dir, resume=True).steps == 4
    resumed = load_checkpoint(result.run_dir / "checkpoint.pt")["model"]
    assert all(torch.equal(full[k], resumed[k]) for k in full)


@probe("run.on_nonfinite")
def run_on_nonfinite_stops_or_skips(tmp_path):
    diverging = {"optim.base_lr": 1e30, "schedule.warmup_epochs": 0}
    with pytest.raises(NonFiniteLossError):
        trained(tmp_path, diverging | {"run.on_nonfinite": "stop"})
    result, records = trained(tmp_path, diverging | {"run.on_nonfinite": "skip"})
    assert result.skipped_steps > 0 and len(of_kind(records, "skip")) == result.skipped_steps


@probe("run.progress")
def run_progress_shows_the_bar(tmp_path, capsys):
    for progress in (False, True):
        trained(tmp_path, {"run.progress": progress})
        assert ("train:" in capsys.readouterr().err) is progress


@probe("data.normalize_on")
def data_normalize_on_moves_normalisation_from_the_loader_to_the_device():
    batches = {}
    for where in ("loader", "device"):
        state = built({"data.normalize_on": where, "data.augment": "none"})
        x, y = state.splits.train.__getitems__(list(range(8)))
        assert x.dtype == (torch.float32 if where == "loader" else torch.uint8)
        batches[where] = state.place(x, y)[0]
    assert torch.equal(batches["loader"], batches["device"])


@probe("data.decode_on")
def data_decode_on_moves_jpeg_decoding_from_the_loader_to_the_placement(tmp_path):
    from largebatch.data.prepared import EncodedImages

    prepare(str(image_folder(tmp_path / "images")), tmp_path / "prepared", workers=1)
    prepared = FOLDER | {"data.source": "prepared", "data.path": str(tmp_path / "prepared"), "data.augment": "none",
                         "data.normalize_on": "device"}
    batches = {}
    for where in ("loader", "device"):
        state = built(prepared | {"data.decode_on": where})
        for split in (state.splits.train, state.splits.test):
            x, y = split.__getitems__([0, 1, 2])
            assert isinstance(x, EncodedImages) == (where == "device")
        batches[where] = state.place(x, y)[0]
    assert batches["loader"].dtype == torch.float32 and torch.equal(batches["loader"], batches["device"])


@probe("run.loss_sync")
def run_loss_sync_keeps_the_loss_on_the_device_and_checks_it_at_the_log_interval(tmp_path):
    for sync, kind in (("step", float), ("log", torch.Tensor)):
        state = built({"run.loss_sync": sync})
        micro_batches = (state.splits.train.__getitems__(indices) for indices in state.sampler)
        assert isinstance(TrainStep(state)(micro_batches, 0).loss, kind)
    diverging = {"optim.base_lr": 1e30, "schedule.warmup_epochs": 0, "run.log_every": 4}
    with pytest.raises(NonFiniteLossError, match=r"at step 1 \(epoch 0\)"):
        trained(tmp_path, diverging | {"run.loss_sync": "step"})
    with pytest.raises(NonFiniteLossError, match=r"at step 1, found after step 3 \(run.loss_sync = 'log'"):
        trained(tmp_path, diverging | {"run.loss_sync": "log"})


@probe("run.cudnn_benchmark")
def run_cudnn_benchmark_sets_cudnns_algorithm_search():
    for benchmark in (True, False):
        built({"run.cudnn_benchmark": benchmark})
        assert torch.backends.cudnn.benchmark is benchmark


@probe("model.compile")
def model_compile_trains_through_torch_compile():
    for compile_ in (False, True):
        state = built({"model.compile": compile_})
        assert isinstance(state.ddp_model, torch._dynamo.eval_frame.OptimizedModule) is compile_
        assert state.ddp_model is not state.model if compile_ else state.ddp_model is state.model


# ---------------------------------------------------------------------------------------------------
# K-FAC: each field's effect on the preconditioner, seen over a few real training steps.


@dataclass
class KFACSteps:
    state: RunState
    factors: list[dict[str, list[torch.Tensor]]]  # after each step
    inverses: list[dict[str, list[torch.Tensor]]]

    @property
    def preconditioner(self):
        return next(e for e in self.state.extensions if e.name == "kfac").preconditioner

    def changed(self, which: str) -> list[bool]:
        """Per step after the first: whether the factors (or inverses) differ from the step before."""
        seen = getattr(self, which)
        return [any(not torch.equal(x, y) for k in seen[i] for x, y in zip(seen[i][k], seen[i - 1][k]))
                for i in range(1, len(seen))]


def kfac_steps(overrides: dict | None = None, steps: int = 1) -> KFACSteps:
    state = built({"optim.preconditioner": "kfac"} | (overrides or {}))
    pre = next(e for e in state.extensions if e.name == "kfac").preconditioner
    micro_batches = (state.splits.train.__getitems__(indices) for _ in range(steps) for indices in state.sampler)
    take = TrainStep(state)
    record = KFACSteps(state, [], [])
    for step in range(steps):
        take(micro_batches, step)
        record.factors.append({k: [t.clone() for t in v] for k, v in pre.factors.items()})
        record.inverses.append({k: [t.clone() for t in v.tensors()] for k, v in pre.inverses.items()})
    return record


def parameters_after(run: KFACSteps) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in run.state.model.named_parameters()}


def differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


@probe("optim.preconditioner")
def optim_preconditioner_kfac_changes_the_update():
    plain_run = built({"optim.preconditioner": "none"})
    assert not any(e.name == "kfac" for e in plain_run.extensions)
    take_train_step(plain_run)
    kfac = kfac_steps()
    assert differ(parameters_of(plain_run), parameters_after(kfac))
    assert {layer.name for layer in kfac.preconditioner.layers} == {n for n, m in kfac.state.model.named_modules()
                                                                   if isinstance(m, (nn.Conv2d, nn.Linear,
                                                                                     nn.BatchNorm2d))}


@probe("kfac.damping")
def kfac_damping_reaches_the_inverses():
    runs = {d: kfac_steps({"kfac.damping": d}) for d in (1e-3, 1e-1)}
    assert all(i.damping == pytest.approx(1e-1) for i in runs[1e-1].preconditioner.inverses.values())
    assert differ(parameters_after(runs[1e-3]), parameters_after(runs[1e-1]))


@probe("kfac.damping_mode")
def kfac_damping_mode_changes_the_solve():
    pi, exact = (kfac_steps({"kfac.damping_mode": m, "kfac.damping": 1e-2}) for m in ("pi", "exact"))
    assert differ(parameters_after(pi), parameters_after(exact))


@probe("kfac.decay")
def kfac_decay_weights_the_running_average():
    runs = {d: kfac_steps({"kfac.decay": d}, steps=2) for d in (0.0, 0.5)}
    first = runs[0.0].factors[0]
    assert all(torch.equal(x, y) for k in first for x, y in zip(first[k], runs[0.5].factors[0][k]))
    newest = runs[0.0].factors[1]  # decay 0: the second step's own factors
    for name, (x, *_rest) in runs[0.5].factors[1].items():
        assert_close(x, 0.5 * first[name][0] + 0.5 * newest[name][0])


@probe("kfac.factor_every")
def kfac_factor_every_spaces_the_factor_updates():
    assert kfac_steps({"kfac.factor_every": [1]}, steps=3).changed("factors") == [True, True]
    assert kfac_steps({"kfac.factor_every": [2]}, steps=3).changed("factors") == [False, True]


@probe("kfac.inverse_every")
def kfac_inverse_every_spaces_the_inverse_updates():
    assert kfac_steps({"kfac.inverse_every": [1]}, steps=3).changed("inverses") == [True, True]
    assert kfac_steps({"kfac.inverse_every": [3]}, steps=3).changed("inverses") == [False, False]


@probe("kfac.every_milestones")
def kfac_every_milestones_switch_the_intervals():
    overrides = {"kfac.factor_every": [2, 1], "kfac.inverse_every": [1, 1]}
    assert kfac_steps(overrides | {"kfac.every_milestones": [2]}, steps=4).changed("factors") == [False, True, True]
    assert kfac_steps(overrides | {"kfac.every_milestones": [3]}, steps=4).changed("factors") == [False, True, True]
    assert kfac_steps({"kfac.factor_every": [2]}, steps=4).changed("factors") == [False, True, False]


@probe("kfac.kl_clip")
def kfac_kl_clip_scales_the_update_down():
    assert kfac_steps({"kfac.kl_clip": 0.0}).preconditioner.last_nu == 1.0
    assert kfac_steps({"kfac.kl_clip": 1e-9}).preconditioner.last_nu < 0.1


@probe("kfac.factor_dtype")
def kfac_factor_dtype_computes_the_factors_in_half_precision(monkeypatch):
    from largebatch.optim.kfac.layers import KroneckerLayer

    seen: set[torch.dtype] = set()
    original = KroneckerLayer.add_input
    monkeypatch.setattr(KroneckerLayer, "add_input", lambda self, x, dtype: seen.add(dtype) or original(self, x, dtype))
    auto = kfac_steps({"kfac.factor_dtype": "auto"})
    assert seen == {torch.float32}
    half = kfac_steps({"kfac.factor_dtype": "bf16"})
    assert seen == {torch.float32, torch.bfloat16}
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(largebatch.errors.ConfigError, match="kfac.factor_dtype = 'bf16' with several processes"):
        largebatch.api.check_device(config({"optim.preconditioner": "kfac", "kfac.factor_dtype": "bf16",
                                            "dist.backend": "gloo"}))
    a, b = auto.factors[0], half.factors[0]
    assert any(not torch.equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert all(torch.allclose(x, y, rtol=0.05, atol=1e-3 * x.abs().max().item()) for k in a for x, y in zip(a[k], b[k]))


@probe("kfac.inverse")
def kfac_inverse_method_is_used():
    eigen, cholesky = (kfac_steps({"kfac.inverse": m, "kfac.inverse_dtype": "fp64"}) for m in ("eigen", "cholesky"))
    assert {i.method for i in cholesky.preconditioner.inverses.values()} == {"cholesky"}
    assert {i.method for i in eigen.preconditioner.inverses.values()} == {"eigen"}
    a, b = parameters_after(eigen), parameters_after(cholesky)
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)  # the same solve, another way


@probe("kfac.inverse_dtype")
def kfac_inverse_dtype_sets_the_decompositions_precision():
    for name, dtype in (("fp32", torch.float32), ("fp64", torch.float64)):
        inverses = kfac_steps({"kfac.inverse_dtype": name}).preconditioner.inverses.values()
        assert {t.dtype for i in inverses for t in i.tensors()} == {dtype}


@probe("kfac.batchnorm")
def kfac_batchnorm_preconditions_bn_or_leaves_it(capsys):
    with_bn = kfac_steps({"kfac.batchnorm": True}).preconditioner
    without = kfac_steps({"kfac.batchnorm": False}).preconditioner
    bn_names = {n for n, m in without.layers[0].module.named_modules()} and {
        layer.name for layer in with_bn.layers if isinstance(layer.module, nn.BatchNorm2d)}
    assert bn_names and set(without.left_out) == bn_names
    assert "K-FAC leaves 3 layer(s) to the plain optimizer" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# The tests (after every probe is registered).


def test_every_config_field_has_a_wiring_probe():
    assert config_fields() == set(PROBES)


@pytest.mark.parametrize("field", sorted(PROBES))
def test_config_field_reaches_its_component(field, request):
    check = PROBES[field]
    check(**{name: request.getfixturevalue(name) for name in inspect.signature(check).parameters})

