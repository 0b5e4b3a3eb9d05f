"""Tests for largebatch.data: every on-disk format, the embedded set, augmentation, normalisation, loading."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from largebatch.data.verify import unreadable_images
from largebatch.data import (AUGMENTS, SOURCES, DatasetError, DataSplits, TensorImageDataset, collate_batch,
                             load_splits)
from largebatch.data import formats
from largebatch.data.transforms import random_crop, random_flip


# --------------------------------------------------------------------------- fixture writers


def random_images(shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an unsigned-byte IDX file (gzipped when the name ends in .gz)."""
    raw = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw += array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)


def make_idx_dir(root: Path, gz: bool) -> dict[str, np.ndarray]:
    arrays = {"x_train": random_images((12, 28, 28), 1), "y_train": np.arange(12, dtype=np.uint8) % 5,
              "x_test": random_images((6, 28, 28), 2), "y_test": np.arange(6, dtype=np.uint8) % 5}
    root.mkdir(parents=True, exist_ok=True)
    for key, stem in formats.IDX_FILES.items():
        write_idx(root / (stem + (".gz" if gz else "")), arrays[key])
    return arrays


def write_pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def make_cifar(root: Path, source: str, per_file: int = 4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Write CIFAR pickles under root/<official dir>; return (x_train, y_train, x_test, y_test) as N×3×32×32."""
    directory = root / formats.CIFAR_DIRS[source]
    directory.mkdir(parents=True)
    train_names, test_names = formats.CIFAR_FILES[source]
    label_key = formats.CIFAR_LABEL_KEY[source]
    classes = formats.CIFAR_CLASSES[source]
    splits = []
    for offset, names in ((0, train_names), (100, test_names)):
        datas, labels = [], []
        for i, name in enumerate(names):
            data = random_images((per_file, 3072), offset + i)
            y = [(offset + i * per_file + j * 7) % classes for j in range(per_file)]
            write_pickle(directory / name, {b"data": data, label_key: y, b"batch_label": b"x"})
            datas.append(data)
            labels += y
        splits += [np.concatenate(datas).reshape(-1, 3, 32, 32), np.array(labels)]
    return tuple(splits)


def write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def gray_npz(path: Path) -> dict[str, np.ndarray]:
    arrays = {"x_train": random_images((20, 8, 8), 3), "y_train": np.arange(20) % 4,
              "x_test": random_images((10, 8, 8), 4), "y_test": np.arange(10) % 4}
    write_npz(path, **arrays)
    return arrays


def make_folder(root: Path, classes=("cat", "dog"), per_class: int = 2) -> None:
    """Write root/{train,val}/<class>/<n>.png|jpg small RGB images."""
    for split in ("train", "val"):
        for c, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True)
            for n in range(per_class):
                img = Image.fromarray(random_images((30, 40, 3), 10 * c + n))
                img.save(d / f"{n}.{'png' if n % 2 == 0 else 'jpg'}")


def pixels(ds, i: int) -> torch.Tensor:
    """Un-normalise sample i of an in-memory dataset back to float pixel values."""
    x, _ = ds[i]
    mean = torch.tensor(ds.mean).view(-1, 1, 1)
    std = torch.tensor(ds.std).view(-1, 1, 1)
    return (x * std + mean) * 255


# --------------------------------------------------------------------------- formats


def test_npz_grayscale_loads_values_labels_and_geometry(tmp_path):
    arrays = gray_npz(tmp_path / "d.npz")
    splits = load_splits("npz", str(tmp_path / "d.npz"), "none")
    assert isinstance(splits, DataSplits)
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (4, 1, 8)
    assert len(splits.train) == 20 and len(splits.test) == 10
    assert torch.equal(splits.train.images, torch.from_numpy(arrays["x_train"])[:, None])
    assert torch.equal(splits.test.labels, torch.arange(10) % 4)
    assert splits.train.images.dtype == torch.uint8 and splits.train.labels.dtype == torch.int64
    assert torch.allclose(pixels(splits.test, 3), torch.from_numpy(arrays["x_test"][3]).float()[None], atol=1e-3)


def test_npz_rgb_is_channels_first(tmp_path):
    x = random_images((5, 6, 6, 3), 0)
    write_npz(tmp_path / "c.npz", x_train=x, y_train=np.arange(5), x_test=x[:2], y_test=np.arange(2))
    splits = load_splits("npz", str(tmp_path / "c.npz"), "none")
    assert splits.in_channels == 3 and splits.num_classes == 5
    assert torch.equal(splits.train.images, torch.from_numpy(x).permute(0, 3, 1, 2))
    x_batch, y_batch = splits.train.__getitems__([4, 1])
    assert x_batch.shape == (2, 3, 6, 6) and x_batch.dtype == torch.float32
    assert y_batch.tolist() == [4, 1]


@pytest.mark.parametrize("gz", [True, False])
def test_idx_directory_gzipped_or_raw(tmp_path, gz):
    arrays = make_idx_dir(tmp_path / "mnist", gz)
    splits = load_splits("idx", str(tmp_path / "mnist"))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (5, 1, 28)
    assert torch.equal(splits.train.images[:, 0], torch.from_numpy(arrays["x_train"]))
    assert torch.equal(splits.test.images[:, 0], torch.from_numpy(arrays["x_test"]))
    assert splits.train.labels.tolist() == arrays["y_train"].tolist()
    assert splits.train.augment == "flip"  # auto for 28x28 grayscale


@pytest.mark.parametrize("corrupt, expected", [
    (lambda raw: b"\x01" + raw[1:], "magic"),
    (lambda raw: raw[:2] + b"\x0d" + raw[3:], "0x0d"),
    (lambda raw: raw[:3] + b"\x02" + raw[4:], "2 dimensions, expected 3"),
    (lambda raw: raw[:-5], "data bytes"),
])
def test_idx_header_is_validated(tmp_path, corrupt, expected):
    make_idx_dir(tmp_path, gz=False)
    bad = tmp_path / formats.IDX_FILES["x_test"]
    bad.write_bytes(corrupt(bad.read_bytes()))
    with pytest.raises(DatasetError, match=expected) as err:
        load_splits("idx", str(tmp_path))
    assert str(bad) in str(err.value)


def test_idx_missing_file_is_named(tmp_path):
    make_idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError, match="t10k-labels-idx1-ubyte"):
        load_splits("idx", str(tmp_path))


@pytest.mark.parametrize("source", ["cifar10", "cifar100"])
def test_cifar_from_directory_or_parent(tmp_path, source):
    x_train, y_train, x_test, y_test = make_cifar(tmp_path, source)
    for path in (tmp_path, tmp_path / formats.CIFAR_DIRS[source]):
        splits = load_splits(source, str(path))
        assert splits.num_classes == formats.CIFAR_CLASSES[source]
        assert (splits.in_channels, splits.image_size) == (3, 32)
        assert torch.equal(splits.train.images, torch.from_numpy(x_train))
        assert torch.equal(splits.test.images, torch.from_numpy(x_test))
        assert splits.train.labels.tolist() == y_train.tolist()
        assert splits.test.labels.tolist() == y_test.tolist()
        assert splits.train.augment == "crop_flip"


def test_cifar_bad_key_names_file_and_key(tmp_path):
    make_cifar(tmp_path, "cifar10")
    bad = tmp_path / "cifar-10-batches-py" / "test_batch"
    write_pickle(bad, {b"data": random_images((2, 3072), 0), b"fine_labels": [0, 1]})
    with pytest.raises(DatasetError, match="b'labels'") as err:
        load_splits("cifar10", str(tmp_path))
    assert str(bad) in str(err.value)


def test_cifar_wrong_layout(tmp_path):
    with pytest.raises(DatasetError, match="cifar-10-batches-py"):
        load_splits("cifar10", str(tmp_path))


@pytest.mark.parametrize("workers", [0, 2])
def test_folder_tree_loads_and_batches(tmp_path, workers):
    make_folder(tmp_path)
    splits = load_splits("folder", str(tmp_path))
    assert (splits.num_classes, splits.in_channels, splits.image_size) == (2, 3, 224)
    assert len(splits.train) == 4 and len(splits.test) == 4
    x, y = splits.test[3]
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and y == 1
    loader = DataLoader(splits.train, batch_sampler=[[0, 3], [1, 2]], collate_fn=collate_batch, num_workers=workers)
    batches = list(loader)
    assert [b[1].tolist() for b in batches] == [[0, 1], [0, 1]]
    assert batches[0][0].shape == (2, 3, 224, 224)


def test_folder_eval_transform_is_deterministic(tmp_path):
    make_folder(tmp_path)
    test = load_splits("folder", str(tmp_path)).test
    assert torch.equal(test.__getitems__([0, 2])[0], test.__getitems__([0, 2])[0])


def test_corrupt_image_error_names_file(tmp_path):
    make_folder(tmp_path)
    bad = tmp_path / "train" / "dog" / "3.jpg"
    bad.write_bytes(b"definitely not a jpeg")
    train = load_splits("folder", str(tmp_path), check_images=lambda paths: []).train  # damaged after the check
    index = train.samples.index((str(bad), 1))
    with pytest.raises(DatasetError, match="cannot read image") as err:
        train.__getitems__([0, index])
    assert str(bad) in str(err.value)


def test_every_unreadable_image_is_listed_before_training(tmp_path):
    make_folder(tmp_path)
    bad = [tmp_path / "train" / "dog" / "3.jpg", tmp_path / "val" / "cat" / "0.png"]
    bad[0].write_bytes(b"definitely not a jpeg")
    bad[1].write_bytes(bad[1].read_bytes()[:40])  # truncated
    with pytest.raises(DatasetError, match="2 unreadable image") as err:
        load_splits("folder", str(tmp_path))
    assert all(str(path) in str(err.value) for path in bad) and "on_bad_image = 'skip'" in str(err.value)
    full = load_splits("folder", str(tmp_path), check_images=lambda paths: [])
    kept = load_splits("folder", str(tmp_path), on_bad_image="skip")
    assert kept.skipped_images == 2
    assert (len(kept.train), len(kept.test)) == (len(full.train) - 1, len(full.test) - 1)
    assert str(bad[0]) not in [p for p, _ in kept.train.samples] and len(kept.train.targets) == len(kept.train)


def test_image_check_split_over_ranks_finds_the_same_files(tmp_path):
    make_folder(tmp_path)
    for name in ("5.jpg", "6.jpg", "7.png"):
        (tmp_path / "train" / "dog" / name).write_bytes(b"junk")
    paths = sorted(str(p) for p in tmp_path.rglob("*.*"))
    alone = unreadable_images(paths)
    shares = [unreadable_images(paths, rank, 3, gather=lambda mine: [mine]) for rank in range(3)]
    assert len(alone) == 3 and sorted(sum(shares, [])) == alone
    gathered = unreadable_images(paths, 1, 3, gather=lambda mine: shares[:1] + [mine] + shares[2:])
    assert gathered == alone


def test_folder_image_size(tmp_path):
    make_folder(tmp_path)
    splits = load_splits("folder", str(tmp_path), augment="none", image_size=32)
    x, _ = splits.train.__getitems__([0, 1])
    assert splits.image_size == 32 and x.shape[-2:] == (32, 32)


def test_folder_needs_train_and_val(tmp_path):
    make_folder(tmp_path)
    for f in (tmp_path / "val" / "dog").iterdir():
        f.unlink()
    (tmp_path / "val" / "dog").rmdir()
    with pytest.raises(DatasetError, match="class folders differ"):
        load_splits("folder", str(tmp_path))
    for f in (tmp_path / "val" / "cat").iterdir():
        f.unlink()
    (tmp_path / "val" / "cat").rmdir()
    (tmp_path / "val").rmdir()
    with pytest.raises(DatasetError, match="val is missing"):
        load_splits("folder", str(tmp_path))


# --------------------------------------------------------------------------- embedded Fashion-MNIST


@pytest.fixture(scope="module")
def fashion() -> DataSplits:
    return load_splits("fashion_mnist")


def test_embedded_fashion_mnist(fashion):
    assert (len(fashion.train), len(fashion.test)) == (60000, 10000)
    assert (fashion.num_classes, fashion.in_channels, fashion.image_size) == (10, 1, 28)
    assert torch.bincount(fashion.train.labels).tolist() == [6000] * 10
    assert torch.bincount(fashion.test.labels).tolist() == [1000] * 10
    assert fashion.train.augment == "flip" and fashion.test.augment == "none"
    assert fashion.train.mean[0] == pytest.approx(0.2860, abs=1e-4)
    assert fashion.train.std[0] == pytest.approx(0.3530, abs=1e-4)


def test_embedded_checksum_mismatch_names_path(tmp_path, monkeypatch):
    damaged = tmp_path / "fashion_mnist.npz"
    data = bytearray(formats.EMBEDDED_PATH.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    monkeypatch.setattr(formats, "EMBEDDED_PATH", damaged)
    with pytest.raises(DatasetError, match="sha256") as err:
        load_splits("fashion_mnist")
    assert str(damaged) in str(err.value)


def test_pathless_sources_reject_a_path(tmp_path):
    with pytest.raises(DatasetError, match="takes no path"):
        load_splits("fashion_mnist", str(tmp_path))


# --------------------------------------------------------------------------- normalisation


def test_normalisation_uses_training_statistics(tmp_path):
    x_train = random_images((40, 4, 4, 3), 5)
    x_train[..., 2] //= 4  # give the channels different statistics
    x_test = random_images((8, 4, 4, 3), 6)
    write_npz(tmp_path / "s.npz", x_train=x_train, y_train=np.zeros(40, int), x_test=x_test, y_test=np.zeros(8, int))
    splits = load_splits("npz", str(tmp_path / "s.npz"), "none")
    as_float = x_train.astype(np.float64) / 255
    assert np.allclose(splits.train.mean, as_float.mean(axis=(0, 1, 2)))
    assert np.allclose(splits.train.std, as_float.std(axis=(0, 1, 2)))
    assert splits.test.mean == splits.train.mean and splits.test.std == splits.train.std
    x, _ = splits.train.__getitems__(list(range(40)))
    assert torch.allclose(x.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(3), atol=1e-5)
    x_test_norm, _ = splits.test.__getitems__([0])
    expected = (torch.from_numpy(x_test[0]).permute(2, 0, 1) / 255 - torch.tensor(splits.train.mean).view(3, 1, 1))
    assert torch.allclose(x_test_norm[0], expected / torch.tensor(splits.train.std).view(3, 1, 1), atol=1e-5)


def test_constant_channel_does_not_divide_by_zero(tmp_path):
    x = np.full((4, 4, 4), 7, np.uint8)
    write_npz(tmp_path / "k.npz", x_train=x, y_train=np.zeros(4, int), x_test=x, y_test=np.zeros(4, int))
    splits = load_splits("npz", str(tmp_path / "k.npz"), "none")
    assert splits.train.std == (1.0,)
    assert torch.isfinite(splits.train[0][0]).all()


# --------------------------------------------------------------------------- augmentation


def asymmetric_batch(count: int, channels: int, size: int) -> torch.Tensor:
    return torch.from_numpy(random_images((count, channels, size, size), 9))


def test_random_flip_is_per_sample_and_exact():
    torch.manual_seed(0)
    images = asymmetric_batch(64, 3, 8)
    out = random_flip(images)
    flipped = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    kept = [torch.equal(o, i) for o, i in zip(out, images)]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 10 < sum(flipped) < 54
    assert torch.equal(images, asymmetric_batch(64, 3, 8))  # input untouched


@pytest.mark.parametrize("size, pad", [(28, 2), (32, 4)])
def test_random_crop_is_a_window_of_the_zero_padded_image(size, pad):
    torch.manual_seed(0)
    images = asymmetric_batch(200, 1 if size == 28 else 3, size)
    out = random_crop(images, pad)
    padded = torch.nn.functional.pad(images, (pad, pad, pad, pad))
    offsets = set()
    for o, p in zip(out, padded):
        matches = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                   if torch.equal(o, p[:, dy:dy + size, dx:dx + size])]
        assert matches
        offsets.add(matches[0])
    assert len(offsets) > (2 * pad + 1) ** 2 // 2  # offsets drawn per sample


def test_dataset_crop_flip_augments_each_sample(tmp_path):
    x = random_images((3, 32, 32, 3), 7)
    write_npz(tmp_path / "a.npz", x_train=x, y_train=np.arange(3), x_test=x, y_test=np.arange(3))
    train = load_splits("npz", str(tmp_path / "a.npz")).train
    assert train.augment == "crop_flip"
    torch.manual_seed(1)
    batch, labels = train.__getitems__([2] * 32)
    assert labels.tolist() == [2] * 32
    padded = torch.nn.functional.pad(train.images[2], (4, 4, 4, 4)).float()
    windows = {(dy, dx, f): padded[:, dy:dy + 32, dx:dx + 32].flip(-1) if f else padded[:, dy:dy + 32, dx:dx + 32]
               for dy in range(9) for dx in range(9) for f in (0, 1)}
    mean, std = torch.tensor(train.mean).view(3, 1, 1), torch.tensor(train.std).view(3, 1, 1)
    seen = set()
    for sample in batch:
        raw = (sample * std + mean) * 255
        found = [k for k, w in windows.items() if torch.allclose(raw, w, atol=1e-3)]
        assert found
        seen.add(found[0])
    assert len(seen) > 16 and {f for _, _, f in seen} == {0, 1}


def test_augmentation_replays_from_global_rng(fashion):
    torch.manual_seed(3)
    first = fashion.train.__getitems__(list(range(256)))[0]
    torch.manual_seed(3)
    assert torch.equal(first, fashion.train.__getitems__(list(range(256)))[0])


def test_flip_on_fashion_mnist_keeps_content(fashion):
    torch.manual_seed(0)
    x, _ = fashion.train.__getitems__([5] * 40)
    train = fashion.train
    plain = TensorImageDataset(train.images, train.labels, train.mean, train.std, "none")[5][0]
    flips = [torch.equal(s, plain.flip(-1)) for s in x]
    assert all(f or torch.equal(s, plain) for f, s in zip(flips, x))
    assert 0 < sum(flips) < 40


def test_test_split_is_never_augmented(fashion):
    first = fashion.test.__getitems__(list(range(100)))[0]
    assert torch.equal(first, fashion.test.__getitems__(list(range(100)))[0])


# --------------------------------------------------------------------------- synthetic


def test_synthetic_is_deterministic_and_learnable():
    a = load_splits("synthetic", synthetic_shape=(3, 16, 16), synthetic_classes=5, synthetic_train=500,
                    synthetic_test=100, seed=4)
    b = load_splits("synthetic", synthetic_shape=(3, 16, 16), synthetic_classes=5, synthetic_train=500,
                    synthetic_test=100, seed=4)
    c = load_splits("synthetic", synthetic_shape=(3, 16, 16), synthetic_classes=5, synthetic_train=500,
                    synthetic_test=100, seed=5)
    assert (a.num_classes, a.in_channels, a.image_size, len(a.train), len(a.test)) == (5, 3, 16, 500, 100)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(a.train.images, c.train.images)
    assert a.train.augment == "none" and int(a.train.labels.max()) < 5
    # nearest class mean on the training split classifies the test split
    x_train, y_train = a.train.__getitems__(list(range(500)))
    x_test, y_test = a.test.__getitems__(list(range(100)))
    means = torch.stack([x_train[y_train == k].mean(0) for k in range(5)]).flatten(1)
    predicted = torch.cdist(x_test.flatten(1), means).argmin(1)
    assert (predicted == y_test).float().mean() > 0.9


def test_synthetic_arguments_are_validated():
    with pytest.raises(DatasetError, match="synthetic_shape"):
        load_splits("synthetic", synthetic_shape=(3, 16, 8))
    with pytest.raises(DatasetError, match="synthetic_classes"):
        load_splits("synthetic", synthetic_classes=0)


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("source", ["npz", "idx", "cifar10", "cifar100", "folder"])
def test_missing_path_is_named(tmp_path, source):
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match="does not exist") as err:
        load_splits(source, str(missing))
    assert str(missing) in str(err.value)
    with pytest.raises(DatasetError, match="needs a path"):
        load_splits(source, "")


@pytest.mark.parametrize("arrays, expected", [
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(2, int)}, r"missing keys \['x_test', 'y_test'\]"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(2, int),
      "x_test": np.zeros((2, 5, 5), np.uint8), "y_test": np.zeros(2, int)}, "must match"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.zeros(3, int),
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": np.zeros(2, int)}, "y_train: 3 labels for 2 images"),
    ({"x_train": np.zeros((2, 4, 4), np.float32), "y_train": np.zeros(2, int),
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": np.zeros(2, int)}, "x_train: images must be uint8"),
    ({"x_train": np.zeros((2, 4, 4, 2), np.uint8), "y_train": np.zeros(2, int),
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": np.zeros(2, int)}, r"\(N,H,W\) or \(N,H,W,3\)"),
    ({"x_train": np.zeros((2, 4, 6), np.uint8), "y_train": np.zeros(2, int),
      "x_test": np.zeros((2, 4, 6), np.uint8), "y_test": np.zeros(2, int)}, "square"),
    ({"x_train": np.zeros((2, 4, 4), np.uint8), "y_train": np.array([0, -1]),
      "x_test": np.zeros((2, 4, 4), np.uint8), "y_test": np.zeros(2, int)}, ">= 0"),
])
def test_npz_bad_content_is_reported(tmp_path, arrays, expected):
    path = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=expected) as err:
        load_splits("npz", str(path))
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", ["junk", "random", "object_array"])
def test_not_an_npz_file_is_named_without_unsafe_advice(tmp_path, content):
    path = tmp_path / "junk.npz"
    if content == "junk":
        path.write_bytes(b"junk" * 10)
    elif content == "random":
        path.write_bytes(np.random.default_rng(0).bytes(4096))
    else:
        np.savez(path, x_train=np.array([{"a": 1}], dtype=object), y_train=np.zeros(1), x_test=np.zeros((1, 8, 8)),
                 y_test=np.zeros(1))
    with pytest.raises(DatasetError, match="cannot read") as err:
        load_splits("npz", str(path))
    assert str(path) in str(err.value)
    assert "allow_pickle" not in str(err.value) and "unsafe" not in str(err.value)


def test_test_labels_outside_the_training_classes_are_refused(tmp_path):
    path = write_npz(tmp_path / "labels.npz", x_train=random_images((4, 8, 8), 0), y_train=np.array([0, 1, 2, 1]),
                     x_test=random_images((2, 8, 8), 1), y_test=np.array([1, 57]))
    with pytest.raises(DatasetError, match=r"test labels \[57\] never occur in the training labels \(0..2\)"):
        load_splits("npz", str(path))


def test_unknown_source_and_augment_list_the_choices(tmp_path):
    with pytest.raises(DatasetError, match="source must be one of"):
        load_splits("mnist")
    with pytest.raises(DatasetError, match="augment must be one of"):
        load_splits("synthetic", augment="mixup")
    with pytest.raises(DatasetError, match="needs source 'folder'"):
        load_splits("synthetic", augment="imagenet")
    assert "fashion_mnist" in SOURCES and "auto" in AUGMENTS
    assert issubclass(DatasetError, ValueError)


# --------------------------------------------------------------------------- DataLoader


BATCHES = [[5, 0, 17], [3, 3, 9, 1], [19], [2, 11]]


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_with_batch_sampler_yields_requested_samples(tmp_path, workers):
    gray_npz(tmp_path / "d.npz")
    train = load_splits("npz", str(tmp_path / "d.npz"), "none").train
    loader = DataLoader(train, batch_sampler=BATCHES, collate_fn=collate_batch, num_workers=workers)
    got = list(loader)
    assert len(got) == len(BATCHES)
    for (x, y), indices in zip(got, BATCHES):
        assert y.tolist() == [i % 4 for i in indices]
        assert torch.equal(x, torch.stack([train[i][0] for i in indices]))


def test_dataloader_workers_run_augmentation(tmp_path):
    x = random_images((16, 32, 32, 3), 8)
    write_npz(tmp_path / "w.npz", x_train=x, y_train=np.arange(16), x_test=x, y_test=np.arange(16))
    train = load_splits("npz", str(tmp_path / "w.npz")).train
    loader = DataLoader(train, batch_sampler=[list(range(8)), list(range(8, 16))], collate_fn=collate_batch,
                        num_workers=2)
    labels = [y.tolist() for _, y in loader]
    assert labels == [list(range(8)), list(range(8, 16))]


def test_collate_batch_stacks_single_samples_too(tmp_path):
    gray_npz(tmp_path / "d.npz")
    train = load_splits("npz", str(tmp_path / "d.npz"), "none").train
    x, y = collate_batch([train[i] for i in (4, 7)])
    assert x.shape == (2, 1, 8, 8) and y.dtype == torch.int64 and y.tolist() == [0, 3]
    batch = train.__getitems__([4, 7])
    assert collate_batch(batch) is batch
