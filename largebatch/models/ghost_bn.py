"""Ghost batch normalisation: BN statistics over fixed-size chunks of the batch.

Goyal et al. 2017 (§5.1) keep the BN batch size fixed at a per-worker n (32 in the paper) while
the total mini-batch grows, because the BN statistics are part of the model being optimised: a
k·n batch normalised as k groups of n is the *same* loss function as k workers each normalising
their own n samples. ``GhostBatchNorm{1,2}d`` reproduce that on a single device (or inside a
worker whose local batch is larger than n) by normalising each consecutive chunk of ``bn_batch``
samples with its own mean and biased variance.

The classes subclass ``nn.BatchNorm1d`` / ``nn.BatchNorm2d`` and add no parameters or buffers, so
state_dicts are interchangeable with plain BatchNorm and ``isinstance(m, nn.BatchNorm2d)`` still
holds (weight-decay filters, zero-γ init and SyncBatchNorm conversion keep working).
"""

from __future__ import annotations

import torch
from torch import nn


class _GhostBatchNorm:
    """Mixin holding the ghost forward; combined with a concrete ``nn.BatchNorm*d`` below.

    Training with ``0 < bn_batch < N`` uses per-chunk statistics; every other case (eval mode,
    ``bn_batch == 0``, ``N <= bn_batch`` i.e. a single chunk) is the parent's native forward.
    """

    def __init__(self, *args, bn_batch: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.bn_batch = _check_bn_batch(bn_batch)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bn_batch={self.bn_batch}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        n = x.shape[0]
        if not self.training or self.bn_batch == 0 or n <= self.bn_batch:
            return super().forward(x)
        if n % self.bn_batch:
            raise ValueError(
                f"GhostBatchNorm: batch size {n} is not a multiple of bn_batch={self.bn_batch}"
            )
        return self._ghost_forward(x)

    def _ghost_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise each of the G = N / bn_batch chunks with its own batch statistics.

        Each chunk (a contiguous slice along the batch, in NCHW and channels_last alike) goes through
        the native BN kernel, whose forward and backward each read it in fused passes; the outputs
        are concatenated. Measured on CPU (`largebatch bench bn`), this costs close to plain BN over the
        whole micro-batch, where normalising a [G, bn_batch, C, ...] view with var_mean and
        elementwise ops cost about 4x it (each op a pass, and autograd keeps their intermediates).
        The kernels compute in at least float32 and return the input's dtype (bf16 under autocast).
        """
        count = x[: self.bn_batch].numel() // x.shape[1]  # values per channel per group
        if count < 2:
            raise ValueError(
                f"GhostBatchNorm: expected more than 1 value per channel per group, got input "
                f"shape {list(x.shape)} with bn_batch={self.bn_batch}"
            )
        outputs, means, invstds = zip(*(
            torch.native_batch_norm(chunk, self.weight, self.bias, None, None, True, 0.0, self.eps)
            for chunk in x.split(self.bn_batch)
        ))
        if self.track_running_stats:
            mean, invstd = torch.stack(means).detach(), torch.stack(invstds).detach()
            var = invstd.double().pow(-2).sub(self.eps).clamp(min=0).to(mean.dtype)  # biased, from 1/sqrt(var + eps)
            self._update_running_stats(mean, var * (count / (count - 1)))
        return torch.cat(outputs)

    def _update_running_stats(self, mean: torch.Tensor, unbiased_var: torch.Tensor) -> None:
        """One update per forward with the group-averaged mean and unbiased variance ([G, C] each).

        Uses the module momentum like ``nn.BatchNorm``; ``momentum=None`` gives the cumulative
        average 1 / num_batches_tracked.
        """
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
            else:
                factor = self.momentum
            new_mean = mean.mean(dim=0).to(self.running_mean.dtype)
            new_var = unbiased_var.mean(dim=0).to(self.running_var.dtype)
            self.running_mean.lerp_(new_mean, factor)
            self.running_var.lerp_(new_var, factor)


class GhostBatchNorm1d(_GhostBatchNorm, nn.BatchNorm1d):
    """``nn.BatchNorm1d`` ([N, C] or [N, C, L]) with ghost statistics over ``bn_batch`` chunks."""


class GhostBatchNorm2d(_GhostBatchNorm, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` ([N, C, H, W]) with ghost statistics over ``bn_batch`` chunks."""


_GHOST_OF = {nn.BatchNorm1d: GhostBatchNorm1d, nn.BatchNorm2d: GhostBatchNorm2d}


def convert_to_ghost_bn(module: nn.Module, bn_batch: int) -> nn.Module:
    """Replace every ``nn.BatchNorm1d``/``nn.BatchNorm2d`` in ``module`` by its ghost variant.

    Mirrors ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new layers share the old parameter
    and buffer tensors (so an optimizer built before the conversion still sees them) and keep
    momentum, eps, affine, track_running_stats and train/eval mode. Layers that are already ghost
    BN get the new ``bn_batch``. SyncBatchNorm layers are left alone. Returns the (possibly new)
    module, so ``model = convert_to_ghost_bn(model, 32)`` also works when ``model`` is itself a BN.
    """
    bn_batch = _check_bn_batch(bn_batch)
    if isinstance(module, _GhostBatchNorm):
        module.bn_batch = bn_batch
        return module
    ghost_cls = next((g for bn, g in _GHOST_OF.items() if isinstance(module, bn)), None)
    if ghost_cls is not None:
        return _to_ghost(module, ghost_cls, bn_batch)
    for name, child in module.named_children():
        new_child = convert_to_ghost_bn(child, bn_batch)
        if new_child is not child:
            module.add_module(name, new_child)
    return module


def _to_ghost(bn: nn.modules.batchnorm._BatchNorm, ghost_cls: type, bn_batch: int) -> nn.Module:
    ghost = ghost_cls(
        bn.num_features,
        eps=bn.eps,
        momentum=bn.momentum,
        affine=bn.affine,
        track_running_stats=bn.track_running_stats,
        bn_batch=bn_batch,
    )
    # Share (not copy) the tensors, keeping device, dtype and requires_grad; None entries (no
    # affine / no running stats / no bias) are carried over as None.
    for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
        setattr(ghost, name, getattr(bn, name))
    ghost.train(bn.training)
    return ghost


def _check_bn_batch(bn_batch: int) -> int:
    if isinstance(bn_batch, bool) or not isinstance(bn_batch, int) or bn_batch < 0:
        raise ValueError(
            f"bn_batch must be a non-negative int (0 disables ghost BN), got {bn_batch!r}"
        )
    return bn_batch


__all__ = ["GhostBatchNorm1d", "GhostBatchNorm2d", "convert_to_ghost_bn"]
