"""A synthetic ImageNet-like JPEG tree for `largebatch bench data`: photo-sized images whose JPEG files
are about as large as ImageNet's (~100 KB at ~400×350), so decoding costs what it costs on real data.

The content is random but smooth like a photo: colour varies at coarse scales, brightness carries
texture at every scale down to a few pixels, plus a little sensor noise; JPEG quality 95, as many
photos on the web are saved. Deterministic in the seed.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

COLOUR_SCALES = ((2, 0.5), (4, 0.4), (8, 0.3))  # (cells across the width, amplitude) of the colour layers
TEXTURE_SCALES = (16, 32, 64, 128, 256)  # cells across the width of the brightness layers
TEXTURE_AMPLITUDE = 0.3
NOISE = 6.0  # grey levels of per-pixel noise
QUALITY = 95
WIDTHS = (340, 460)  # sizes are drawn uniformly in these ranges (px)
HEIGHTS = (290, 410)


def layer(rng: np.random.Generator, cells: int, height: int, width: int, channels: int) -> np.ndarray:
    """Random values on a grid `cells` wide, upsampled bicubically to height×width, centred on 0 (float32)."""
    grid = rng.integers(0, 256, (max(2, cells * height // width), cells, channels), dtype=np.uint8)
    image = Image.fromarray(grid.squeeze(2) if channels == 1 else grid)
    resized = np.asarray(image.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32)
    return resized.reshape(height, width, channels) - 128.0


def photo_like(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """One height×width×3 uint8 image of smooth random content."""
    image = np.full((height, width, 3), 128.0, dtype=np.float32)
    for cells, amplitude in COLOUR_SCALES:
        image += amplitude * layer(rng, cells, height, width, 3)
    for cells in TEXTURE_SCALES:
        image += TEXTURE_AMPLITUDE * layer(rng, cells, height, width, 1)
    image += rng.normal(0.0, NOISE, (height, width, 1)).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8)


def write_tree(root: Path, images: int, classes: int, seed: int = 0) -> None:
    """root/train/<class>/<n>.JPEG with `images` images over `classes` classes (n0000000c folders, as
    ImageNet's), and root/val/ with a tenth as many (at least one per class). Written beside `root` and
    renamed into place, so a tree found at `root` is complete."""
    rng = np.random.default_rng(seed)
    work = root.parent / f".{root.name}.tmp"
    shutil.rmtree(work, ignore_errors=True)
    for split, count in (("train", images), ("val", max(classes, images // 10))):
        for c in range(classes):
            (work / split / f"n{c:08d}").mkdir(parents=True)
        for i in tqdm(range(count), desc=f"generate {split}", unit="img"):
            width, height = rng.integers(*WIDTHS, endpoint=True), rng.integers(*HEIGHTS, endpoint=True)
            path = work / split / f"n{i % classes:08d}" / f"{i:06d}.JPEG"
            Image.fromarray(photo_like(rng, int(height), int(width))).save(path, quality=QUALITY)
    work.rename(root)
