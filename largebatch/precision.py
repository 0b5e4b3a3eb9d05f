"""Mixed precision: bf16 autocast (CPU and GPU), fp16 autocast with loss scaling (GPU); the weights
and the optimizer update stay in fp32 either way (Yamazaki et al. 2019: fp16 compute, fp32 update).
`run.precision = "auto"` is bf16 where the device computes bf16 natively and fp32 elsewhere, where
emulated bf16 would be slower than fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from functools import partial

import torch

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve(precision: str, device: torch.device) -> str:
    """The precision a run with `run.precision = precision` computes in on `device`."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` has bf16 arithmetic in hardware: a CUDA GPU that supports it (Ampere and later),
    or a CPU with AVX-512 BF16 or AMX tiles (torch's cpuinfo checks; absent in a torch without them)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and check() for check in checks)


def param_dtype(precision: str) -> torch.dtype:
    """The dtype of weights and inputs: fp32 master weights for every mixed mode, fp64 for checks."""
    return torch.float64 if precision == "fp64" else torch.float32


def autocast_factory(precision: str, device: torch.device) -> Callable[[], AbstractContextManager]:
    """A callable giving a fresh autocast context for each forward pass (a no-op context for fp32)."""
    precision = resolve(precision, device)
    if precision in ("fp32", "fp64"):
        return contextlib.nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("run.precision = 'fp16' needs a CUDA device; use 'bf16' on CPU")
    return partial(torch.autocast, device_type=device.type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling for fp16 (bf16 has fp32's range and needs none); disabled otherwise."""
    return torch.amp.GradScaler(device.type, enabled=resolve(precision, device) == "fp16")
