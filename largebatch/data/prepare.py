"""Writing prepared data sets (`largebatch prepare`): an ImageNet-style folder tree or an array source turned
into the directory `prepared.py` reads, so that training reads large files by offset instead of decoding
and transforming one image file at a time.

- layout 'jpeg' (folder trees): every image decoded once, made no larger than `max_side` on its longer
  side, re-encoded by PIL at `quality` and packed into tar shards of about `shard_mb` MB; a chosen
  fraction of the images (`raw_fraction`, drawn with a fixed seed) is stored as uncompressed uint8
  H×W×3 `.npy` members instead, which training copies instead of decoding (FFCV's `compress_probability`:
  disk traded for the CPU time of decoding).
- layout 'array': uint8 N×C×H×W arrays; an array source as it is, a folder tree cut to `max_side`² with
  the folder source's evaluation geometry (the shorter side resized to 256/224 of it, the centre cut), so
  that training from the copy with augment 'none' sees exactly what the folder source shows at
  data.image_size = `max_side`.

The directory is built in a temporary sibling and renamed into place at the end, so a `DST` that
exists is always complete; images are re-encoded or cut on a pool of `workers` processes.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import shutil
import tarfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F
from tqdm import tqdm

from . import formats, prepared
from .datasets import PATHLESS_SOURCES, FolderDataset, folder_splits, load_image
from .formats import DatasetError
from .transforms import IMAGENET_MEAN, IMAGENET_STD, channel_stats, folder_geometry

SOURCES = ("folder", *formats.ARRAY_SOURCES)
DEFAULT_MAX_SIDE = 384  # keeps the shorter side of ImageNet's usual 500x375 and 500x333 photos >= 256, the eval resize
DEFAULT_QUALITY = 90
DEFAULT_SHARD_MB = 256.0
TAR_BLOCK = 512
RAW_SEED = 0  # which images a raw_fraction stores raw: the same ones on every run of prepare


def bounded_image(path: str, max_side: int) -> Image.Image:
    """The RGB image at `path`, made smaller (never larger) to a longer side of `max_side` px with PIL's
    bicubic filter."""
    image = load_image(path, max_side)
    scale = max_side / max(image.size)
    if scale < 1:
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC)
    return image


def encode_image(sample: tuple[str, bool], max_side: int, quality: int) -> tuple[bytes, str]:
    """(bytes, member suffix) of one sample (path, raw): RGB JPEG at `quality` ('jpg'), or with raw the
    uint8 H×W×3 pixels as a .npy file ('npy'), of `bounded_image`."""
    path, raw = sample
    image = bounded_image(path, max_side)
    out = io.BytesIO()
    if raw:
        np.save(out, np.asarray(image, dtype=np.uint8))
        return out.getvalue(), "npy"
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), "jpg"


def square_image(path: str, side: int) -> np.ndarray:
    """The image at `path` as uint8 C×side×side, cut as the folder source's evaluation transform cuts it."""
    _, evaluate = folder_geometry("none", side)
    return evaluate(F.to_image(load_image(path))).numpy()


class ShardWriter:
    """Appends samples to tar shards `<split>-NNNNNN.tar` in `directory` in webdataset naming (`<key>.jpg` or
    `<key>.npy`, `<key>.cls` holding the label in decimal), starting a new shard before one would pass `shard_bytes`.
    Members carry no owner or time, so the same images make the same bytes."""

    def __init__(self, directory: Path, split: str, shard_bytes: int) -> None:
        self.directory, self.split, self.shard_bytes = directory, split, shard_bytes
        self.names: list[str] = []
        self._file = None
        self._tar = None

    def add(self, key: str, payload: bytes, label: int, suffix: str = "jpg") -> tuple[int, int, int, int]:
        """Write one sample; its row of `prepared.SAMPLE_COLUMNS` (shard, offset and size of the image, label)."""
        if self._file is None or (self._file.tell() and self._file.tell() + len(payload) + 4 * TAR_BLOCK
                                  > self.shard_bytes):
            self._next_shard()
        offset = self._member(f"{key}.{suffix}", payload)
        self._member(f"{key}.cls", str(label).encode())
        return len(self.names) - 1, offset, len(payload), label

    def _member(self, name: str, data: bytes) -> int:
        """Add a member; the byte offset of its data in the shard (after its header, before its padding)."""
        info = tarfile.TarInfo(name)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        padded = (len(data) + TAR_BLOCK - 1) // TAR_BLOCK * TAR_BLOCK
        return self._file.tell() - padded

    def _next_shard(self) -> None:
        self.close()
        self.names.append(prepared.shard_name(self.split, len(self.names)))
        self._file = open(self.directory / self.names[-1], "wb")
        self._tar = tarfile.open(fileobj=self._file, mode="w", format=tarfile.USTAR_FORMAT)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._file.close()
            self._tar = self._file = None


