"""K-FAC as a preconditioner of any optimizer: after backward, each registered layer's averaged
gradient is replaced by its natural-gradient direction (damped Kronecker-factored Fisher)⁻¹ ∇W, and
the optimizer (SGD, LARS, LAMB) steps with it.

Osawa et al. 2019's schedule of stale statistics: factors are re-estimated every `factor_every`
steps and inverted every `inverse_every` steps, each interval changing at `every_milestones` (often
at first, rarer later). Factors are running averages with `decay`; the inverse work is spread over
the ranks by cost and each inverse sent from the rank that made it (`largebatch.dist.kfac_comm`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from largebatch.optim.kfac.inverse import (KroneckerInverse, invert_kronecker, precondition_kronecker,
                                           precondition_unitwise)
from largebatch.optim.kfac.layers import BatchNormLayer, KroneckerLayer, find_layers


@dataclass(frozen=True)
class KFACOptions:
    damping: float = 1e-3
    damping_mode: str = "pi"  # "pi" (factored, π-split) or "exact" Tikhonov (eigen only)
    decay: float = 0.95
    factor_every: tuple[int, ...] = (1,)
    inverse_every: tuple[int, ...] = (1,)
    every_milestones: tuple[int, ...] = ()  # steps where factor_every / inverse_every move to their next entry
    kl_clip: float = 1e-3  # 0: off
    factor_dtype: torch.dtype | None = None  # None: the parameters' dtype
    inverse_method: str = "eigen"
    inverse_dtype: torch.dtype = torch.float32  # at least the parameters' dtype
    batchnorm: bool = True


class FactorComm(Protocol):
    """How the preconditioner reaches the other ranks (`largebatch.dist.kfac_comm.KFACComm`; the
    maths here never imports torch.distributed)."""

    rank: int

    def average_factors(self, factors: Sequence[torch.Tensor], wire_dtype: torch.dtype) -> list[torch.Tensor]: ...

    def owners(self, costs: Sequence[float]) -> list[int]: ...

    def share(self, results: Sequence[list[torch.Tensor] | None], shapes: Sequence[list[torch.Size]],
              owners: Sequence[int], dtype: torch.dtype, device: torch.device) -> list[list[torch.Tensor]]: ...


def interval(step: int, every: Sequence[int], milestones: Sequence[int]) -> int:
    """The entry of `every` in force at `step`: every[i] from milestones[i - 1] on."""
    return every[sum(step >= m for m in milestones)]


def due(step: int, every: Sequence[int], milestones: Sequence[int]) -> bool:
    """Whether an update falls on `step`: every interval's count starts at its milestone (step 0 first)."""
    start = max((m for m in milestones if m <= step), default=0)
    return (step - start) % interval(step, every, milestones) == 0


