"""Readers for the on-disk dataset formats, returning validated in-memory tensors.

Every reader returns an :class:`ArraySplits`: uint8 images N×C×H×W and int64 labels for the
train and test splits. Anything wrong with the input (missing path, wrong layout, bad keys,
shape or dtype mismatch, damaged file) raises :class:`DatasetError` with a message that names
the offending path or field and says what was expected, so a user can fix a config without
reading a traceback.
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from largebatch.errors import DatasetError

EMBEDDED_PATH = Path(__file__).resolve().parent / "embedded" / "fashion_mnist.npz"
EMBEDDED_SHA256 = "5b6d2c4c694a91887af8ab7d039c04f80af3c29378d731c93a538d2e831aa469"

NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08
CIFAR_DIRS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
CIFAR_FILES = {
    "cifar10": ([f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": (["train"], ["test"]),
}
CIFAR_LABEL_KEY = {"cifar10": b"labels", "cifar100": b"fine_labels"}
CIFAR_CLASSES = {"cifar10": 10, "cifar100": 100}

_verified_paths: set[tuple[Path, int, int]] = set()  # (path, size, mtime) hashed and found right


@dataclass(frozen=True)
class ArraySplits:
    """Validated train/test arrays: uint8 images N×C×H×W (square) and int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


# --------------------------------------------------------------------------- validation


def images_to_nchw(x: np.ndarray, where: str) -> torch.Tensor:
    """Turn (N,H,W) grayscale or (N,H,W,3) RGB uint8 images into a contiguous N×C×H×W tensor."""
    if x.dtype != np.uint8:
        raise DatasetError(f"{where}: images must be uint8, got dtype {x.dtype}")
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[3] == 3:
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DatasetError(f"{where}: images must have shape (N,H,W) or (N,H,W,3), got {x.shape}")
    if x.shape[0] == 0:
        raise DatasetError(f"{where}: no images")
    if x.shape[2] != x.shape[3]:
        raise DatasetError(f"{where}: images must be square, got H×W = {x.shape[2]}×{x.shape[3]}")
    return torch.from_numpy(np.ascontiguousarray(x))


def labels_to_tensor(y: np.ndarray, count: int, where: str) -> torch.Tensor:
    """Check labels are a 1-D array of `count` non-negative integers and return them as int64."""
    y = np.asarray(y)
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"{where}: labels must be a 1-D integer array, got shape {y.shape} dtype {y.dtype}")
    if len(y) != count:
        raise DatasetError(f"{where}: {len(y)} labels for {count} images")
    if y.min() < 0:
        raise DatasetError(f"{where}: labels must be >= 0, found {y.min()}")
    return torch.from_numpy(y.astype(np.int64))


def _npz_reason(error: Exception) -> str:
    """Why numpy could not read an npz, without numpy's advice to allow pickles: data is never code."""
    if "pickle" in str(error):
        return ("it is not an archive of plain arrays (reading it would mean unpickling Python objects, which "
                "largebatch never does)")
    return str(error).split(". ")[0]


def build_splits(arrays: dict[str, np.ndarray], where: str, num_classes: int | None = None) -> ArraySplits:
    """Validate raw arrays keyed like NPZ_KEYS and pack them; infer num_classes from labels if not given."""
    x_train = images_to_nchw(arrays["x_train"], f"{where} x_train")
    x_test = images_to_nchw(arrays["x_test"], f"{where} x_test")
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{where}: x_train images are C×H×W {tuple(x_train.shape[1:])} "
            f"but x_test images are {tuple(x_test.shape[1:])}; they must match"
        )
    y_train = labels_to_tensor(arrays["y_train"], len(x_train), f"{where} y_train")
    y_test = labels_to_tensor(arrays["y_test"], len(x_test), f"{where} y_test")
    if num_classes is None:  # the classes are the ones the training split has; test labels must lie among them
        num_classes = int(y_train.max()) + 1
        unseen = sorted(set(y_test.unique().tolist()) - set(y_train.unique().tolist()))
        if unseen:
            raise DatasetError(f"{where}: test labels {unseen[:10]}{' ...' if len(unseen) > 10 else ''} never occur "
                               f"in the training labels (0..{num_classes - 1}); a model trained on these data "
                               "could not predict them")
    largest = int(max(y_train.max(), y_test.max()))
    if largest >= num_classes:
        raise DatasetError(f"{where}: labels must be in [0, {num_classes}), found {largest}")
    return ArraySplits(x_train, y_train, x_test, y_test, num_classes)


