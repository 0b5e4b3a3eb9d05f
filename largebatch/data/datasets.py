"""Map-style datasets with batched fetching, the DataLoader collate function, and load_splits.

Every dataset kind (these and `prepared.JpegShardDataset`) implements
``__getitems__(indices) -> (x float32 [B,C,H,W], y int64 [B])``, which torch's DataLoader calls
with a whole batch of indices when it is present; its result then goes to ``collate_fn``, so the
loader must be built with :func:`collate_batch`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from . import formats, prepared
from .formats import DatasetError
from .transforms import (FOLDER_CROP, augment_batch, channel_stats, folder_geometry, folder_transforms,
                         normalize)
from .verify import check_with_record, unreadable_images

SOURCES: tuple[str, ...] = ("fashion_mnist", "npz", "idx", "cifar10", "cifar100", "folder", "prepared", "synthetic")
AUGMENTS: tuple[str, ...] = ("auto", "none", "flip", "crop_flip", "imagenet")
PATHLESS_SOURCES = ("fashion_mnist", "synthetic")
FOLDER_SPLITS = ("train", "val")


@dataclass(frozen=True)
class DataSplits:
    """What the trainer needs: the two splits and the model's input geometry."""

    train: Dataset
    test: Dataset
    num_classes: int
    in_channels: int
    image_size: int
    skipped_images: int = 0  # unreadable images left out (folder data with on_bad_image = "skip")
    image_check: dict | None = None  # folder data: the image check's record, to keep in the run directory


class TensorImageDataset(Dataset):
    """Images held in memory as uint8 N×C×H×W with int64 labels, normalised (and augmented) per batch.

    `mean`/`std` are per-channel on the [0, 1] scale; `augment` is 'none', 'flip' or 'crop_flip'.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                 std: tuple[float, ...], augment: str = "none") -> None:
        self.images = images
        self.labels = labels
        self.mean = mean
        self.std = std
        self.augment = augment
        self.normalize_in_loader = True  # False: batches stay uint8 (see defer_normalization)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Fetch, augment and normalise a whole batch with array ops, no per-sample loop (the training hot path)."""
        index = np.asarray(indices, dtype=np.int64)
        images = torch.from_numpy(self.images.numpy().take(index, axis=0))
        labels = torch.from_numpy(self.labels.numpy().take(index))
        images = augment_batch(images, self.augment)
        return normalize(images, self.mean, self.std) if self.normalize_in_loader else images, labels

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """One sample as (float32 C×H×W, label), through the same path as a batch of one."""
        x, y = self.__getitems__([i])
        return x[0], int(y[0])


def load_image(path: str, max_side: int = 0) -> Image.Image:
    """Open an image file as RGB; an unreadable or corrupt file raises DatasetError naming its path.

    With `max_side`, a JPEG decodes at the smallest DCT scale (1/2, 1/4, 1/8) that keeps its longer side at
    least `max_side` (PIL's draft mode), much faster for large photos that are made smaller anyway."""
    try:
        with Image.open(path) as img:
            if max_side:
                scale = max_side / max(img.size)
                img.draft("RGB", (math.ceil(img.width * scale), math.ceil(img.height * scale)))
            return img.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DatasetError(f"cannot read image {path}: {e}") from e


class FolderDataset(ImageFolder):
    """torchvision ImageFolder (root/<class>/<image>) decoding with PIL, plus batched fetching."""

    def __init__(self, root: Path, transform: torch.nn.Module) -> None:
        try:
            super().__init__(str(root), transform=transform, loader=load_image)
        except OSError as e:
            raise DatasetError(f"folder split {root}: {e}; expected {root}/<class>/<image files>") from e

    def drop(self, paths: set[str]) -> None:
        """Leave the images at `paths` out of the data set."""
        self.samples = [(p, y) for p, y in self.samples if p not in paths]
        self.imgs = self.samples
        self.targets = [y for _, y in self.samples]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode and transform each sample, then stack into (x [B,3,H,W], y [B])."""
        samples = [self[i] for i in indices]
        return torch.stack([x for x, _ in samples]), torch.tensor([y for _, y in samples], dtype=torch.long)


def defer_normalization(splits: DataSplits) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Make both splits deliver their batches augmented but still uint8, to be normalised after the transfer
    to the device (data.normalize_on = "device"); returns the (mean, std) to normalise them with."""
    datasets = (splits.train, splits.test)
    if not all(hasattr(d, "normalize_in_loader") for d in datasets):
        raise DatasetError("data.normalize_on = 'device' needs batched uint8 data; the folder source normalises in "
                           "its PIL transforms")
    for dataset in datasets:
        dataset.normalize_in_loader = False
    return splits.train.mean, splits.train.std


