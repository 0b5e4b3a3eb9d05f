"""Reading prepared data sets (written by `largebatch prepare`, `largebatch.data.prepare`): the index, its
checks, and the dataset over JPEG shards.

A prepared directory holds `index.json` and the data files it lists, each with its byte count and sha256:
- layout 'array': per split `<split>-images.npy` (uint8 N×C×H×W) and `<split>-labels.npy` (int64 N),
  opened memory-mapped, so a data set larger than memory trains without being read in first;
- layout 'jpeg': per split tar shards `<split>-NNNNNN.tar` in webdataset naming (`<key>.jpg` and
  `<key>.cls` members, readable by `tar` and webdataset; `<key>.npy`, uint8 H×W×3 pixels, for the images
  prepared raw) and `<split>-samples.npy`, one row per sample: shard number, byte offset and size of the
  image inside the shard, label. A payload is told JPEG or .npy by its first bytes.
Samples are reached by their index (`os.pread` at the offset), never by streaming, so the trainer's
one global permutation per epoch applies unchanged, exactly as for the in-memory sets.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.io import ImageReadMode, decode_jpeg

from . import formats
from .formats import DatasetError
from .transforms import normalize

FORMAT = "largebatch-prepared"
VERSION = 1
INDEX_NAME = "index.json"
LAYOUTS = ("array", "jpeg")
SPLITS = ("train", "test")  # a folder tree's train/ and val/
VERIFY = ("sha256", "size")
SAMPLE_COLUMNS = ("shard", "offset", "size", "label")  # the columns of <split>-samples.npy
INDEX_KEYS = ("layout", "classes", "normalization", "splits", "files")
NPY_MAGIC = b"\x93NUMPY"  # the first bytes of a .npy payload (an image prepared raw); anything else is a JPEG
NPY_HEADER_MAX = 4096  # more than a .npy header of a 3-d array ever takes


def images_name(split: str) -> str:
    return f"{split}-images.npy"


def labels_name(split: str) -> str:
    return f"{split}-labels.npy"


def samples_name(split: str) -> str:
    return f"{split}-samples.npy"


def shard_name(split: str, number: int) -> str:
    return f"{split}-{number:06d}.tar"


@dataclass(frozen=True)
class Prepared:
    """A prepared directory whose files were found as its index lists them."""

    root: Path
    index: dict

    @property
    def layout(self) -> str:
        return self.index["layout"]

    @property
    def num_classes(self) -> int:
        return len(self.index["classes"])

    @property
    def mean(self) -> tuple[float, ...]:
        return tuple(self.index["normalization"]["mean"])

    @property
    def std(self) -> tuple[float, ...]:
        return tuple(self.index["normalization"]["std"])

    def split(self, name: str) -> dict:
        return self.index["splits"][name]


def read_index(path: str, verify: str = "sha256") -> Prepared:
    """Open the prepared directory `path`: its index must be of this format and version, and every data file
    present with its indexed size; `verify` 'sha256' also hashes every file against the index (reading the
    whole data set once), 'size' stops at the sizes. Anything wrong raises DatasetError naming the path."""
    root = formats.existing_path(path, "prepared")
    index_path = root / INDEX_NAME
    if not index_path.is_file():
        raise DatasetError(f"{root} is not a prepared data set: {index_path} is missing (make one with "
                           f"`largebatch prepare SRC {root}`)")
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"cannot read the prepared index {index_path}: {e}") from e
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise DatasetError(f"{index_path} is not a largebatch prepared index (expected \"format\": \"{FORMAT}\")")
    if index.get("version") != VERSION:
        raise DatasetError(f"{index_path} is format version {index.get('version')!r}; this largebatch reads version "
                           f"{VERSION}: prepare the data set again with `largebatch prepare`")
    missing = [key for key in INDEX_KEYS if key not in index]
    if missing or index["layout"] not in LAYOUTS or set(index["splits"]) != set(SPLITS):
        raise DatasetError(f"{index_path}: damaged index (missing {missing}, layout {index.get('layout')!r} of "
                           f"{LAYOUTS}, splits {sorted(index.get('splits', {}))} of {list(SPLITS)})")
    check_files(root, index["files"], verify)
    return Prepared(root, index)


def check_files(root: Path, files: dict[str, dict], verify: str) -> None:
    """Every file of `files` (name -> bytes, sha256) present in `root` with its size, then, with `verify`
    'sha256', with its content; the first that is not raises DatasetError naming it."""
    for name, entry in files.items():
        path = root / name
        if not path.is_file():
            raise DatasetError(f"prepared data file {path} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise DatasetError(f"prepared data file {path} has {size} bytes, its index says {entry['bytes']} "
                               "(truncated or replaced): prepare the data set again")
    if verify == "sha256":
        for name, entry in files.items():
            formats.verify_sha256(root / name, entry["sha256"], "prepared data file")


def load_array(path: Path, mmap: bool) -> np.ndarray:
    """An .npy file of the data set (plain arrays only, never pickles); `mmap` maps it copy-on-write: pages
    are read when used and the file is never written (a read-only map would make torch warn)."""
    try:
        return np.load(path, mmap_mode="c" if mmap else None, allow_pickle=False)
    except (OSError, ValueError) as e:
        raise DatasetError(f"cannot read prepared array {path}: {e}") from e


def check_labels(labels: np.ndarray, count: int, num_classes: int, where: Path) -> None:
    if labels.shape != (count,) or labels.dtype != np.int64:
        raise DatasetError(f"{where}: labels must be int64 of shape ({count},), got {labels.dtype} {labels.shape}")
    if count and not 0 <= labels.min() <= labels.max() < num_classes:
        raise DatasetError(f"{where}: labels must be in [0, {num_classes}), found {labels.min()}..{labels.max()}")


def array_split(data: Prepared, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images N×C×H×W memory-mapped, int64 labels) of a split of an 'array' directory."""
    info = data.split(split)
    images_path, labels_path = data.root / info["images"], data.root / info["labels"]
    images = load_array(images_path, mmap=True)
    expected = (info["count"], *info["shape"])
    if images.shape != expected or images.dtype != np.uint8:
        raise DatasetError(f"{images_path}: expected uint8 images of shape {expected}, got {images.dtype} "
                           f"{images.shape}")
    labels = load_array(labels_path, mmap=False)
    check_labels(labels, info["count"], data.num_classes, labels_path)
    return torch.from_numpy(images), torch.from_numpy(labels)