def existing_path(path: str, source: str) -> Path:
    """Return `path` as a Path, raising DatasetError if it is empty or does not exist."""
    if not path:
        raise DatasetError(f"source {source!r} needs a path, got an empty one")
    p = Path(path).expanduser()
    if not p.exists():
        raise DatasetError(f"{source} path {p} does not exist")
    return p


# --------------------------------------------------------------------------- npz / embedded


def read_npz(path: str | Path) -> ArraySplits:
    """Read an .npz file with uint8 images and integer labels under the keys NPZ_KEYS."""
    p = existing_path(str(path), "npz")
    try:
        npz = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DatasetError(f"cannot read npz file {p}: {_npz_reason(e)}") from None
    if not hasattr(npz, "files"):
        raise DatasetError(f"{p} is a single .npy array, expected an .npz archive with keys {list(NPZ_KEYS)}")
    with npz:
        missing = [k for k in NPZ_KEYS if k not in npz.files]
        if missing:
            raise DatasetError(f"{p}: missing keys {missing}; an npz needs keys {list(NPZ_KEYS)}, has {npz.files}")
        try:
            arrays = {k: npz[k] for k in NPZ_KEYS}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            raise DatasetError(f"cannot read arrays from npz file {p}: {_npz_reason(e)}") from None
    return build_splits(arrays, str(p))


