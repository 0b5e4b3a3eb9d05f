"""Solving with a damped Kronecker-factored Fisher: (A ⊗ G + damping)⁻¹ applied to a gradient ∇W,
done as G-side and A-side solves of the small factors, never forming the Kronecker product.

Two dampings:
- "exact" Tikhonov, (A ⊗ G + λI)⁻¹, possible through the eigendecompositions A = Q_A Λ_A Q_Aᵀ,
  G = Q_G Λ_G Q_Gᵀ: Q_G [(Q_Gᵀ ∇W Q_A) / (λ_G λ_Aᵀ + λ)] Q_Aᵀ (kfac-pytorch's eigen method).
- "pi": factored Tikhonov with π-damping (Martens & Grosse 2015 §6.3), (A + π√λ I) ⊗ (G + √λ/π I),
  π = sqrt((tr A / dim A) / (tr G / dim G)) splitting λ between the factors by their scale; the
  solve is (G + √λ/π I)⁻¹ ∇W (A + π√λ I)⁻¹, by eigendecomposition or by Cholesky.

A decomposition that fails (a factor that is not numerically positive semi-definite) is retried
with ten times the damping, up to `RETRIES` times; the damping that worked is returned, to be logged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

INVERSE_METHODS = ("eigen", "cholesky")
DAMPING_MODES = ("pi", "exact")
RETRIES = 4


class FactorError(RuntimeError):
    """A factor stayed indefinite after every retry with more damping."""


@dataclass
class KroneckerInverse:
    """What a Kronecker layer's preconditioning needs until the next inverse update: eigenvectors and
    eigenvalues of A and G ("eigen"), or the damped factors' inverses ("cholesky"), and the damping
    they were made with."""

    method: str
    damping: float
    a: torch.Tensor  # Q_A, or (A + π√λ I)⁻¹
    g: torch.Tensor  # Q_G, or (G + √λ/π I)⁻¹
    a_values: torch.Tensor | None = None  # Λ_A ("eigen")
    g_values: torch.Tensor | None = None
    pi: float = 1.0

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.a, self.g, self.a_values, self.g_values) if t is not None]

    @classmethod
    def from_tensors(cls, method: str, damping: float, pi: float, tensors: list[torch.Tensor]) -> KroneckerInverse:
        """The inverse whose `tensors()` these are (as broadcast from its owner, or saved in a checkpoint)."""
        a, g, *values = tensors
        return cls(method, damping, a, g, *values, pi=pi)


def pi_split(a: torch.Tensor, g: torch.Tensor) -> float:
    """π of π-damping: the ratio of the factors' mean eigenvalues, square-rooted (1 for a zero factor)."""
    a_mean, g_mean = a.diagonal().mean().item(), g.diagonal().mean().item()
    return math.sqrt(a_mean / g_mean) if a_mean > 0 and g_mean > 0 else 1.0


def invert_kronecker(a: torch.Tensor, g: torch.Tensor, damping: float, method: str, mode: str,
                     dtype: torch.dtype) -> KroneckerInverse:
    """Decompose or invert the factors in `dtype` (at least float32), raising the damping on failure."""
    if method == "cholesky" and mode != "pi":
        raise ValueError("Cholesky inverts each factor separately: it needs damping mode 'pi'")
    a, g = a.to(dtype), g.to(dtype)
    for attempt in range(RETRIES + 1):
        try:
            if method == "eigen":
                a_values, a_vectors = torch.linalg.eigh(a)
                g_values, g_vectors = torch.linalg.eigh(g)
                return KroneckerInverse("eigen", damping, a_vectors, g_vectors, a_values.clamp_min(0),
                                        g_values.clamp_min(0), pi_split(a, g))
            pi = pi_split(a, g)
            root = math.sqrt(damping)
            a_inv = torch.cholesky_inverse(torch.linalg.cholesky(_shifted(a, pi * root)))
            g_inv = torch.cholesky_inverse(torch.linalg.cholesky(_shifted(g, root / pi)))
            return KroneckerInverse("cholesky", damping, a_inv, g_inv, pi=pi)
        except torch.linalg.LinAlgError:
            if attempt == RETRIES:
                raise FactorError(f"a K-FAC factor stayed indefinite up to damping {damping:g}") from None
            damping *= 10
    raise AssertionError("unreachable")


def precondition_kronecker(grad: torch.Tensor, inverse: KroneckerInverse, mode: str) -> torch.Tensor:
    """(damped A ⊗ G)⁻¹ applied to ∇W (out × in), in the inverse's dtype, returned in the gradient's."""
    v = grad.to(inverse.a.dtype)
    if inverse.method == "cholesky":
        return (inverse.g @ v @ inverse.a).to(grad.dtype)
    qa, qg, la, lg = inverse.a, inverse.g, inverse.a_values, inverse.g_values
    rotated = qg.T @ v @ qa
    if mode == "exact":
        scaled = rotated / (lg[:, None] * la[None, :] + inverse.damping)
    else:
        root = math.sqrt(inverse.damping)
        scaled = rotated / ((lg[:, None] + root / inverse.pi) * (la[None, :] + inverse.pi * root))
    return (qg @ scaled @ qa.T).to(grad.dtype)


def precondition_unitwise(pairs: torch.Tensor, fisher: torch.Tensor, damping: float) -> torch.Tensor:
    """(F_c + λI)⁻¹ (∇γ_c, ∇β_c) for every channel c, by the closed-form inverse of a 2 × 2 matrix."""
    f = fisher.to(torch.promote_types(fisher.dtype, pairs.dtype))
    a, b, d = f[:, 0, 0] + damping, f[:, 0, 1], f[:, 1, 1] + damping
    det = a * d - b * b
    x, y = pairs[:, 0].to(f.dtype), pairs[:, 1].to(f.dtype)
    return torch.stack([(d * x - b * y) / det, (a * y - b * x) / det], -1).to(pairs.dtype)


def _shifted(m: torch.Tensor, shift: float) -> torch.Tensor:
    return m + shift * torch.eye(m.shape[0], dtype=m.dtype, device=m.device)
