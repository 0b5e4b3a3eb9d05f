"""Momentum SGD in the form of Goyal et al. (2017), with momentum correction.

Goyal et al. (section 3, "Momentum correction") contrast the reference form of momentum SGD, their
eq. (9), which torch.optim.SGD implements,

    u <- m * u + (g + wd * w)             w <- w - lr * u

with the popular variant (Caffe2's) that absorbs the learning rate into the buffer, eq. (10),
v = lr * u:

    v <- m * v + lr * (g + wd * w)        w <- w - v

The two agree while lr is fixed. When lr changes, v still holds updates scaled by the old lr, so
their Remark 2 applies the momentum correction v <- (lr_new / lr_old) * v first, which restores the
equivalence. Without it the lr-inside form lags every lr change, most during warmup. Weight decay is
the L2 term wd * w added to the gradient (section 3, "Weight decay"), set per parameter group so that
normalisation and bias parameters can have 0.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from largebatch.optim.base import GroupwiseOptimizer
from largebatch.optim.registry import SGDOptions as _Defaults


class MomentumSGD(GroupwiseOptimizer):
    """Momentum SGD with Goyal's lr-inside-momentum form and momentum correction.

    Options (all per parameter group, with these defaults):
      lr                   set by the trainer before each step via ``group["lr"] = schedule(step)``;
      momentum             m in [0, 1); 0 gives plain SGD (no buffers are kept);
      weight_decay         the L2 coefficient wd added to the gradient;
      nesterov             lr inside: w <- w - (m * v_new + lr * d); lr outside: torch's Nesterov
                           w <- w - lr * (d + m * u_new), with d = g + wd * w;
      lr_in_momentum       True: Goyal's form above; False: torch.optim.SGD's form;
      momentum_correction  lr inside only: rescale v by lr_new / lr_old when the lr changes.

    State per parameter: ``momentum_buffer`` (v or u; zero before the first step, so the first step
    is v = lr * d, u = d) and, in the lr-inside form, ``momentum_lr``, the lr the buffer was last
    updated with. Keeping that lr per parameter, in the optimizer state, means the correction survives
    a state_dict round trip and stays exact for a parameter that skipped steps (grad None). If the
    buffer was last updated at lr 0 it is zero and is not rescaled (the ratio would be infinite); this
    is the one place the corrected lr-inside form differs from the lr-outside form, whose u keeps
    accumulating gradients while lr is 0. The buffers of the two forms are not interchangeable.

    Parameters whose grad is None are skipped entirely. Sparse gradients are not supported. The update
    allocates no parameter-sized temporaries and is written with ``torch._foreach_*`` kernels, applied
    either to all of a group's tensors at once (``foreach=True``: few kernel launches, what a GPU
    needs) or to one tensor at a time (``foreach=False``: each tensor stays in cache across the four
    passes of its update, which on CPU is faster, about 25% for ResNet-50). The arithmetic is the
    same either way; ``foreach=None`` (default) picks True when all of a group's stepped parameters
    are off the CPU, as torch.optim.SGD does.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = _Defaults.momentum,
                 weight_decay: float = 0.0, nesterov: bool = _Defaults.nesterov, *,
                 lr_in_momentum: bool = _Defaults.lr_in_momentum,
                 momentum_correction: bool = _Defaults.momentum_correction, foreach: bool | None = None) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is not allowed; it must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum = {momentum!r} is not allowed; it must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is not allowed; it must be >= 0")
        if nesterov and momentum == 0:
            raise ValueError("nesterov = True is not allowed with momentum = 0; Nesterov needs momentum > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, nesterov=nesterov,
                        lr_in_momentum=lr_in_momentum, momentum_correction=momentum_correction,
                        foreach=foreach)
        super().__init__(params, defaults)

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        momentum = group["momentum"]
        lr_inside = group["lr_in_momentum"]
        params, grads = self._params_and_grads(group)
        if not params:
            return
        bufs: list[Tensor] = []
        decays: list[float] = []  # per buffer: momentum, times lr / lr_old where the correction applies
        for p in params if momentum != 0 else []:
            bufs.append(self._state_tensor(p, "momentum_buffer"))
            state = self.state[p]
            decay = momentum
            if lr_inside:
                old_lr = state.get("momentum_lr", lr)
                if group["momentum_correction"] and old_lr != lr and old_lr != 0:
                    decay = momentum * (lr / old_lr)
                state["momentum_lr"] = lr
            decays.append(decay)
        options = dict(lr=lr, weight_decay=group["weight_decay"], nesterov=group["nesterov"], lr_inside=lr_inside,
                       momentum=momentum)
        foreach = group["foreach"]
        if foreach is None:
            foreach = all(p.device.type != "cpu" for p in params)
        if foreach:
            _update(params, grads, bufs, decays, **options)
        else:
            for i in range(len(params)):
                _update(params[i:i + 1], grads[i:i + 1], bufs[i:i + 1], decays[i:i + 1], **options)


def _update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], decays: list[float], *, lr: float,
            weight_decay: float, nesterov: bool, lr_inside: bool, momentum: float) -> None:
    """One step on `params` in place; `bufs` and `decays` are empty when momentum is 0.

    d = g + wd * w is never materialised: its two terms are added separately, so the step allocates
    no parameter-sized temporaries (on CPU, allocating them costs more than the arithmetic). Where the
    update uses d twice (Nesterov), the weight-decay term is applied to w first, while w is still the
    old value that the buffer update used.
    """
    if bufs:
        if len(set(decays)) == 1:
            torch._foreach_mul_(bufs, decays[0])
        else:
            torch._foreach_mul_(bufs, decays)
        scale = lr if lr_inside else 1.0  # v accumulates lr * d, u accumulates d
        torch._foreach_add_(bufs, grads, alpha=scale)
        if weight_decay != 0:
            torch._foreach_add_(bufs, params, alpha=scale * weight_decay)
    if weight_decay != 0 and (nesterov or not bufs):
        torch._foreach_add_(params, params, alpha=-lr * weight_decay)
    if not bufs:
        torch._foreach_add_(params, grads, alpha=-lr)
    elif not nesterov:
        torch._foreach_add_(params, bufs, alpha=-1.0 if lr_inside else -lr)
    else:
        torch._foreach_add_(params, bufs, alpha=-momentum if lr_inside else -lr * momentum)
        torch._foreach_add_(params, grads, alpha=-lr)
