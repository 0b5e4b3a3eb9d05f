"""Optional torch.compile of the optimizers' per-tensor update functions.

On CPU, ``torch._foreach_*`` ops are loops over tensors that write a temporary per op, so an update
of several ops reads and writes every weight-sized tensor several times. Written instead as one
elementwise expression per tensor and compiled by inductor, each tensor's update becomes one fused
loop (one kernel on a GPU), which is the fast path of Fujitsu's LARS. The price is a one-off compile
on the first step (about a minute and a half for ResNet-50 on two cores, cached on disk by inductor
afterwards) and a C++ compiler (CPU) or Triton (GPU) at run time, so it is opt-in; the eager foreach
path stays the default and is what the float64 reference tests check first.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch


@functools.cache
def compiled(update: Callable) -> Callable:
    """`update` compiled with inductor, once per process; the group's lr and other per-step numbers
    must be passed as tensors so that a new value does not recompile."""
    return torch.compile(update, fullgraph=True, dynamic=False)
