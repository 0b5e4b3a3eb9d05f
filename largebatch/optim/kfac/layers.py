"""The curvature of one layer, as K-FAC approximates it (Martens & Grosse 2015; convolutions as in
Grosse & Martens 2016, "KFC"; BatchNorm unit-wise as in Osawa et al. 2019).

Conventions, for a batch of N examples with per-example losses ℓ_n (the training loss is their mean)
and Ds = ∂ℓ_n/∂s, the gradient of one example's loss with respect to the layer's output s:

- Linear and Conv2d, weight W (out × in, a conv's in = C·kh·kw, a bias as the last column, fed by a
  constant 1): with ā the (unfolded) inputs at the T positions of an example (T = 1 for Linear),
      A = 1/N · Σ_n Σ_t ā_nt ā_ntᵀ,   G = 1/N · Σ_n 1/T · Σ_t Ds_nt Ds_ntᵀ,   F ≈ A ⊗ G,
  and the gradient of the mean loss is ∇W = 1/N · Σ_n Σ_t Ds_nt ā_ntᵀ.
- BatchNorm (γ, β per channel c): with x̂ the normalised input, gγ_nc = Σ_hw Ds·x̂ and gβ_nc = Σ_hw Ds,
  each channel's 2 × 2 Fisher is 1/N · Σ_n [gγ gβ]ᵀ[gγ gβ] (the unit-wise, block-diagonal Fisher).

The Ds are taken from the one backward pass of the training loss L (the empirical Fisher, as
kfac-pytorch): Ds_n = N · (∂L/∂s)[n], which is ∂ℓ_n/∂s_n exactly when no training-mode BatchNorm
follows the layer (batch statistics couple the examples; K-FAC ignores that, as everyone does). A
layer sees its output gradient already divided by N and multiplied by the loss's other factors
(accumulation, fp16 loss scale); the caller passes that factor back in as `grad_scale`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class KroneckerLayer:
    """A Linear or Conv2d layer's statistics for one step: sums of ā āᵀ and of Ds Dsᵀ / T over the
    examples seen (several micro-batches add up), and the example count."""

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d):
        self.name, self.module = name, module
        self.has_bias = module.bias is not None
        self.a_sum: torch.Tensor | None = None
        self.g_sum: torch.Tensor | None = None
        self.examples = 0

    @property
    def dims(self) -> tuple[int, int]:
        """Sizes of A and G."""
        weight = self.module.weight
        return weight[0].numel() + self.has_bias, weight.shape[0]

    def add_input(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Add Σ ā āᵀ over this micro-batch's examples and positions (the bias's constant 1 included)."""
        m, x = self.module, x.detach().to(dtype)
        if isinstance(m, nn.Conv2d):
            patches = F.unfold(x, m.kernel_size, m.dilation, m.padding, m.stride)  # N, C·kh·kw, T
            core, sums, count = _sum_outer(patches), patches.sum((0, 2)), patches.shape[0] * patches.shape[2]
        else:
            rows = x.reshape(-1, x.shape[-1])
            core, sums, count = rows.T @ rows, rows.sum(0), rows.shape[0]
        self.a_sum = _add(self.a_sum, _with_bias_row(core, sums, count) if self.has_bias else core)
        self.examples += x.shape[0]

    def add_output_grad(self, grad: torch.Tensor, grad_scale: float, dtype: torch.dtype) -> None:
        """Add Σ_n 1/T Σ_t Ds Dsᵀ, Ds = grad_scale × the output gradient."""
        grad = grad.detach().to(dtype)
        if isinstance(self.module, nn.Conv2d):
            per_example = grad.reshape(grad.shape[0], grad.shape[1], -1)  # N, out, T
            g = _sum_outer(per_example) / per_example.shape[2]
        else:
            rows = grad.reshape(-1, grad.shape[-1])
            g = rows.T @ rows / (rows.shape[0] // grad.shape[0])
        self.g_sum = _add(self.g_sum, g * grad_scale ** 2)

    def take_factors(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """The step's sums and count, and a clean slate for the next step."""
        taken = (self.a_sum, self.g_sum, self.examples)
        self.a_sum, self.g_sum, self.examples = None, None, 0
        return taken

    def gradient(self) -> torch.Tensor:
        """∇W as one out × in(+1) matrix."""
        weight = self.module.weight
        grad = weight.grad.reshape(weight.shape[0], -1)
        return torch.cat([grad, self.module.bias.grad[:, None]], 1) if self.has_bias else grad

    def set_gradient(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        if self.has_bias:
            self.module.bias.grad.copy_(matrix[:, -1])
            matrix = matrix[:, :-1]
        weight.grad.copy_(matrix.reshape(weight.shape))


class BatchNormLayer:
    """A BatchNorm layer's per-channel 2 × 2 Fisher of (γ, β) for one step, summed over examples."""

    def __init__(self, name: str, module: nn.modules.batchnorm._BatchNorm):
        self.name, self.module = name, module
        self.normalised: torch.Tensor | None = None
        self.fisher_sum: torch.Tensor | None = None  # channels × 2 × 2
        self.examples = 0

    def add_input(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """Keep x̂, normalised with the statistics the layer used in training (per ghost-BN group)."""
        x = x.detach().to(dtype)
        group = getattr(self.module, "bn_batch", 0) or x.shape[0]
        eps = self.module.eps
        self.normalised = torch.cat([F.batch_norm(chunk, None, None, training=True, eps=eps)
                                     for chunk in x.split(group)])
        self.examples += x.shape[0]

    def add_output_grad(self, grad: torch.Tensor, grad_scale: float, dtype: torch.dtype) -> None:
        ds = grad.detach().to(dtype) * grad_scale
        reduce = tuple(range(2, ds.dim()))
        g_gamma = (ds * self.normalised).sum(reduce) if reduce else ds * self.normalised  # N × C
        g_beta = ds.sum(reduce) if reduce else ds
        per_example = torch.stack([g_gamma, g_beta], -1)  # N × C × 2
        self.fisher_sum = _add(self.fisher_sum, torch.einsum("nci,ncj->cij", per_example, per_example))
        self.normalised = None

    def take_factors(self) -> tuple[torch.Tensor, int]:
        taken = (self.fisher_sum, self.examples)
        self.fisher_sum, self.examples = None, 0
        return taken

    def gradient(self) -> torch.Tensor:
        """(∇γ, ∇β) per channel: channels × 2."""
        return torch.stack([self.module.weight.grad, self.module.bias.grad], -1)

    def set_gradient(self, pairs: torch.Tensor) -> None:
        self.module.weight.grad.copy_(pairs[:, 0])
        self.module.bias.grad.copy_(pairs[:, 1])


def _add(total: torch.Tensor | None, term: torch.Tensor) -> torch.Tensor:
    return term if total is None else total + term


_OUTER_CHUNK = 1 << 24  # elements of the examples × d × d intermediate of `_sum_outer`


def _sum_outer(m: torch.Tensor) -> torch.Tensor:
    """Σ over n and t of m[n, :, t] m[n, :, t]ᵀ for m of shape N × d × T. With many positions per example
    (early conv layers), batched products of each example's d × T block, which need no (N·T) × d copy
    of the unfolded input (the N × d × d intermediate bounded by chunks); with few, one GEMM over that
    copy, which is then the faster (measured on 2 CPU cores: 2x either way at ResNet-20's sizes)."""
    d, positions = m.shape[1], m.shape[2]
    if 2 * positions < d:
        flat = m.permute(1, 0, 2).reshape(d, -1)
        return flat @ flat.T
    total = None
    for part in m.split(max(1, _OUTER_CHUNK // (d * d))):
        total = _add(total, torch.bmm(part, part.transpose(1, 2)).sum(0))
    return total


def _with_bias_row(core: torch.Tensor, sums: torch.Tensor, count: int) -> torch.Tensor:
    """Σ [ā; 1][ā; 1]ᵀ from Σ ā āᵀ, Σ ā and the number of rows, without appending a column of ones."""
    d = core.shape[0]
    out = core.new_empty(d + 1, d + 1)
    out[:d, :d], out[:d, d], out[d, :d], out[d, d] = core, sums, sums, count
    return out


def supported(module: nn.Module) -> bool:
    """Whether K-FAC has a curvature block for this module (its own parameters only)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros" and module.weight.requires_grad
    if isinstance(module, nn.Linear):
        return module.weight.requires_grad
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.affine and module.weight.requires_grad
    return False


def find_layers(model: nn.Module, batchnorm: bool = True) -> tuple[list[KroneckerLayer | BatchNormLayer], list[str]]:
    """The layers K-FAC preconditions, and the names of the modules with parameters it leaves to the
    plain optimizer (unsupported types, grouped convolutions, BN when `batchnorm` is off)."""
    layers: list[KroneckerLayer | BatchNormLayer] = []
    left: list[str] = []
    for name, module in model.named_modules():
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        if not supported(module) or (isinstance(module, nn.modules.batchnorm._BatchNorm) and not batchnorm):
            left.append(name)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            layers.append(BatchNormLayer(name, module))
        else:
            layers.append(KroneckerLayer(name, module))
    return layers, left