def jpeg_split(data: Prepared, split: str) -> tuple[list[Path], np.ndarray]:
    """(shard paths, samples rows as SAMPLE_COLUMNS) of a split of a 'jpeg' directory, every row pointing
    inside its shard."""
    info = data.split(split)
    shards = [data.root / name for name in info["shards"]]
    samples_path = data.root / info["samples"]
    samples = load_array(samples_path, mmap=False)
    if samples.shape != (info["count"], len(SAMPLE_COLUMNS)) or samples.dtype != np.int64:
        raise DatasetError(f"{samples_path}: expected int64 rows {SAMPLE_COLUMNS} of shape "
                           f"({info['count']}, {len(SAMPLE_COLUMNS)}), got {samples.dtype} {samples.shape}")
    shard, offset, size, label = samples.T
    check_labels(np.ascontiguousarray(label), info["count"], data.num_classes, samples_path)
    if len(samples) and not 0 <= shard.min() <= shard.max() < len(shards):
        raise DatasetError(f"{samples_path}: shard numbers must be in [0, {len(shards)})")
    shard_bytes = np.array([data.index["files"][name]["bytes"] for name in info["shards"]], dtype=np.int64)
    if len(samples) and ((offset < 0) | (size < 1) | (offset + size > shard_bytes[shard])).any():
        raise DatasetError(f"{samples_path}: a sample's bytes lie outside its shard")
    return shards, samples


