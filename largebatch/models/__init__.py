"""Image-classifier models for large-mini-batch training, plus ghost BN and zero-γ init.

``build_model(name, ...)`` is the entry point; ``MODELS`` lists the valid names.
"""

from .ghost_bn import GhostBatchNorm1d, GhostBatchNorm2d, convert_to_ghost_bn
from .init import he_init_, zero_init_last_bn_gamma
from .registry import MODELS, build_model

__all__ = [
    "MODELS",
    "GhostBatchNorm1d",
    "GhostBatchNorm2d",
    "build_model",
    "convert_to_ghost_bn",
    "he_init_",
    "zero_init_last_bn_gamma",
]