class KFACPreconditioner:
    """Hooks on the model's layers, their factors and inverses, and the preconditioning of their gradients."""

    def __init__(self, model: nn.Module, options: KFACOptions, comm: FactorComm):
        self.options, self.comm = options, comm
        self.layers, self.left_out = find_layers(model, options.batchnorm)
        parameter = next(model.parameters())
        self.param_dtype, self.device = parameter.dtype, parameter.device
        self.factor_dtype = options.factor_dtype or self.param_dtype
        self.inverse_dtype = torch.promote_types(options.inverse_dtype, self.param_dtype)
        self.kronecker = [layer for layer in self.layers if isinstance(layer, KroneckerLayer)]
        costs = [float(layer.dims[0] ** 3 + layer.dims[1] ** 3) for layer in self.kronecker]
        self.owners = comm.owners(costs)
        self.factors: dict[str, list[torch.Tensor]] = {}  # running averages: [A, G] or [F (channels × 2 × 2)]
        self.inverses: dict[str, KroneckerInverse] = {}
        self.capturing = False
        self.grad_scale = 1.0  # turns a layer's output gradient into per-example Ds
        self.damping_raised: list[str] = []
        self.last_nu = 1.0
        self._handles = [layer.module.register_forward_hook(self._forward_hook(layer)) for layer in self.layers]

    def remove_hooks(self) -> None:
        for handle in self._handles:
            handle.remove()

    def _forward_hook(self, layer: KroneckerLayer | BatchNormLayer):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor | None:
            if not (self.capturing and module.training and torch.is_grad_enabled()):
                return None
            layer.add_input(inputs[0], self.factor_dtype)
            # A hook on a view (ghost BN returns one) is lost when an in-place ReLU rewrites the view.
            captured = output.clone() if output._is_view() else output
            captured.register_hook(lambda grad: layer.add_output_grad(grad, self.grad_scale, self.factor_dtype))
            return captured
        return hook

    def factor_due(self, step: int) -> bool:
        return due(step, self.options.factor_every, self.options.every_milestones)

    def inverse_due(self, step: int) -> bool:
        return due(step, self.options.inverse_every, self.options.every_milestones)

    def begin_step(self, step: int, grad_scale: float) -> None:
        """Capture this step's statistics if its factors are due (or there are none yet); drop what a
        skipped step left."""
        for layer in self.layers:
            layer.take_factors()
        self.capturing = self.factor_due(step) or not self.factors  # also when step 0 was skipped
        self.grad_scale = grad_scale

    def update_factors(self) -> None:
        """The step's factors, averaged over examples and ranks, folded into the running averages."""
        batch = []
        for layer in self.layers:
            *sums, examples = layer.take_factors()
            if examples == 0 or any(s is None for s in sums):
                raise RuntimeError(f"K-FAC saw no forward and backward pass of layer {layer.name!r} in this step")
            batch.extend(s / examples for s in sums)
        averaged = iter(self.comm.average_factors(batch, self.factor_dtype))
        decay = self.options.decay
        for layer in self.layers:
            new = [next(averaged).to(self.param_dtype) for _ in range(2 if isinstance(layer, KroneckerLayer) else 1)]
            old = self.factors.get(layer.name)
            self.factors[layer.name] = new if old is None else [decay * o + (1 - decay) * n for o, n in zip(old, new)]
        self.capturing = False

    def update_inverses(self) -> None:
        """Each Kronecker layer's inverse, made by its owner rank and shared with all."""
        o = self.options
        results: list[list[torch.Tensor] | None] = []
        shapes = []
        for layer, owner in zip(self.kronecker, self.owners):
            da, dg = layer.dims
            if o.inverse_method == "eigen":
                shapes.append([torch.Size([da, da]), torch.Size([dg, dg]), torch.Size([da]), torch.Size([dg]),
                               torch.Size([2])])
            else:
                shapes.append([torch.Size([da, da]), torch.Size([dg, dg]), torch.Size([2])])
            if owner != self.comm.rank:
                results.append(None)
                continue
            a, g = self.factors[layer.name]
            inverse = invert_kronecker(a, g, o.damping, o.inverse_method, o.damping_mode, self.inverse_dtype)
            scalars = torch.tensor([inverse.damping, inverse.pi], dtype=self.inverse_dtype, device=self.device)
            results.append([*inverse.tensors(), scalars])
        shared = self.comm.share(results, shapes, self.owners, self.inverse_dtype, self.device)
        self.damping_raised = []
        for layer, tensors in zip(self.kronecker, shared):
            *parts, scalars = tensors
            damping, pi = scalars.tolist()
            inverse = KroneckerInverse.from_tensors(o.inverse_method, damping, pi, parts)
            if damping > 1.5 * o.damping:  # raised tenfold at least; the rest is the scalars' rounding
                self.damping_raised.append(f"{layer.name}: {damping:g}")
            self.inverses[layer.name] = inverse

    def precondition(self, lr: float) -> None:
        """Replace every registered layer's gradient by its preconditioned one, scaled down as a whole
        when the update's predicted KL divergence lr²·Σ⟨Δ, ∇⟩ exceeds kl_clip (kfac-pytorch's kl_clip)."""
        o = self.options
        updates = []
        for layer in self.layers:
            grad = layer.gradient()
            if isinstance(layer, KroneckerLayer):
                new = precondition_kronecker(grad, self.inverses[layer.name], o.damping_mode)
            else:
                new = precondition_unitwise(grad, self.factors[layer.name][0], o.damping)
            updates.append((layer, grad, new))
        nu = 1.0
        if o.kl_clip > 0 and updates:
            vg = sum((new * grad).sum() for _, grad, new in updates).item() * lr ** 2
            nu = min(1.0, math.sqrt(o.kl_clip / abs(vg))) if vg != 0 else 1.0
        for layer, _, new in updates:
            layer.set_gradient(new * nu)
        self.last_nu = nu

    def state_dict(self) -> dict[str, Any]:
        return {"factors": {k: [t.clone() for t in v] for k, v in self.factors.items()},
                "inverses": {k: {"method": v.method, "damping": v.damping, "pi": v.pi,
                                 "tensors": [t.clone() for t in v.tensors()]} for k, v in self.inverses.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.factors = {k: [t.to(self.device) for t in v] for k, v in state["factors"].items()}
        self.inverses = {name: KroneckerInverse.from_tensors(saved["method"], saved["damping"], saved["pi"],
                                                             [t.to(self.device) for t in saved["tensors"]])
                         for name, saved in state["inverses"].items()}
