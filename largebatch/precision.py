"""Mixed precision: bf16 autocast (CPU and GPU), fp16 autocast with loss scaling (GPU); the weights
and the optimizer update stay in fp32 either way (Yamazaki et al. 2019: fp16 compute, fp32 update).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and inputs: fp32 master weights for every mixed mode, fp64 for checks."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A callable giving a fresh autocast context for each forward pass (a no-op context for fp32)."""
    if precision in ("fp32", "fp64"):
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision = 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return partial(torch.autocast, device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (bf16 has fp32's range and needs none); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")
