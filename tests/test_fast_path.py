"""The GPU fast-path options train to the plain path's loss on CPU, and their guards hold.

`model.compile`, `model.channels_last`, `run.loss_sync = "log"`, `run.cudnn_benchmark`,
`data.normalize_on = "device"` and bf16 autocast change how a step is computed, never what it
computes: a tiny run with each gives the plain run's per-step losses, exactly where the arithmetic
is the same and within the precision where kernels differ (inductor's fused kernels reorder float sums; bf16 rounds activations).
"""

from __future__ import annotations

import math

import pytest
import torch

import largebatch
from largebatch.checkpoint import checkpoints_in, load_checkpoint
from largebatch.config import ConfigError
from largebatch.errors import NonFiniteLossError
from largebatch.metrics import read_metrics

TINY = {"data.source": "synthetic", "data.synthetic_shape": [3, 16, 16], "data.synthetic_train": 256,
        "data.synthetic_test": 64, "data.global_batch": 64, "data.micro_batch": 32, "data.bn_batch": 32,
        "data.augment": "none", "data.eval_batch": 64, "schedule.epochs": 2, "schedule.warmup_epochs": 0.5,
        "run.progress": False, "run.checkpoint": False, "run.log_every": 1}


def losses(tmp_path, overrides: dict, name: str) -> list[float]:
    cfg = largebatch.load_config("fmnist_goyal", TINY | {"run.out_dir": str(tmp_path), "run.name": name} | overrides)
    result = largebatch.run(cfg)
    return [r["loss"] for r in read_metrics(result.run_dir) if r["kind"] == "train"]


# (overrides, relative tolerance of every step's loss against the plain run's; 0: bit-exact)
FAST_PATHS = {
    "loss_sync_log": ({"run.loss_sync": "log"}, 0.0),
    "cudnn_benchmark": ({"run.cudnn_benchmark": True}, 0.0),
    "normalize_on_device": ({"data.normalize_on": "device"}, 0.0),
    "channels_last": ({"model.channels_last": True}, 1e-5),
    "compile": ({"model.compile": True}, 1e-4),
    "compile_channels_last_log": ({"model.compile": True, "model.channels_last": True, "run.loss_sync": "log"}, 1e-4),
    "bf16": ({"run.precision": "bf16"}, 3e-2),
}


@pytest.fixture(scope="module")
def plain(tmp_path_factory) -> list[float]:
    return losses(tmp_path_factory.mktemp("plain"), {}, "plain")


@pytest.mark.parametrize("name", FAST_PATHS)
def test_fast_path_trains_to_the_plain_loss(name, plain, tmp_path):
    overrides, rtol = FAST_PATHS[name]
    fast = losses(tmp_path, overrides, name)
    assert len(fast) == len(plain) == 8
    if rtol == 0:
        assert fast == plain
    else:
        assert fast != plain or name == "channels_last"  # compiled kernels and bf16 really ran
        assert all(math.isclose(a, b, rel_tol=rtol) for a, b in zip(fast, plain)), (fast, plain)


def test_loss_sync_log_never_checkpoints_the_weights_a_nonfinite_step_reached(tmp_path):
    """Diverging at step 1 with a checkpoint every step: the check before each save stops the run
    before a checkpoint of non-finite weights exists."""
    cfg = largebatch.load_config("fmnist_goyal", TINY | {
        "run.out_dir": str(tmp_path), "run.name": "diverge", "run.loss_sync": "log", "run.log_every": 4,
        "run.checkpoint": True, "run.checkpoint_every": 1, "optim.base_lr": 1e30, "schedule.warmup_epochs": 0})
    with pytest.raises(NonFiniteLossError, match="at step 1, found after step 1"):
        largebatch.run(cfg)
    saved = checkpoints_in(tmp_path / "diverge")
    assert saved  # the first step's
    for path in saved:
        assert all(torch.isfinite(t).all() for t in load_checkpoint(path)["model"].values() if t.is_floating_point())


@pytest.mark.parametrize("overrides, message", [
    ({"run.loss_sync": "log", "run.on_nonfinite": "skip"}, "run.loss_sync = 'log' finds a non-finite loss only after"),
    ({"model.compile": True, "optim.preconditioner": "kfac"}, "model.compile = true would trace K-FAC's layer hooks"),
    ({"data.normalize_on": "device", "data.source": "folder", "data.path": "/data"},
     "data.normalize_on = 'device' needs batched uint8 data: the folder source"),
])
def test_fast_path_combinations_that_cannot_work_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        largebatch.load_config("fmnist_goyal", overrides)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [
    (True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32"), (None, None, "fp32")])
def test_precision_auto_is_bf16_only_on_a_cpu_with_bf16_instructions(monkeypatch, avx512_bf16, amx, expected):
    from largebatch.precision import resolve

    for name, value in (("_is_avx512_bf16_supported", avx512_bf16), ("_is_amx_tile_supported", amx)):
        if value is None:  # a torch without the check
            monkeypatch.delattr(torch.cpu, name)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda value=value: value)
    assert resolve("auto", torch.device("cpu")) == expected
    assert resolve("fp32", torch.device("cpu")) == "fp32" and resolve("bf16", torch.device("cpu")) == "bf16"
