"""Gradient clipping by global norm (`optim.clip_grad_norm`), on the averaged, unscaled gradient.

After DDP's all-reduce every rank holds the same mean gradient, so the global norm needs no
collective of its own and the clipped step is the one a single process with the global batch takes.
"""

from __future__ import annotations

from typing import Any

import torch

from largebatch.extensions import Extension


class GradClip(Extension):
    """Scale all gradients by min(1, max_norm / ||g||), ||g|| the L2 norm over every parameter.

    Logs, per window, the mean of the norms before clipping (`grad_norm`) and the fraction of steps
    that were clipped (`clipped`); the norms stay on the device until the window is logged."""

    name = "grad_clip"

    def __init__(self, max_norm: float):
        if not max_norm > 0:
            raise ValueError(f"max_norm = {max_norm!r} is not allowed; it must be > 0")
        self.max_norm = max_norm
        self._norms: list[torch.Tensor] = []

    def on_gradients(self, step: int) -> None:
        params = [p for p in self.ctx.model.parameters() if p.grad is not None]
        self._norms.append(torch.nn.utils.clip_grad_norm_(params, self.max_norm).detach())

    def log_values(self) -> dict[str, Any]:
        if not self._norms:
            return {}
        norms = torch.stack(self._norms).double()
        self._norms = []
        return {"grad_norm": norms.mean().item(), "clipped": (norms > self.max_norm).double().mean().item()}