def file_sha256(path: Path, what: str = "file") -> str:
    """The sha256 of the file at `path` as hex, read in 1 MiB blocks; an unreadable file raises DatasetError
    naming it as `what`."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path}: {e}") from e
    return digest.hexdigest()


def verify_sha256(path: Path, expected: str, what: str = "embedded dataset") -> None:
    """Raise DatasetError naming `path` (as `what`) unless its sha256 is `expected`; a file is hashed once per
    process while its size and modification time stay the same."""
    path = path.resolve()
    try:
        stat = path.stat()
    except OSError as e:
        raise DatasetError(f"cannot read {what} {path}: {e}") from e
    key = (path, stat.st_size, stat.st_mtime_ns)
    if key in _verified_paths:
        return
    found = file_sha256(path, what)
    if found != expected:
        raise DatasetError(f"{what} {path} is damaged: sha256 {found}, expected {expected}")
    _verified_paths.add(key)


def read_embedded() -> ArraySplits:
    """Read the Fashion-MNIST copy shipped inside the package after checking its sha256."""
    verify_sha256(EMBEDDED_PATH, EMBEDDED_SHA256)
    return read_npz(EMBEDDED_PATH)


# --------------------------------------------------------------------------- IDX


def parse_idx(raw: bytes, ndim: int, where: str) -> np.ndarray:
    """Parse an IDX buffer (magic 0,0,dtype,ndim; big-endian uint32 dims; data) of unsigned bytes."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DatasetError(f"{where}: not an IDX file (magic must start with two zero bytes)")
    dtype_code, file_ndim = raw[2], raw[3]
    if dtype_code != IDX_UBYTE:
        raise DatasetError(f"{where}: IDX data type 0x{dtype_code:02x} not supported, only 0x08 (unsigned byte)")
    if file_ndim != ndim:
        raise DatasetError(f"{where}: IDX file has {file_ndim} dimensions, expected {ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{where}: IDX header truncated ({len(raw)} bytes, needs {header})")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise DatasetError(f"{where}: IDX dims {dims} need {expected} data bytes, file has {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable for torch


def find_idx_file(directory: Path, stem: str) -> Path:
    """Locate `stem`.gz or `stem` in `directory`, preferring the gzip file."""
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    raise DatasetError(f"idx directory {directory} has neither {stem}.gz nor {stem}")


def read_idx_file(path: Path, ndim: int) -> np.ndarray:
    """Read one IDX file, gunzipping it when its name ends in .gz."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError) as e:
        raise DatasetError(f"cannot read IDX file {path}: {e}") from e
    return parse_idx(raw, ndim, str(path))


def read_idx(path: str) -> ArraySplits:
    """Read the four MNIST-style IDX files (gzipped or not) from a directory."""
    directory = existing_path(path, "idx")
    if not directory.is_dir():
        raise DatasetError(f"idx path {directory} must be a directory holding {sorted(IDX_FILES.values())}")
    arrays = {}
    for key, stem in IDX_FILES.items():
        arrays[key] = read_idx_file(find_idx_file(directory, stem), 3 if key.startswith("x") else 1)
    return build_splits(arrays, str(directory))


# --------------------------------------------------------------------------- CIFAR


def cifar_directory(path: str, source: str) -> Path:
    """Return the CIFAR batch directory given either that directory or its parent."""
    p = existing_path(path, source)
    train_files, _ = CIFAR_FILES[source]
    for candidate in (p, p / CIFAR_DIRS[source]):
        if (candidate / train_files[0]).is_file():
            return candidate
    raise DatasetError(
        f"{source} path {p} must be the {CIFAR_DIRS[source]} directory (holding {train_files[0]}, ...) or its parent"
    )


def read_cifar_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR python pickle: b'data' (N,3072) uint8 and the labels under `label_key`.

    The official files are pickles, so only point this at files you trust.
    """
    if not path.is_file():
        raise DatasetError(f"CIFAR batch file {path} does not exist")
    try:
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DatasetError(f"cannot read CIFAR batch {path}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        keys = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(f"CIFAR batch {path} must be a dict with keys b'data' and {label_key!r}, has {keys}")
    data = np.asarray(batch[b"data"])
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"CIFAR batch {path}: b'data' must be uint8 (N, 3072), got {data.dtype} {data.shape}")
    return data, np.asarray(batch[label_key])


def read_cifar_split(directory: Path, names: list[str], label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate CIFAR batches into (N,32,32,3) images and labels."""
    parts = [read_cifar_batch(directory / name, label_key) for name in names]
    data = np.concatenate([d for d, _ in parts])
    labels = np.concatenate([y for _, y in parts])
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def read_cifar(path: str, source: str) -> ArraySplits:
    """Read CIFAR-10 (`source`='cifar10') or CIFAR-100 fine labels ('cifar100') from the python pickles."""
    directory = cifar_directory(path, source)
    train_names, test_names = CIFAR_FILES[source]
    label_key = CIFAR_LABEL_KEY[source]
    x_train, y_train = read_cifar_split(directory, train_names, label_key)
    x_test, y_test = read_cifar_split(directory, test_names, label_key)
    arrays = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
    return build_splits(arrays, str(directory), CIFAR_CLASSES[source])


# --------------------------------------------------------------------------- by name


ARRAY_SOURCES = ("fashion_mnist", "npz", "idx", "cifar10", "cifar100")


def read_source(source: str, path: str) -> ArraySplits:
    """The arrays of an on-disk (or the embedded) array source of ARRAY_SOURCES, read from `path`."""
    if source == "fashion_mnist":
        return read_embedded()
    if source == "npz":
        return read_npz(path)
    if source == "idx":
        return read_idx(path)
    if source in ("cifar10", "cifar100"):
        return read_cifar(path, source)
    raise DatasetError(f"array source must be one of {ARRAY_SOURCES}, got {source!r}")


# --------------------------------------------------------------------------- synthetic


def check_synthetic_args(shape: tuple[int, int, int], classes: int, train: int, test: int) -> None:
    """Validate the synthetic_* arguments of load_splits, naming the bad one."""
    if len(shape) != 3 or any(int(s) < 1 for s in shape) or shape[1] != shape[2]:
        raise DatasetError(f"synthetic_shape must be (C, H, W) with positive sizes and H == W, got {shape}")
    if classes < 1:
        raise DatasetError(f"synthetic_classes must be >= 1, got {classes}")
    if train < 1 or test < 1:
        raise DatasetError(f"synthetic_train and synthetic_test must be >= 1, got {train} and {test}")


def synthetic_split(prototypes: torch.Tensor, count: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw `count` images: a random class's prototype plus Gaussian pixel noise, as uint8."""
    labels = torch.randint(len(prototypes), (count,), generator=gen)
    noise = torch.randn((count, *prototypes.shape[1:]), generator=gen) * 40.0
    images = (prototypes[labels] + noise).round_().clamp_(0, 255).to(torch.uint8)
    return images, labels


def make_synthetic(shape: tuple[int, int, int], classes: int, train: int, test: int, seed: int) -> ArraySplits:
    """Make a learnable random dataset, deterministic in `seed`.

    Each class has a smooth prototype image (random 4×4 pattern upsampled to H×W, so both
    linear and convolutional nets can tell classes apart); samples are the prototype plus noise.
    """
    check_synthetic_args(shape, classes, train, test)
    channels, size, _ = (int(s) for s in shape)
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand((classes, channels, 4, 4), generator=gen) * 192.0 + 32.0
    prototypes = torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)
    x_train, y_train = synthetic_split(prototypes, train, gen)
    x_test, y_test = synthetic_split(prototypes, test, gen)
    return ArraySplits(x_train, y_train, x_test, y_test, classes)