@contextmanager
def worker_pool(workers: int) -> Iterator[Callable[[Callable, Iterable], Iterator]]:
    """An ordered `map` over `workers` processes (in this process when `workers` <= 1)."""
    if workers <= 1:
        yield map
        return
    with multiprocessing.get_context().Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
        yield partial(pool.imap, chunksize=16)


def folder_samples(src: str) -> tuple[list[str], dict[str, FolderDataset]]:
    """The class names and the train/test datasets of a folder tree, every image checked first (an unreadable
    one stops with a DatasetError listing them all)."""
    splits = folder_splits(src, "none")
    return splits.train.classes, {"train": splits.train, "test": splits.test}


def write_jpeg(src: str, out: Path, max_side: int, quality: int, shard_mb: float, workers: int,
               raw_fraction: float = 0.0) -> dict:
    """A folder tree as JPEG shards in `out` (`raw_fraction` of the images stored raw); the index entries this
    layout adds."""
    classes, splits = folder_samples(src)
    entries: dict = {"splits": {}}
    encode = partial(encode_image, max_side=max_side, quality=quality)
    with worker_pool(workers) as pool_map:
        for split, dataset in splits.items():
            writer = ShardWriter(out, split, int(shard_mb * 1e6))
            paths = [path for path, _ in dataset.samples]
            raw = np.random.default_rng(RAW_SEED).random(len(paths)) < raw_fraction
            encoded = tqdm(pool_map(encode, zip(paths, raw.tolist())), total=len(paths), desc=f"prepare {split}",
                           unit="img")
            rows = [writer.add(f"{i:08d}", payload, label, suffix) for i, ((payload, suffix), (_, label))
                    in enumerate(zip(encoded, dataset.samples))]
            writer.close()
            np.save(out / prepared.samples_name(split), np.array(rows, dtype=np.int64).reshape(-1, 4))
            entries["splits"][split] = {"count": len(rows), "raw": int(raw.sum()), "samples": prepared.samples_name(split),
                                        "shards": writer.names}
    return entries | {"classes": classes, "max_side": max_side, "quality": quality, "raw_fraction": raw_fraction,
                      "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "from": "ImageNet"}}


def save_split(out: Path, split: str, images: Iterable[np.ndarray], labels: np.ndarray, shape: tuple[int, ...],
               progress: bool = False) -> dict:
    """One split of an 'array' directory written image by image (memory-mapped, so it need not fit in memory)."""
    array = np.lib.format.open_memmap(out / prepared.images_name(split), mode="w+", dtype=np.uint8,
                                      shape=(len(labels), *shape))
    for i, image in enumerate(tqdm(images, total=len(labels), desc=f"prepare {split}", unit="img",
                                   disable=not progress)):
        array[i] = image
    array.flush()
    del array
    np.save(out / prepared.labels_name(split), labels.astype(np.int64))
    return {"count": len(labels), "shape": list(shape), "images": prepared.images_name(split),
            "labels": prepared.labels_name(split)}


def write_folder_arrays(src: str, out: Path, side: int, workers: int) -> dict:
    """A folder tree as side×side arrays in `out`; the index entries this layout adds."""
    classes, splits = folder_samples(src)
    entries: dict = {"splits": {}}
    with worker_pool(workers) as pool_map:
        for split, dataset in splits.items():
            images = pool_map(partial(square_image, side=side), [path for path, _ in dataset.samples])
            labels = np.array(dataset.targets, dtype=np.int64)
            entries["splits"][split] = save_split(out, split, images, labels, (3, side, side), progress=True)
    return entries | {"classes": classes, "image_size": side,
                      "normalization": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "from": "ImageNet"}}


def write_source_arrays(source: str, src: str, out: Path) -> dict:
    """An array source as it is in `out`; the index entries this layout adds (normalised with the training
    split's channel statistics, as the source itself is)."""
    arrays = formats.read_source(source, src)
    entries: dict = {"splits": {}}
    for split, x, y in (("train", arrays.x_train, arrays.y_train), ("test", arrays.x_test, arrays.y_test)):
        entries["splits"][split] = save_split(out, split, x.numpy(), y.numpy(), tuple(x.shape[1:]))
    mean, std = channel_stats(arrays.x_train)
    return entries | {"classes": [str(c) for c in range(arrays.num_classes)],
                      "normalization": {"mean": mean, "std": std, "from": "training split"}}


