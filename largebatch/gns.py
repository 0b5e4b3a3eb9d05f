"""The gradient noise scale B_simple = tr(Σ) / |G|² of McCandlish et al. 2018 ("An Empirical Model of
Large-Batch Training"), from gradient norms measured at two batch sizes.

Σ is the per-sample gradient covariance and G the true gradient. A gradient averaged over B samples
has E|G_B|² = |G|² + tr(Σ)/B, so squared norms at a small batch b and a big batch B give unbiased
estimates of both (their Appendix A.1):

    |G|²   ≈ (B |G_B|² - b |G_b|²) / (B - b)
    tr(Σ)  ≈ (|G_b|² - |G_B|²) / (1/b - 1/B)

Each estimate is noisy, so each is smoothed by its own exponential moving average and B_simple is the
ratio of the averages (not the average of ratios, which is biased). B_simple approximates the critical
batch: below it, doubling the batch nearly halves the steps to a target; well above it, extra samples
per step buy little. In training, b is the micro-batch (one forward/backward on one rank) and B the
global batch, so the estimate costs one squared norm per micro-batch and no extra pass.
"""

from __future__ import annotations

from dataclasses import dataclass

from largebatch.errors import ConfigError


def unbiased_estimates(small_sq: float, small_batch: float, big_sq: float, big_batch: float) -> tuple[float, float]:
    """(|G|², tr Σ) from the mean squared norm of gradients over `small_batch` samples and the squared
    norm of one over `big_batch` samples."""
    if not 0 < small_batch < big_batch:
        raise ValueError(f"need 0 < small batch < big batch, got {small_batch} and {big_batch}")
    grad_sq = (big_batch * big_sq - small_batch * small_sq) / (big_batch - small_batch)
    trace = (small_sq - big_sq) / (1.0 / small_batch - 1.0 / big_batch)
    return grad_sq, trace


def needs_micro_batches(micro_batches_per_step: int) -> None:
    """The estimate compares a micro-batch gradient with the global one: a step needs two or more."""
    if micro_batches_per_step < 2:
        raise ConfigError("run.noise_scale needs at least two micro-batches per step (world size x accumulation "
                          ">= 2) to compare a micro-batch's gradient with the global batch's: set data.micro_batch to "
                          "at most half of data.global_batch")


@dataclass
class NoiseScaleAverage:
    """Exponential moving averages of |G|² and tr Σ (bias-corrected as Adam's moments), and their ratio."""

    decay: float
    grad_sq: float = 0.0
    trace: float = 0.0
    updates: int = 0

    def update(self, grad_sq: float, trace: float) -> None:
        self.grad_sq = self.decay * self.grad_sq + (1 - self.decay) * grad_sq
        self.trace = self.decay * self.trace + (1 - self.decay) * trace
        self.updates += 1

    def _corrected(self, value: float) -> float:
        return value / (1 - self.decay ** self.updates) if self.updates else float("nan")

    @property
    def mean_grad_sq(self) -> float:
        """The average of |G|² (nan before the first update)."""
        return self._corrected(self.grad_sq)

    @property
    def mean_trace(self) -> float:
        """The average of tr Σ (nan before the first update)."""
        return self._corrected(self.trace)

    @property
    def b_simple(self) -> float:
        """tr Σ / |G|² from the averages; nan before the first update."""
        return self.mean_trace / self.mean_grad_sq if self.updates else float("nan")
