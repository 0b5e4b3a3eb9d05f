"""LAMB (You et al. 2019, "Large Batch Optimization for Deep Learning: Training BERT in 76 minutes").

LAMB is Adam with decoupled weight decay whose per-tensor update is rescaled by a trust ratio, the
ratio of the weight norm to the update norm, as LARS does for momentum SGD. The norms of all of a
group's tensors are computed with one ``torch._foreach_norm`` call for the weights and one for the
updates, and the trust ratios stay on the device: the step never synchronises with the host.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from largebatch.optim import fused
from largebatch.optim.base import GroupwiseOptimizer
from largebatch.optim.compile import compiled
from largebatch.optim.registry import LAMBOptions as _Defaults


class LAMB(GroupwiseOptimizer):
    """Layer-wise Adaptive Moments for Batch training (You et al. 2019, algorithm 2).

    For each parameter tensor p of a group, with gradient g, the group's lr, betas (b1, b2), eps,
    weight decay lam and the parameter's step count t (1 on its first step)::

        m <- b1 * m + (1 - b1) * g                 v <- b2 * v + (1 - b2) * g * g      (m, v start at 0)
        m_hat = m / (1 - b1 ** t)                  v_hat = v / (1 - b2 ** t)           (bias_correction)
        m_hat = m                                  v_hat = v                           (no bias_correction)
        u = m_hat / (sqrt(v_hat) + eps) + lam * p                   (decoupled weight decay, in the update)
        r = ||p|| / ||u||  if ||p|| > 0 and ||u|| > 0, else 1;   r = min(r, trust_clip) if trust_clip is set
        r = 1              in a group whose "trust" is False
        p <- p - lr * r * u

    with L2 norms of whole tensors. Per-group options: lr, betas, eps, weight_decay, bias_correction,
    trust_clip and ``trust`` (default True; set it False on the "no_decay" group of
    ``param_groups(model, wd, exclude_bn_bias=True)`` to exclude batch-norm and bias parameters from
    the trust ratio, which then get plain AdamW steps with their group's weight decay).

    State per parameter: ``step`` (an int, the number of steps the parameter has taken), ``exp_avg``
    (m), ``exp_avg_sq`` (v) and ``trust_ratio``, a 0-dim tensor with the r of the last step, for
    logging. Parameters whose grad is None are skipped, their step count included. Sparse gradients
    are not supported.

    ``impl`` chooses how the step runs, with the same arithmetic and state: "foreach" (default)
    batches ``torch._foreach_*`` ops over the group; "compiled" runs one expression per tensor through
    ``torch.compile`` (``largebatch.optim.compile``; the first step pays the compilation); "fused"
    runs one C++ kernel per group on the CPU, two passes per tensor: the moments and the two norms,
    then the update recomputed from the new moments (``largebatch.optim.fused``; float32 and float64
    CPU parameters, checked when built). The state is the same whatever the impl, so a checkpoint of
    one resumes under another.
    """

    def __init__(self, params: Iterable[Tensor] | Iterable[dict], lr: float,
                 betas: tuple[float, float] = _Defaults.betas, eps: float = _Defaults.eps, weight_decay: float = 0.0,
                 bias_correction: bool = _Defaults.bias_correction, trust_clip: float | None = _Defaults.trust_clip,
                 impl: str = _Defaults.impl) -> None:
        if not lr >= 0:
            raise ValueError(f"lr = {lr!r} is not allowed; it must be >= 0")
        if not (len(betas) == 2 and all(0 <= b < 1 for b in betas)):
            raise ValueError(f"betas = {betas!r} is not allowed; both must be in [0, 1)")
        if not eps >= 0:
            raise ValueError(f"eps = {eps!r} is not allowed; it must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay = {weight_decay!r} is not allowed; it must be >= 0")
        if trust_clip is not None and not trust_clip >= 0:
            raise ValueError(f"trust_clip = {trust_clip!r} is not allowed; it must be None or >= 0 (0: no clamp)")
        trust_clip = trust_clip or None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, trust_clip=trust_clip, trust=True)
        super().__init__(params, defaults)
        self._use_impl(impl)

    def _step_group(self, group: dict) -> None:
        lr = float(group["lr"])
        beta1, beta2 = group["betas"]
        params, grads = self._params_and_grads(group)
        if not params:
            return
        exp_avgs = [self._state_tensor(p, "exp_avg") for p in params]
        exp_avg_sqs = [self._state_tensor(p, "exp_avg_sq") for p in params]
        bc1: list[float] = []  # 1 - b1 ** t per parameter (1 without bias correction)
        bc2_sqrt: list[float] = []  # sqrt(1 - b2 ** t) per parameter
        for p in params:
            state = self.state[p]
            state["step"] = t = int(state.get("step", 0)) + 1
            bias_correction = group["bias_correction"]
            bc1.append(1 - beta1 ** t if bias_correction else 1.0)
            bc2_sqrt.append(math.sqrt(1 - beta2 ** t) if bias_correction else 1.0)

        # u = (m / bc1) / (sqrt(v) / sqrt(bc2) + eps) + lam * p = scale * m / (sqrt(v) + denominator_eps) + lam * p
        scale = [s / b for s, b in zip(bc2_sqrt, bc1)]
        denominator_eps = [group["eps"] * s for s in bc2_sqrt]
        if self.impl == "fused":
            ratio = fused.lamb_step_(params, grads, exp_avgs, exp_avg_sqs, lr=lr, scale=scale,
                                     denominator_eps=denominator_eps, beta1=beta1, beta2=beta2,
                                     weight_decay=group["weight_decay"], trust_clip=group["trust_clip"],
                                     trust=group["trust"])
        elif self.impl == "compiled":
            def as_tensor(values: float | list[float]) -> Tensor:
                return torch.tensor(values, dtype=params[0].dtype, device=params[0].device)

            ratio = compiled(lamb_update_)(params, grads, exp_avgs, exp_avg_sqs, as_tensor(lr), as_tensor(bc1),
                                           as_tensor(bc2_sqrt), beta1=beta1, beta2=beta2, eps=group["eps"],
                                           weight_decay=group["weight_decay"], trust_clip=group["trust_clip"] or None,
                                           trust=group["trust"])
        else:
            ratio = self._foreach_update(group, params, grads, exp_avgs, exp_avg_sqs, lr, scale, denominator_eps)
        for p, r in zip(params, ratio.unbind(0)):
            self.state[p]["trust_ratio"] = r

    def layer_ratios(self) -> dict[Tensor, Tensor]:
        return self._ratios_in_state("trust_ratio")

    def _foreach_update(self, group: dict, params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                        exp_avg_sqs: list[Tensor], lr: float, scale: list[float],
                        denominator_eps: list[float]) -> Tensor:
        """The update of the class docstring with foreach ops, u = scale * m / (sqrt(v) + denominator_eps)
        + lam * p per parameter; returns the trust ratios."""
        beta1, beta2 = group["betas"]
        torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)  # m + (1 - b1) (g - m) = b1 m + (1 - b1) g
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)

        # u built in one temporary per parameter (on CPU a fresh weight-sized temporary costs more than
        # the arithmetic)
        update = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(update, denominator_eps)
        torch._foreach_reciprocal_(update)
        torch._foreach_mul_(update, exp_avgs)
        torch._foreach_mul_(update, scale)
        if group["weight_decay"] != 0:
            torch._foreach_add_(update, params, alpha=group["weight_decay"])

        ratio = self._trust_ratios(group, params, update)
        torch._foreach_addcmul_(params, update, list((ratio * -lr).unbind(0)))
        return ratio

    @staticmethod
    def _trust_ratios(group: dict, params: list[Tensor], update: list[Tensor]) -> Tensor:
        """The trust ratio r of every parameter (see the class docstring), as one 1-d tensor."""
        ref = params[0]
        if not group["trust"]:
            return torch.ones(len(params), dtype=ref.dtype, device=ref.device)
        w_norm = torch.stack(torch._foreach_norm(params)).to(ref.dtype)
        u_norm = torch.stack(torch._foreach_norm(update)).to(ref.dtype)
        valid = (w_norm > 0) & (u_norm > 0)
        ratio = torch.where(valid, w_norm / u_norm, torch.ones_like(w_norm))
        if group["trust_clip"]:
            ratio = torch.clamp(ratio, max=group["trust_clip"])
        return ratio


def lamb_update_(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                 lr: Tensor, bc1: Tensor, bc2_sqrt: Tensor, *, beta1: float, beta2: float, eps: float,
                 weight_decay: float, trust_clip: float | None, trust: bool) -> Tensor:
    """LAMB's step (the class docstring) written as one elementwise expression per tensor, the form
    torch.compile fuses; updates params and moments in place and returns the trust ratios. lr and the
    per-parameter bias corrections (1-d) are tensors so that new values do not recompile."""
    ratios = []
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        update = (m / bc1[i]) / (v.sqrt() / bc2_sqrt[i] + eps) + weight_decay * p
        if trust:
            w_norm = torch.linalg.vector_norm(p)
            u_norm = torch.linalg.vector_norm(update)
            ratio = torch.where((w_norm > 0) & (u_norm > 0), w_norm / u_norm, torch.ones_like(w_norm))
            if trust_clip is not None:
                ratio = torch.clamp(ratio, max=trust_clip)
        else:
            ratio = torch.ones((), dtype=p.dtype, device=p.device)
        p.sub_(lr * ratio * update)
        ratios.append(ratio)
    return torch.stack(ratios)