def check_destination(dst: Path, overwrite: bool) -> None:
    """`dst` must be new, or with `overwrite` a prepared directory or an empty one (nothing else is deleted)."""
    if not dst.exists():
        return
    if not overwrite:
        raise DatasetError(f"{dst} exists: give --overwrite to replace it")
    if not ((dst / prepared.INDEX_NAME).is_file() or (dst.is_dir() and not any(dst.iterdir()))):
        raise DatasetError(f"{dst} exists and is not a prepared data set (it has no {prepared.INDEX_NAME}): "
                           "--overwrite replaces only a prepared data set or an empty directory")


def resolve_options(src: str, source: str, layout: str | None, max_side: int | None, quality: int,
                    shard_mb: float, raw_fraction: float = 0.0) -> tuple[str, int]:
    """(layout, max side) for `prepare`'s arguments: the layout by default 'jpeg' for a folder tree and 'array'
    for an array source, the max side by default DEFAULT_MAX_SIDE for JPEGs; a combination that cannot work
    raises DatasetError naming the command-line option."""
    if source not in SOURCES:
        raise DatasetError(f"--source must be one of {SOURCES}, got {source!r}")
    if bool(src) == (source in PATHLESS_SOURCES):
        raise DatasetError(f"source {source!r} takes no SRC" if src else f"source {source!r} needs SRC, its path")
    layout = layout or ("jpeg" if source == "folder" else "array")
    if layout not in prepared.LAYOUTS:
        raise DatasetError(f"--layout must be one of {prepared.LAYOUTS}, got {layout!r}")
    if source != "folder" and (layout != "array" or max_side is not None):
        raise DatasetError(f"source {source!r} is prepared as layout 'array' at the size of its images: --layout "
                           "jpeg and --max-side are for folder trees")
    if layout == "array" and source == "folder" and max_side is None:
        raise DatasetError("--layout array of a folder tree needs --max-side S, the side of the square the images "
                           "are cut to (as data.image_size S would cut them)")
    if max_side is not None and max_side < 8:
        raise DatasetError(f"--max-side must be >= 8, got {max_side}")
    if not 1 <= quality <= 100:
        raise DatasetError(f"--quality must be in 1..100, got {quality}")
    if not shard_mb > 0:
        raise DatasetError(f"--shard-mb must be > 0, got {shard_mb}")
    if not 0 <= raw_fraction <= 1:
        raise DatasetError(f"--raw-fraction must be in [0, 1], got {raw_fraction}")
    if raw_fraction and layout != "jpeg":
        raise DatasetError("--raw-fraction stores some images of JPEG shards raw: it is for --layout jpeg (an "
                           "array layout is all raw)")
    return layout, DEFAULT_MAX_SIDE if max_side is None and source == "folder" else max_side or 0


def prepare(src: str, dst: str | Path, source: str = "folder", layout: str | None = None, max_side: int | None = None,
            quality: int = DEFAULT_QUALITY, shard_mb: float = DEFAULT_SHARD_MB, workers: int = 1,
            overwrite: bool = False, raw_fraction: float = 0.0) -> dict:
    """Write the prepared directory `dst` from `src` (a folder tree, or an array source of
    `formats.ARRAY_SOURCES` read as the data.source of that name reads it) and return its index.
    Layout 'jpeg' (a folder tree's default) makes images at most `max_side` px at JPEG `quality`, in shards
    of about `shard_mb` MB, `raw_fraction` of them stored uncompressed; layout 'array' (an array source's
    only one) cuts a folder tree to `max_side`²
    or keeps an array source as it is. See `resolve_options` for the defaults and what is refused."""
    layout, max_side = resolve_options(src, source, layout, max_side, quality, shard_mb, raw_fraction)
    dst = Path(dst).expanduser()
    check_destination(dst, overwrite)
    dst.parent.mkdir(parents=True, exist_ok=True)
    work = dst.parent / f".{dst.name}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        if source != "folder":
            entries = write_source_arrays(source, src, work)
        elif layout == "jpeg":
            entries = write_jpeg(src, work, max_side, quality, shard_mb, workers, raw_fraction)
        else:
            entries = write_folder_arrays(src, work, max_side, workers)
        files = {path.name: {"bytes": path.stat().st_size, "sha256": formats.file_sha256(path)}
                 for path in sorted(work.iterdir())}
        index = {"format": prepared.FORMAT, "version": prepared.VERSION, "layout": layout, "source": source,
                 "origin": str(Path(src).resolve()) if src else "embedded", **entries, "files": files}
        (work / prepared.INDEX_NAME).write_text(json.dumps(index, indent=1) + "\n", encoding="utf-8")
        replace_directory(work, dst)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return index


def replace_directory(new: Path, dst: Path) -> None:
    """Move the finished directory `new` to `dst`, the one there before (if any) out of the way first."""
    old = dst.parent / f".{dst.name}.old-{os.getpid()}"
    if dst.exists():
        dst.rename(old)
    new.rename(dst)
    shutil.rmtree(old, ignore_errors=True)