def defer_decoding(splits: DataSplits) -> None:
    """Make both splits of prepared JPEG shards deliver their batches still encoded, to be decoded on the
    training device (data.decode_on = "device"; `prepared.EncodedImages`)."""
    datasets = (splits.train, splits.test)
    if not all(isinstance(d, prepared.JpegShardDataset) for d in datasets):
        raise DatasetError("data.decode_on = 'device' decodes prepared JPEG shards; this prepared directory holds "
                           "uint8 arrays, which need no decoding (use data.decode_on = 'loader')")
    for dataset in datasets:
        dataset.decode_in_loader = False


def collate_batch(batch: tuple[torch.Tensor, torch.Tensor] | list) -> tuple[torch.Tensor, torch.Tensor]:
    """DataLoader collate_fn: pass an already batched ``(x, y)`` from ``__getitems__`` straight through.

    A list of single ``(x, y)`` samples (from a dataset without ``__getitems__``) is stacked instead.
    """
    if isinstance(batch, tuple) and len(batch) == 2 and (
            isinstance(batch[0], prepared.EncodedImages) or isinstance(batch[0], torch.Tensor) and batch[0].dim() == 4):
        return batch
    return torch.stack([x for x, _ in batch]), torch.as_tensor([int(y) for _, y in batch], dtype=torch.long)


def check_choices(source: str, augment: str, path: str) -> None:
    """Reject an unknown source or augment, or a combination that cannot work, before reading any data."""
    if source not in SOURCES:
        raise DatasetError(f"source must be one of {SOURCES}, got {source!r}")
    if augment not in AUGMENTS:
        raise DatasetError(f"augment must be one of {AUGMENTS}, got {augment!r}")
    if augment == "imagenet" and source not in ("folder", "prepared"):
        raise DatasetError(f"augment 'imagenet' needs source 'folder' or 'prepared', got source {source!r}")
    if source in PATHLESS_SOURCES and path:
        raise DatasetError(f"source {source!r} takes no path, got path {path!r}")


def resolve_augment(augment: str, source: str, channels: int) -> str:
    """Turn 'auto' into the usual augmentation for the data: folder 'imagenet', synthetic 'none',
    grayscale (MNIST-like) 'flip', colour (CIFAR-like) 'crop_flip'."""
    if augment != "auto":
        return augment
    if source == "folder":
        return "imagenet"
    if source == "synthetic":
        return "none"
    return "flip" if channels == 1 else "crop_flip"


def tensor_splits(arrays: formats.ArraySplits, source: str, augment: str) -> DataSplits:
    """Wrap validated arrays into train/test datasets normalised with the training split's statistics."""
    channels, size = arrays.x_train.shape[1], arrays.x_train.shape[-1]
    mean, std = channel_stats(arrays.x_train)
    train = TensorImageDataset(arrays.x_train, arrays.y_train, mean, std, resolve_augment(augment, source, channels))
    test = TensorImageDataset(arrays.x_test, arrays.y_test, mean, std, "none")
    return DataSplits(train, test, arrays.num_classes, channels, size)


