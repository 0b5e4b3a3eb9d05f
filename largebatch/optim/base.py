"""What the project's optimizers share: a step that applies one group update to each param group."""

from __future__ import annotations

from collections.abc import Callable

import torch

from largebatch.optim import fused
from largebatch.optim.registry import LAYERWISE_IMPLS


class GroupwiseOptimizer(torch.optim.Optimizer):
    """An optimizer whose `step` runs `_step_group` on every param group (the maths lives there)."""

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient; returns closure() if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group: dict) -> None:
        raise NotImplementedError

    def _use_impl(self, impl: str) -> None:
        """Run the group updates with `impl`, one of LAYERWISE_IMPLS (LARS and LAMB). "fused" is checked
        now, when the optimizer is built: every parameter must be one its CPU kernels update, and the
        kernels must compile here (once per machine; a ValueError naming `impl` otherwise)."""
        if impl not in LAYERWISE_IMPLS:
            raise ValueError(f"impl = {impl!r} is not allowed; choose one of {', '.join(map(repr, LAYERWISE_IMPLS))}")
        if impl == "fused":
            fused.check_params((p for group in self.param_groups for p in group["params"]), "impl", LAYERWISE_IMPLS)
        self.impl = impl

    def layer_ratios(self) -> dict[torch.Tensor, torch.Tensor]:
        """Parameter -> the per-layer factor its last step applied (LARS's local lr, LAMB's trust
        ratio), for the parameters of groups with a trust ratio; empty for optimizers without one."""
        return {}

    def _ratios_in_state(self, key: str) -> dict[torch.Tensor, torch.Tensor]:
        """`layer_ratios` for an optimizer that keeps each parameter's last factor as state `key`."""
        return {p: self.state[p][key] for group in self.param_groups if group.get("trust", False)
                for p in group["params"] if key in self.state.get(p, {})}

    def _params_and_grads(self, group: dict) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The group's parameters that have a gradient (the ones a step updates) and those gradients;
        sparse gradients are refused."""
        params = [p for p in group["params"] if p.grad is not None]
        if any(p.grad.is_sparse for p in params):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return params, [p.grad for p in params]

    def _state_tensor(self, p: torch.Tensor, name: str) -> torch.Tensor:
        """The parameter's state tensor `name` (a momentum buffer, a moment), zeros like p on first use."""
        state = self.state[p]
        if name not in state:
            state[name] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state[name]
