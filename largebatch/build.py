"""Turning the validated config into components. The only place that maps config sections onto
constructor arguments, shared by training and evaluation so both build the very same model.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from largebatch.config import BatchPlan, Config
from largebatch.data import DataSplits, load_splits
from largebatch.models import build_model
from largebatch.precision import param_dtype
from largebatch.optim import build_optimizer, param_groups
from largebatch.schedule import LrSchedule, scaled_lr


def build_data(cfg: Config) -> DataSplits:
    d = cfg.data
    return load_splits(d.source, d.path, d.augment, synthetic_shape=tuple(d.synthetic_shape),
                       synthetic_classes=d.synthetic_classes, synthetic_train=d.synthetic_train,
                       synthetic_test=d.synthetic_test, seed=cfg.run.seed)


def build_network(cfg: Config, splits: DataSplits, plan: BatchPlan, device: torch.device) -> nn.Module:
    """The model, seeded identically on every rank, with ghost BN when BN groups are smaller than
    the micro-batch (BN statistics over a fixed per-worker batch, Goyal et al. §5.1)."""
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    model = build_model(m.name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, zero_init_residual=m.zero_init_residual,
                        bn_batch=plan.bn_batch if plan.bn_batch < plan.micro_batch else 0,
                        bn_momentum=m.bn_momentum, bn_eps=m.bn_eps)
    memory_format = torch.channels_last if m.channels_last else torch.preserve_format
    return model.to(device=device, dtype=param_dtype(cfg.run.precision), memory_format=memory_format)


def build_optimizer_for(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    o = cfg.optim
    groups = param_groups(model, o.weight_decay, o.exclude_bn_bias)
    options = {
        "sgd": dict(momentum=o.momentum, nesterov=o.nesterov, lr_in_momentum=o.lr_in_momentum,
                    momentum_correction=o.momentum_correction),
        "lars": dict(momentum=o.momentum, nesterov=o.nesterov, trust_coefficient=o.trust_coefficient, eps=o.eps,
                     mode=o.lars_mode, compiled=o.compiled),
        "lamb": dict(betas=tuple(o.betas), eps=o.eps, trust_clip=o.trust_clip or None, compiled=o.compiled),
    }[o.name]
    return build_optimizer(o.name, groups, lr=peak_lr(cfg), **options)


def peak_lr(cfg: Config) -> float:
    """The learning rate after warmup: base_lr stated for ref_batch, scaled to the global batch."""
    o = cfg.optim
    return scaled_lr(o.base_lr, cfg.data.global_batch, o.ref_batch, o.scaling)


def build_schedule(cfg: Config, steps_per_epoch: int) -> LrSchedule:
    s, o = cfg.schedule, cfg.optim
    return LrSchedule.from_base_lr(
        o.base_lr, global_batch=cfg.data.global_batch, ref_batch=o.ref_batch, rule=o.scaling,
        steps_per_epoch=steps_per_epoch, total_epochs=s.epochs, warmup_from=s.warmup_from,
        warmup_epochs=s.warmup_epochs, warmup_mode=s.warmup_mode, decay=s.decay, milestones=tuple(s.milestones),
        gamma=s.gamma, poly_power=s.poly_power, final_lr=s.final_lr)


def input_placement(cfg: Config, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Moves a batch to the device in the model's dtype and memory format (the same in train and eval)."""
    dtype = param_dtype(cfg.run.precision)
    memory_format = torch.channels_last if cfg.model.channels_last else torch.preserve_format

    def place(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (x.to(device, dtype, non_blocking=True, memory_format=memory_format),
                y.to(device, non_blocking=True))

    return place