class EncodedImages:
    """A batch's payloads (JPEGs, and .npy pixels of images prepared raw) still encoded, as the loader hands
    them over when decoding happens on the training device (data.decode_on = "device"): `decode` there makes
    the uint8 batch, so a GPU decodes with nvJPEG and only compressed bytes leave the loader. `where` names
    the shards for errors."""

    def __init__(self, payloads: list[torch.Tensor], geometry: Callable[[torch.Tensor], torch.Tensor],
                 where: str) -> None:
        self.payloads = payloads
        self.geometry = geometry
        self.where = where

    def __len__(self) -> int:
        return len(self.payloads)

    def pin_memory(self) -> EncodedImages:
        """Called by a DataLoader with pin_memory = True: the payloads in page-locked memory."""
        return EncodedImages([payload.pin_memory() for payload in self.payloads], self.geometry, self.where)

    def decode(self, device: torch.device) -> torch.Tensor:
        """The uint8 B×3×H×W batch on `device`: every JPEG decoded there in one batched call, every raw image
        copied there, then each cut by the geometry, whose random draws come from torch's global (CPU)
        generator wherever it runs."""
        raw = [bytes(payload[:len(NPY_MAGIC)].tolist()) == NPY_MAGIC for payload in self.payloads]
        jpegs = [payload for payload, is_raw in zip(self.payloads, raw) if not is_raw]
        try:
            decoded = iter(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device) if jpegs else [])
            images = [self._pixels(payload, device) if is_raw else next(decoded)
                      for payload, is_raw in zip(self.payloads, raw)]
        except (RuntimeError, ValueError) as e:
            raise DatasetError(f"cannot decode an image read from prepared shard(s) {self.where}: {e}") from e
        return torch.stack([self.geometry(image) for image in images])

    @staticmethod
    def _pixels(payload: torch.Tensor, device: torch.device) -> torch.Tensor:
        """A raw image's .npy payload (H×W×3) as uint8 3×H×W on `device`: the header parsed, the pixels a view
        of the payload (no copy on the CPU) with channels last in memory, as `decode_jpeg` returns images
        (the layout torch's uint8 resize is fastest on)."""
        header = io.BytesIO(payload[:NPY_HEADER_MAX].numpy().tobytes())
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}.get(np.lib.format.read_magic(header))
        if read_header is None:
            raise ValueError("a raw image's .npy header must be of version 1.0 or 2.0")
        shape, fortran_order, dtype = read_header(header)
        if dtype != np.uint8 or fortran_order or len(shape) != 3 or shape[2] != 3:
            raise ValueError(f"a raw image must be uint8 H×W×3 in C order, got {dtype} {shape}")
        pixels = payload[header.tell():]
        if pixels.numel() != math.prod(shape):
            raise ValueError(f"a raw image of shape {shape} needs {math.prod(shape)} bytes, the payload holds "
                             f"{pixels.numel()}")
        return pixels.view(shape).permute(2, 0, 1).to(device)


class JpegShardDataset(Dataset):
    """The samples of one split of a 'jpeg' directory: a batch's JPEGs are read by index from the open
    shards, decoded together (`torchvision.io.decode_jpeg` given the list), cut by `geometry` (one uint8
    C×H×W tensor at a time, e.g. `transforms.folder_geometry`), stacked and normalised by `mean`/`std`
    (per channel, on the [0, 1] scale). With `decode_in_loader` False a batch leaves as `EncodedImages`
    (read, not decoded), and the placement on the device does the rest."""

    def __init__(self, shards: Sequence[Path], samples: np.ndarray, geometry: Callable[[torch.Tensor], torch.Tensor],
                 mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        self.shards = list(shards)
        self.samples = samples
        self.labels = torch.from_numpy(np.ascontiguousarray(samples[:, 3]))
        self.geometry = geometry
        self.mean = mean
        self.std = std
        self.normalize_in_loader = True  # False: batches stay uint8 (see datasets.defer_normalization)
        self.decode_in_loader = True  # False: batches leave encoded (see datasets.defer_decoding)
        self._files: dict[int, int] = {}  # shard number -> open descriptor; pread needs no shared position

    def __len__(self) -> int:
        return len(self.samples)

    def payload(self, i: int) -> torch.Tensor:
        """The JPEG bytes of sample `i` as a uint8 tensor."""
        shard, offset, size, _ = (int(v) for v in self.samples[i])
        if shard not in self._files:
            self._files[shard] = os.open(self.shards[shard], os.O_RDONLY)
        data = os.pread(self._files[shard], size, offset)
        if len(data) != size:
            raise DatasetError(f"prepared shard {self.shards[shard]} ends before sample {i} (bytes {offset} to "
                               f"{offset + size}): the file was truncated; prepare the data set again")
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor | EncodedImages, torch.Tensor]:
        """Read, decode, cut and normalise a whole batch into (x float32 [B,3,H,W], y int64 [B]); x stays
        uint8 without `normalize_in_loader` and encoded without `decode_in_loader`."""
        index = np.asarray(indices, dtype=np.int64)
        where = ", ".join(sorted({str(self.shards[s]) for s in self.samples[index, 0]}))
        encoded = EncodedImages([self.payload(i) for i in index], self.geometry, where)
        if not self.decode_in_loader:
            return encoded, self.labels[index]
        batch = encoded.decode(torch.device("cpu"))
        return normalize(batch, self.mean, self.std) if self.normalize_in_loader else batch, self.labels[index]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """One sample as (float32 C×H×W, label), through the same path as a batch of one."""
        x, y = self.__getitems__([i])
        return x[0], int(y[0])

    def __getstate__(self) -> dict:
        """Pickled (a spawned DataLoader worker) without the open descriptors: the copy opens its own."""
        return self.__dict__ | {"_files": {}}

    def __del__(self) -> None:
        for fd in getattr(self, "_files", {}).values():
            os.close(fd)
