"""Parameter groups that exempt normalisation and bias parameters from weight decay.

By default every parameter gets the same weight decay. Many large-batch recipes (e.g. Jia et al. 2018)
exempt batch-norm parameters and biases: they are scale and shift terms that L2 regularisation only
pulls towards zero. LARS implementations commonly exclude the same parameters from the layer-wise
rate, so the classification is a function of its own, `is_bn_or_bias`.
"""

from __future__ import annotations

from torch import nn

NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,  # BatchNorm*d, SyncBatchNorm, InstanceNorm*d and their lazy forms
    nn.GroupNorm,
    nn.LayerNorm,
    nn.RMSNorm,
)


def is_bn_or_bias(module: nn.Module, param_name: str) -> bool:
    """Whether `module`'s own parameter `param_name` is a normalisation or bias parameter.

    True for every parameter of a normalisation layer (identified by module type), for any parameter
    named "bias", and for any other parameter with at most one dimension (a per-channel scale or shift
    that is not a weight matrix or kernel).
    """
    return (isinstance(module, NORM_LAYERS) or param_name == "bias"
            or getattr(module, param_name).ndim <= 1)


def param_groups(model: nn.Module, weight_decay: float, exclude_bn_bias: bool) -> list[dict]:
    """Optimizer parameter groups for `model`, each with "name", "params", "weight_decay" and "trust".

    With `exclude_bn_bias`, the parameters `is_bn_or_bias` selects form a "no_decay" group with weight
    decay 0 and no layer-wise trust ratio (LARS/LAMB, You et al.), and the rest a "decay" group with
    `weight_decay`; without it there is one "decay" group.
    Parameters appear in `model.named_modules()` order, each once (shared parameters are not repeated),
    frozen ones included. Empty groups are omitted.
    """
    if not weight_decay >= 0:
        raise ValueError(f"weight_decay = {weight_decay!r} is not allowed; it must be >= 0")
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            (no_decay if exclude_bn_bias and is_bn_or_bias(module, name) else decay).append(p)
    groups = [dict(name="decay", params=decay, weight_decay=weight_decay, trust=True),
              dict(name="no_decay", params=no_decay, weight_decay=0.0, trust=False)]
    return [g for g in groups if g["params"]]
