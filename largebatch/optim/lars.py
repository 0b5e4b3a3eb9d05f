"""LARS (You, Gitman and Ginsburg 2017/2018) and NVIDIA apex's LARC variants, with batched norms.

LARS gives every parameter tensor (every "layer") its own local learning rate from the ratio of its
weight norm to its gradient norm, so that the update of each layer is a fixed fraction of its weights
whatever the scale of its gradient. That is what lets very large mini-batches train with a large
global lr. The norms of all of a group's tensors are computed with one ``torch._foreach_norm`` call
for the weights and one for the gradients (the batched norms of Fujitsu's ResNet-50 runs, Mikami et
al. 2018), and the trust ratios stay on the device: the step never synchronises with the host.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from largebatch.optim import fused
from largebatch.optim.base import GroupwiseOptimizer
from largebatch.optim.compile import compiled
from largebatch.optim.registry import LARS_MODES, LARSOptions as _Defaults


class LARS(GroupwiseOptimizer):
    """Layer-wise Adaptive Rate Scaling, momentum SGD with a per-tensor local learning rate.

    For each parameter tensor p of a group, with gradient g, the group's lr, momentum m, weight decay
    beta, trust coefficient eta and eps::

        w_norm = ||p||,  g_norm = ||g||                                  (L2 norms of the whole tensor)
        trust  = eta * w_norm / (g_norm + beta * w_norm + eps)  if w_norm > 0 and g_norm > 0, else 1
        local  = trust                        mode "lars" and "larc_scale"
                 min(trust / lr, 1)           mode "larc_clip", where trust is the 1 fallback it stays 1
                                              (and where lr == 0 it is 1: the step is 0 anyway)
        local  = 1                            in a group whose "trust" is False
        d      = g + beta * p
        v      <- m * v + lr * local * d      (v is 0 before the first step, so first v = lr * local * d)
        p      <- p - v                                         nesterov=False
        p      <- p - (m * v + lr * local * d)                  nesterov=True (v the new buffer)

    so the lr is inside the momentum buffer (Goyal et al.'s eq. (10) form, as in You et al.'s
    algorithm 1). "larc_clip" is apex's LARC with ``clip=True``: the effective per-tensor rate
    ``lr * local`` is ``min(trust, lr)``, so LARS can lower a layer's rate but never raise it above the
    global lr. "larc_scale" is apex's LARC with ``clip=False`` and is the same arithmetic as "lars";
    it is kept as a name so configurations can say which recipe they follow. With momentum 0 no buffer
    is kept and p <- p - lr * local * d. No momentum correction is applied when lr changes.

    Per-group options: lr, momentum, weight_decay, trust_coefficient, eps, nesterov, mode and
    ``trust`` (default True). ``param_groups(model, wd, exclude_bn_bias=True)`` gives a "no_decay"
    group with weight decay 0; setting ``trust=False`` on it as well excludes batch-norm and bias
    parameters from the trust ratio (plain momentum SGD at the global lr), as LARS recipes do. Weight
    decay is always the group's ``weight_decay``, whatever ``trust`` is.

    State per parameter: ``momentum_buffer`` (momentum > 0 only) and ``local_lr``, a 0-dim tensor with
    the ``local`` factor of the parameter's last step (1 in trust=False groups), for logging trust
    ratios. Parameters whose grad is None are skipped (buffer and ``local_lr`` untouched). Sparse
    gradients are not supported.

    ``impl`` chooses how the step runs, with the same arithmetic and state: "foreach" (default)
    batches ``torch._foreach_*`` ops over the group; "compiled" runs one expression per tensor through
    ``torch.compile`` (``largebatch.optim.compile``; the first step pays the compilation); "fused"
    runs one C++ kernel per group on the CPU that reads each weight and gradient twice and writes
    once (``largebatch.optim.fused``; float32 and float64 CPU parameters, checked when built). The
    state is the same whatever the impl, so a checkpoint of one resumes under another.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float, momentum: float = _Defaults.momentum,
                 weight_decay: float = 0.0, trust_coefficient: float = _Defaults.trust_coefficient,
                 eps: float = _Defaults.eps, nesterov: bool = _Defaults.nesterov, mode: str = _Defaults.mode,
                 impl: str = _Defaults.impl) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is not allowed; it must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum = {momentum!r} is not allowed; it must be in [0, 1)")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is not allowed; it must be >= 0")
        if not trust_coefficient > 0:
            raise ValueError(f"trust_coefficient = {trust_coefficient!r} is not allowed; it must be > 0")
        if not eps >= 0:
            raise ValueError(f"eps = {eps!r} is not allowed; it must be >= 0")
        if nesterov and momentum == 0:
            raise ValueError("nesterov = True is not allowed with momentum = 0; Nesterov needs momentum > 0")
        if mode not in LARS_MODES:
            raise ValueError(f"mode = {mode!r} is not allowed; choose one of {', '.join(map(repr, LARS_MODES))}")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay, trust_coefficient=trust_coefficient,
                        eps=eps, nesterov=nesterov, mode=mode, trust=True)
        super().__init__(params, defaults)
        self._use_impl(impl)

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        momentum = group["momentum"]
        weight_decay = group["weight_decay"]
        params, grads = self._params_and_grads(group)
        if not params:
            return
        bufs = [self._state_tensor(p, "momentum_buffer") for p in params] if momentum != 0 else []

        options = dict(momentum=momentum, weight_decay=weight_decay, trust_coefficient=group["trust_coefficient"],
                       eps=group["eps"], nesterov=group["nesterov"], clip=group["mode"] == "larc_clip",
                       trust=group["trust"])
        if self.impl == "fused":
            local = fused.lars_step_(params, grads, bufs, lr=lr, **options)
        elif self.impl == "compiled":
            lr_tensor = torch.tensor(lr, dtype=params[0].dtype, device=params[0].device)
            local = compiled(lars_update_)(params, grads, bufs, lr_tensor, **options)
        else:
            local = self._local_lrs(group, params, grads, lr)  # 1-d tensor, one entry per parameter
            self._foreach_update(params, grads, bufs, local * lr, momentum, weight_decay, group["nesterov"])
        for p, loc in zip(params, local.unbind(0)):
            self.state[p]["local_lr"] = loc

    def layer_ratios(self) -> dict[Tensor, Tensor]:
        return self._ratios_in_state("local_lr")

    @staticmethod
    def _foreach_update(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], rates: Tensor,
                        momentum: float, weight_decay: float, nesterov: bool) -> None:
        """The update of the class docstring with in-place foreach ops, `rates` = lr * local per parameter.

        Per-parameter factors enter through addcmul with 0-dim tensors, so the step allocates no
        weight-sized temporary (on CPU a fresh temporary per step costs more than the arithmetic).
        """
        def per_param(factors: Tensor) -> list[Tensor]:
            return list(factors.unbind(0))

        if bufs:  # v <- m v + rate * g + rate * beta * p
            torch._foreach_mul_(bufs, momentum)
            torch._foreach_addcmul_(bufs, grads, per_param(rates))
            if weight_decay != 0:
                torch._foreach_addcmul_(bufs, params, per_param(rates * weight_decay))
            if not nesterov:
                torch._foreach_sub_(params, bufs)
                return
        # p <- (1 - rate * beta) p - rate * g [- m v_new]: no momentum, or Nesterov's look-ahead
        if weight_decay != 0:
            torch._foreach_mul_(params, per_param(1 - rates * weight_decay))
        torch._foreach_addcmul_(params, grads, per_param(-rates))
        if bufs:
            torch._foreach_add_(params, bufs, alpha=-momentum)

    @staticmethod
    def _local_lrs(group: dict, params: list[Tensor], grads: list[Tensor], lr: float) -> Tensor:
        """The `local` factor of every parameter (see the class docstring), as one 1-d tensor."""
        ref = params[0]
        if not group["trust"]:
            return torch.ones(len(params), dtype=ref.dtype, device=ref.device)
        w_norm = torch.stack(torch._foreach_norm(params)).to(ref.dtype)
        g_norm = torch.stack(torch._foreach_norm(grads)).to(ref.dtype)
        trust = group["trust_coefficient"] * w_norm / (g_norm + group["weight_decay"] * w_norm + group["eps"])
        valid = (w_norm > 0) & (g_norm > 0)
        if group["mode"] == "larc_clip":
            trust = torch.clamp(trust / lr, max=1.0) if lr > 0 else torch.ones_like(trust)
        return torch.where(valid, trust, torch.ones_like(trust))


