"""Batched, per-sample image augmentation and normalisation.

The in-memory datasets augment a whole batch of uint8 images at once but draw an independent
random choice for every sample (torchvision.transforms.v2 applied to a batch tensor would make
one draw for the whole batch). All randomness comes from torch's global RNG, so restoring the
trainer's saved RNG state replays the exact same augmentations.

The batch functions take and return CPU tensors but move the pixels with NumPy (zero-copy
views): its block copies are single-threaded and as fast as torch's on these memory-bound ops,
and they do not stall when torch's intra-op threads compete with other processes for the cores
(measured 8x slower on a busy 2-core machine).

Folder (ImageNet-style) datasets decode one image at a time, so they use ordinary v2 pipelines; prepared
JPEG shards share their geometry (`folder_geometry`) and normalise the stacked batch like the in-memory sets.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view
from torchvision.transforms import v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER_RESIZE = 256
FOLDER_CROP = 224


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (population) of uint8 N×C×H×W images, on the [0, 1] scale.

    Uses a 256-bin histogram per channel, so it needs no float copy of the data set. A channel
    with zero spread gets std 1 so normalising never divides by zero.
    """
    levels = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        mean = (counts * levels).sum() / counts.sum()
        var = (counts * (levels - mean) ** 2).sum() / counts.sum()
        std = float(var.sqrt()) / 255.0
        means.append(float(mean) / 255.0)
        stds.append(std if std > 0 else 1.0)
    return tuple(means), tuple(stds)


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Map uint8 B×C×H×W images, on whatever device they are, to float32 (x/255 - mean) / std per channel.

    The constants are folded into one scale and one shift per channel, applied in place on the float32
    copy (a uint8-by-float multiply would convert on the fly but runs unvectorised on CPU, 10x slower).
    """
    shape = (1, -1, 1, 1)
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float32, device=images.device).view(shape)
    shift = torch.tensor([-m / s for m, s in zip(mean, std)], dtype=torch.float32, device=images.device).view(shape)
    return images.to(torch.float32).mul_(scale).add_(shift)


def random_flip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of a B×C×H×W batch left-right with probability 1/2, independently.

    Only the chosen samples are flipped, in a copy of the batch.
    """
    chosen = torch.nonzero(torch.rand(images.shape[0]) < 0.5).squeeze(1).numpy()
    out = images.numpy().copy()
    out[chosen] = out[chosen, ..., ::-1]
    return torch.from_numpy(out)


def crop_padding(size: int) -> int:
    """Zero padding for random crops: 4 px for 32 px images (size/8 above that), 2 px below 32 px."""
    return size // 8 if size >= 32 else 2


def random_crop(images: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad a uint8 B×C×H×W batch by `pad` px per side and cut an H×W window at a random offset per sample.

    Padding is pixel value 0 before normalisation, as torchvision's RandomCrop(padding=pad) does.

    Vectorised as one gather: a sliding-window view of the padded batch (B×C×(2p+1)×(2p+1)×H×W,
    no copy) is indexed with each sample's offsets; NumPy copies each selected window as a block,
    a few times faster than torch's per-element advanced indexing.
    """
    batch, channels, height, width = images.shape
    padded = np.zeros((batch, channels, height + 2 * pad, width + 2 * pad), dtype=np.uint8)
    padded[:, :, pad:pad + height, pad:pad + width] = images.numpy()
    top = torch.randint(0, 2 * pad + 1, (batch,)).numpy()
    left = torch.randint(0, 2 * pad + 1, (batch,)).numpy()
    windows = sliding_window_view(padded, (height, width), axis=(2, 3))
    return torch.from_numpy(windows[np.arange(batch), :, top, left])


def augment_batch(images: torch.Tensor, augment: str) -> torch.Tensor:
    """Apply an in-memory augmentation ('none', 'flip' or 'crop_flip') to a uint8 batch."""
    if augment == "crop_flip":
        images = random_crop(images, crop_padding(images.shape[-1]))
    if augment in ("flip", "crop_flip"):
        images = random_flip(images)
    return images


def folder_geometry(augment: str, size: int = FOLDER_CROP) -> tuple[v2.Transform, v2.Transform]:
    """Train and eval geometry for images of any size (folder data, prepared JPEGs), on one uint8 C×H×W
    tensor at a time, cutting `size` px squares (ImageNet's 224 by default; the resize before a crop keeps
    256/224 of it).

    'imagenet': RandomResizedCrop(size) + flip; 'crop_flip': Resize + RandomCrop(size) + flip;
    'flip': Resize + CenterCrop(size) + flip; 'none': the eval geometry, Resize (shorter side) + CenterCrop(size).
    """
    resize = v2.Resize(round(size * FOLDER_RESIZE / FOLDER_CROP), antialias=True)
    geometry = {
        "imagenet": [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()],
        "crop_flip": [resize, v2.RandomCrop(size), v2.RandomHorizontalFlip()],
        "flip": [resize, v2.CenterCrop(size), v2.RandomHorizontalFlip()],
        "none": [resize, v2.CenterCrop(size)],
    }
    return v2.Compose(geometry[augment]), v2.Compose(geometry["none"])


def folder_transforms(augment: str, size: int = FOLDER_CROP) -> tuple[v2.Transform, v2.Transform]:
    """Train and eval v2 pipelines for folder data sets, from decoded PIL RGB images to normalised float32
    images of `size` px: `folder_geometry` on uint8 tensors, then the float conversion."""
    to_float = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    return tuple(v2.Compose([v2.ToImage(), geometry, *to_float]) for geometry in folder_geometry(augment, size))
