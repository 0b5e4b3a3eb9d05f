"""Data sets for large-mini-batch training: loaders for several on-disk formats, batched augmentation.

``load_splits(source, path, augment)`` returns a :class:`DataSplits`; build DataLoaders over its
datasets with ``collate_fn=collate_batch`` (their ``__getitems__`` already returns whole batches).
"""

from .datasets import (
    AUGMENTS,
    SOURCES,
    DataSplits,
    FolderDataset,
    TensorImageDataset,
    collate_batch,
    defer_decoding,
    defer_normalization,
    load_splits,
)
from .formats import DatasetError

__all__ = [
    "AUGMENTS",
    "SOURCES",
    "DataSplits",
    "DatasetError",
    "FolderDataset",
    "TensorImageDataset",
    "collate_batch",
    "defer_decoding",
    "defer_normalization",
    "load_splits",
]