def lars_update_(params: list[Tensor], grads: list[Tensor], bufs: list[Tensor], lr: Tensor, *, momentum: float,
                 weight_decay: float, trust_coefficient: float, eps: float, nesterov: bool, clip: bool,
                 trust: bool) -> Tensor:
    """LARS's step (the class docstring) written as one elementwise expression per tensor, the form
    torch.compile fuses into one loop each; updates params and bufs (empty: no momentum) in place and
    returns the local factors. lr is a 0-dim tensor so that a new lr does not recompile."""
    locals_ = []
    for i, (p, g) in enumerate(zip(params, grads)):
        if trust:
            w_norm = torch.linalg.vector_norm(p)
            g_norm = torch.linalg.vector_norm(g)
            ratio = trust_coefficient * w_norm / (g_norm + weight_decay * w_norm + eps)
            if clip:  # min(trust / lr, 1); lr = 0 gives inf, clipped to 1 as in the eager path
                ratio = torch.clamp(ratio / lr, max=1.0)
            local = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        else:
            local = torch.ones((), dtype=p.dtype, device=p.device)
        step = (lr * local) * (g + weight_decay * p)
        if bufs:
            bufs[i].mul_(momentum).add_(step)
            p.sub_(step + momentum * bufs[i] if nesterov else bufs[i])
        else:
            p.sub_(step)
        locals_.append(local)
    return torch.stack(locals_)