def folder_splits(path: str, augment: str, image_size: int = FOLDER_CROP, on_bad_image: str = "stop",
                  check: Callable[[Sequence[str]], list[tuple[str, str]]] = unreadable_images,
                  check_record: Path | None = None) -> DataSplits:
    """ImageNet-style tree path/train/<class>/* and path/val/<class>/*, with matching class folders.

    Every image is checked first (`check`, by default `verify.unreadable_images` in this process, or
    the findings in `check_record` when it was made for the same files): with `on_bad_image` "stop"
    any unreadable one raises a DatasetError listing them all; with "skip" they are left out and
    counted (`DataSplits.skipped_images`)."""
    root = formats.existing_path(path, "folder")
    for split in FOLDER_SPLITS:
        if not (root / split).is_dir():
            raise DatasetError(f"folder path {root} must contain {split}/<class>/<images>; {root / split} is missing")
    train_tf, eval_tf = folder_transforms(resolve_augment(augment, "folder", 3), image_size)
    train = FolderDataset(root / "train", train_tf)
    test = FolderDataset(root / "val", eval_tf)
    if train.classes != test.classes:
        raise DatasetError(
            f"folder path {root}: class folders differ between train ({train.classes}) and val ({test.classes})"
        )
    bad, record = check_with_record([p for dataset in (train, test) for p, _ in dataset.samples], check, check_record)
    if bad and on_bad_image == "stop":
        listing = "\n".join(f"  {p}: {why}" for p, why in bad[:50]) + (f"\n  ... and {len(bad) - 50} more"
                                                                       if len(bad) > 50 else "")
        raise DatasetError(f"{len(bad)} unreadable image(s) under {root} (set data.on_bad_image = 'skip' to leave them "
                           f"out):\n{listing}")
    for dataset in (train, test):
        dataset.drop({p for p, _ in bad})
    return DataSplits(train, test, len(train.classes), 3, image_size, skipped_images=len(bad), image_check=record)


def prepared_splits(path: str, augment: str, image_size: int = FOLDER_CROP, verify: str = "sha256") -> DataSplits:
    """A directory written by `largebatch prepare`, its files checked against its index first (`verify`, see
    `prepared.read_index`), normalised with the statistics the index names. Layout 'array': in-memory-style
    datasets over the memory-mapped arrays, augmented like them; layout 'jpeg': `image_size` px cuts of the
    decoded JPEGs with the folder geometry ('auto' augments as 'imagenet')."""
    data = prepared.read_index(path, verify)
    if data.layout == "array":
        (x_train, y_train), (x_test, y_test) = (prepared.array_split(data, split) for split in prepared.SPLITS)
        channels = x_train.shape[1]
        train_augment = resolve_augment(augment, "prepared", channels)
        if train_augment == "imagenet":
            raise DatasetError(f"augment 'imagenet' needs images of their own sizes (a folder, or a prepared set of "
                               f"layout 'jpeg'); {data.root} holds layout 'array': use crop_flip, flip or none")
        train = TensorImageDataset(x_train, y_train, data.mean, data.std, train_augment)
        test = TensorImageDataset(x_test, y_test, data.mean, data.std, "none")
        return DataSplits(train, test, data.num_classes, channels, x_train.shape[-1])
    train_geometry, eval_geometry = folder_geometry(resolve_augment(augment, "folder", 3), image_size)
    train = prepared.JpegShardDataset(*prepared.jpeg_split(data, "train"), train_geometry, data.mean, data.std)
    test = prepared.JpegShardDataset(*prepared.jpeg_split(data, "test"), eval_geometry, data.mean, data.std)
    return DataSplits(train, test, data.num_classes, 3, image_size)


def load_splits(source: str, path: str = "", augment: str = "auto", *,
                synthetic_shape: tuple[int, int, int] = (3, 32, 32), synthetic_classes: int = 10,
                synthetic_train: int = 1024, synthetic_test: int = 256, seed: int = 0, image_size: int = FOLDER_CROP,
                on_bad_image: str = "stop",
                check_images: Callable[[Sequence[str]], list[tuple[str, str]]] = unreadable_images,
                image_check_record: Path | None = None, verify: str = "sha256") -> DataSplits:
    """Load a data set by source name (see SOURCES) with train augmentation `augment` (see AUGMENTS).

    'fashion_mnist' and 'synthetic' take no path; the synthetic_* arguments and `seed` only
    affect 'synthetic'; `image_size`, `on_bad_image`, `check_images` and `image_check_record`
    'folder' (see `folder_splits`); `image_size` and `verify` 'prepared' (see `prepared_splits`). Raises
    DatasetError for any bad input.
    """
    check_choices(source, augment, path)
    if source == "folder":
        return folder_splits(path, augment, image_size, on_bad_image, check_images, image_check_record)
    if source == "prepared":
        return prepared_splits(path, augment, image_size, verify)
    if source == "synthetic":
        arrays = formats.make_synthetic(synthetic_shape, synthetic_classes, synthetic_train, synthetic_test, seed)
    else:
        arrays = formats.read_source(source, path)
    return tensor_splits(arrays, source, augment)
