"""LARS's and LAMB's group updates as one fused CPU kernel each (``impl = "fused"``).

A CPU optimizer step is bound by memory traffic, not arithmetic: fused SGD reads the weights, the
gradients and the momentum and writes two of them back, five passes over the parameters. LARS needs
two more (the weight and gradient norms, before any element can move), LAMB three more than fused
AdamW (the norms of the weights and of the Adam update, which needs the new moments). The kernels in
kernels.cpp make exactly those passes, over all of a group's tensors at once on torch's threads, and
keep the passes of a chunk of tensors in cache where it fits, where the foreach path makes a pass per
op and allocates temporaries. See kernels.cpp for the scheme and build.py for how it is compiled.

The kernels run on CPU tensors of float32 or float64 whose parameter, gradient and state tensors
share one dense layout; `check_params` says at construction whether a group qualifies.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable

import torch
from torch import Tensor

from largebatch.optim.fused.build import KernelBuildError, library

DTYPES = {torch.float32: "f32", torch.float64: "f64"}
# Elements per thread in a chunk of tensors whose two passes share the cache: 512 KiB of each fp32 array,
# so that the four arrays of LAMB's first pass fit a 2 MiB L2 (64 Ki to 256 Ki measured alike on one thread)
CHUNK = 1 << 17

__all__ = ["CHUNK", "DTYPES", "check_params", "lamb_step_", "lars_step_"]


def check_params(params: Iterable[Tensor], field: str, allowed: Iterable[str]) -> None:
    """Refuse, naming the option `field` and its `allowed` values, parameters the kernels cannot update
    (not on the CPU, or not float32 / float64), and load the kernels (compiled on first use) so that a
    machine without a compiler is refused now rather than at the first step."""
    others = ", ".join(repr(a) for a in allowed if a != "fused")
    for p in params:
        if p.device.type != "cpu" or p.dtype not in DTYPES:
            raise ValueError(f"{field} = 'fused' is not allowed for a parameter of {p.dtype} on {p.device}: the "
                             f"fused kernels update float32 and float64 CPU tensors; choose {others}")
    try:
        library()
    except KernelBuildError as e:
        raise ValueError(f"{field} = 'fused' is not available: {e}; choose {others}") from e


def lars_step_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], *, lr: float, momentum: float,
               weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool, clip: bool,
               trust: bool) -> Tensor:
    """LARS's step (largebatch.optim.lars.LARS) on a group's params in place, with their momentum
    buffers `bufs` (empty: no momentum); returns the local factors, 1-d in the params' dtype."""
    kernel, grads, states = _prepare("lars", params, grads, [bufs] if bufs else [])
    bufs_ptr = _pointers(states[0]) if bufs else None
    local = torch.empty(len(params), dtype=torch.float64)
    kernel(len(params), _pointers(params), _pointers(grads), bufs_ptr, _sizes(params), lr, momentum, weight_decay,
           trust_coefficient, eps, nesterov, clip, trust, CHUNK, torch.get_num_threads(), local.data_ptr())
    torch.autograd.graph.increment_version(params)
    return local.to(params[0].dtype)


def lamb_step_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
               lr: float, scale: list[float], denominator_eps: list[float], beta1: float, beta2: float,
               weight_decay: float, trust_clip: float | None, trust: bool) -> Tensor:
    """LAMB's step (largebatch.optim.lamb.LAMB) on a group's params and moments in place, with the
    update u = scale * m / (sqrt(v) + denominator_eps) + weight_decay * p per parameter (the bias
    corrections folded into the two per-parameter numbers); returns the trust ratios, 1-d in the
    params' dtype."""
    kernel, grads, (exp_avgs, exp_avg_sqs) = _prepare("lamb", params, grads, [exp_avgs, exp_avg_sqs])
    ratio = torch.empty(len(params), dtype=torch.float64)
    kernel(len(params), _pointers(params), _pointers(grads), _pointers(exp_avgs), _pointers(exp_avg_sqs),
           _sizes(params), _doubles(scale), _doubles(denominator_eps), lr, beta1, beta2, weight_decay,
           trust_clip or 0.0, trust, CHUNK, torch.get_num_threads(), ratio.data_ptr())
    torch.autograd.graph.increment_version(params)
    return ratio.to(params[0].dtype)


def _prepare(name: str, params: list[Tensor], grads: list[Tensor],
             states: list[list[Tensor]]) -> tuple[ctypes._CFuncPtr, list[Tensor], list[list[Tensor]]]:
    """The kernel for the params' dtype, and the grads and state tensors laid out as their params
    (those already so, as almost always, are the tensors themselves; a copy otherwise, which for a
    state tensor also replaces it in place of the old one's data)."""
    dtype = params[0].dtype
    for p in params:
        if p.device.type != "cpu" or p.dtype != dtype:
            raise ValueError(f"impl = 'fused': the {name.upper()} kernel updates a group of CPU tensors of one "
                             f"dtype (float32 or float64); this group has {p.dtype} on {p.device} next to {dtype}")
        if not _dense(p):
            raise ValueError(f"impl = 'fused': the {name.upper()} kernel needs parameters whose elements are "
                             f"contiguous in some order; one has shape {tuple(p.shape)} and strides {p.stride()}")
    grads = [_laid_out_as(p, g) for p, g in zip(params, grads)]
    for tensors in states:
        for p, s in zip(params, tensors):
            if s.stride() != p.stride():
                s.set_(_laid_out_as(p, s))
    return getattr(library(), f"lb_{name}_step_{DTYPES[dtype]}"), grads, states


def _dense(t: Tensor) -> bool:
    """Whether t's elements fill numel() consecutive slots of its storage, in some order."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _laid_out_as(p: Tensor, t: Tensor) -> Tensor:
    """t itself if it has p's strides, else a copy of t with p's layout."""
    return t if t.stride() == p.stride() else torch.empty_like(p).copy_(t)


def _pointers(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*[t.data_ptr() for t in tensors])


def _sizes(tensors: list[Tensor]) -> ctypes.Array:
    return (ctypes.c_int64 * len(tensors))(*[t.numel() for t in tensors])


def _doubles(values: list[float]) -> ctypes.Array:
    return (ctypes.c_double * len(values))(*values)
