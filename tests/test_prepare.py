"""Prepared data sets: `largebatch prepare` (largebatch.data.prepare), the 'prepared' source
(largebatch.data.prepared) and `largebatch bench data`, on tiny generated trees and arrays."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from torchvision.io import decode_jpeg
from torchvision.transforms import v2

import largebatch
from largebatch.cli import main
from largebatch.config import ConfigError
from largebatch.data import DatasetError, collate_batch, defer_normalization, load_splits
from largebatch.data import prepared as prepared_format
from largebatch.data.prepare import prepare
from largebatch.data.prepared import INDEX_NAME
from largebatch.data.transforms import FOLDER_CROP, FOLDER_RESIZE, folder_transforms
from largebatch.metrics import read_metrics
from largebatch.train import make_train_loader
from multiproc import run_python
from test_cli import TORCH_BLOCKED

pytestmark = [pytest.mark.usefixtures("one_thread"),
              # torchvision 0.29 deprecates its decoders for TorchCodec; they work from 0.26 on (torch 2.11 to 2.14)
              pytest.mark.filterwarnings("ignore:The image decoding and encoding capabilities:DeprecationWarning")]

CLASSES = ("ant", "bee", "cat")


def smooth_image(rng: np.random.Generator, height: int, width: int) -> Image.Image:
    """A random RGB image without pixel noise (a 4×4 grid upsampled), so a JPEG of it stays close to it."""
    grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
    return grid.resize((width, height), Image.Resampling.BICUBIC)


def write_tree(root: Path, per_class: tuple[int, int] = (4, 2), suffix: str = "png") -> Path:
    """root/{train,val}/<class>/<n>.<suffix>: small smooth images of varied sizes (longer side 20..40 px)."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for name in CLASSES:
            (root / split / name).mkdir(parents=True)
            for n in range(count):
                height, width = (int(v) for v in rng.integers(20, 41, 2))
                smooth_image(rng, height, width).save(root / split / name / f"{n}.{suffix}")
    return root


def write_npz(path: Path, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = {"x_train": rng.integers(0, 256, (24, *shape), dtype=np.uint8), "y_train": np.arange(24) % 5,
              "x_test": rng.integers(0, 256, (10, *shape), dtype=np.uint8), "y_test": np.arange(10) % 5}
    np.savez(path, **arrays)
    return arrays


def every_sample(dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return dataset.__getitems__(list(range(len(dataset))))


@pytest.fixture
def tree(tmp_path) -> Path:
    return write_tree(tmp_path / "tree")


@pytest.fixture
def jpeg_dir(tree, tmp_path) -> Path:
    prepare(str(tree), tmp_path / "prepared", max_side=24, workers=1)
    return tmp_path / "prepared"


# --------------------------------------------------------------------------- layout 'array'


@pytest.mark.parametrize("shape", [(8, 8), (6, 6, 3)], ids=["gray", "rgb"])
def test_array_layout_of_an_npz_is_the_npz_exactly(tmp_path, shape):
    arrays = write_npz(tmp_path / "d.npz", shape)
    index = prepare(str(tmp_path / "d.npz"), tmp_path / "p", source="npz")
    assert index["layout"] == "array" and index["splits"]["train"]["count"] == 24
    direct = load_splits("npz", str(tmp_path / "d.npz"), "none")
    copy = load_splits("prepared", str(tmp_path / "p"), "none")
    assert (copy.num_classes, copy.in_channels, copy.image_size) == (direct.num_classes, direct.in_channels,
                                                                     direct.image_size)
    for split in ("train", "test"):
        source, prepared = getattr(direct, split), getattr(copy, split)
        assert torch.equal(prepared.images, source.images)  # the npz's images, channels first
        assert torch.equal(prepared.labels, torch.from_numpy(arrays[f"y_{split}"]))
        assert (prepared.mean, prepared.std) == (source.mean, source.std)  # the training split's statistics
        for a, b in zip(every_sample(prepared), every_sample(source)):
            assert torch.equal(a, b)
    auto = load_splits("prepared", str(tmp_path / "p")).train.augment
    assert auto == load_splits("npz", str(tmp_path / "d.npz")).train.augment == ("flip" if len(shape) == 2 else
                                                                               "crop_flip")


def test_array_layout_of_the_embedded_fashion_mnist(tmp_path):
    prepare("", tmp_path / "p", source="fashion_mnist")
    direct, copy = load_splits("fashion_mnist"), load_splits("prepared", str(tmp_path / "p"))
    for split in ("train", "test"):
        assert torch.equal(getattr(copy, split).images, getattr(direct, split).images)
        assert torch.equal(getattr(copy, split).labels, getattr(direct, split).labels)
    assert (copy.train.mean, copy.train.std, copy.train.augment) == (direct.train.mean, direct.train.std, "flip")


def test_array_layout_of_a_folder_is_the_folder_sources_evaluation_cut(tree, tmp_path):
    index = prepare(str(tree), tmp_path / "p", layout="array", max_side=16, workers=2)
    assert index["image_size"] == 16 and index["classes"] == list(CLASSES)
    copy = load_splits("prepared", str(tmp_path / "p"), "none")
    folder = load_splits("folder", str(tree), "none", image_size=16)
    cut = v2.Compose([v2.ToImage(), v2.Resize(round(16 * FOLDER_RESIZE / FOLDER_CROP), antialias=True),
                      v2.CenterCrop(16)])
    for split in ("train", "test"):
        source, prepared = getattr(folder, split), getattr(copy, split)
        expected = torch.stack([cut(Image.open(path).convert("RGB")) for path, _ in source.samples])
        assert torch.equal(prepared.images, expected)
        assert prepared.labels.tolist() == source.targets
        x, y = every_sample(prepared)
        fx, fy = every_sample(source)
        assert torch.equal(y, fy)
        assert_close(x, fx, rtol=0, atol=1e-5)  # the same pixels and normalisation, rounded in another order


def test_folder_and_its_array_copy_train_the_same_loss_curve(tree, tmp_path):
    prepare(str(tree), tmp_path / "p", layout="array", max_side=16, workers=1)
    curves = []
    for source, path in (("folder", tree), ("prepared", tmp_path / "p")):
        cfg = largebatch.load_config("fmnist_goyal", {
            "data.source": source, "data.path": str(path), "data.image_size": 16, "data.augment": "none",
            "data.global_batch": 4, "data.bn_batch": 0, "data.eval_batch": 6, "schedule.epochs": 2,
            "schedule.warmup_epochs": 0, "run.log_every": 1, "run.progress": False, "run.checkpoint": False,
            "run.out_dir": str(tmp_path / "runs"), "run.name": source})
        records = read_metrics(largebatch.run(cfg).run_dir)
        curves.append(torch.tensor([r["loss"] if r["kind"] == "train" else r["test_loss"] for r in records
                                    if r["kind"] in ("train", "epoch")], dtype=torch.float64))
    assert len(curves[0]) == 6 + 2  # 3 steps and an evaluation per epoch
    assert_close(curves[1], curves[0], rtol=1e-6, atol=1e-6)


# --------------------------------------------------------------------------- layout 'jpeg'


def test_jpeg_layout_holds_every_image_once_with_its_label(tree, jpeg_dir):
    index = json.loads((jpeg_dir / INDEX_NAME).read_text())
    assert (index["layout"], index["max_side"], index["quality"], index["classes"]) == ("jpeg", 24, 90, list(CLASSES))
    folder = load_splits("folder", str(tree), "none")
    copy = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    for split in ("train", "test"):
        source, prepared = getattr(folder, split), getattr(copy, split)
        assert prepared.labels.tolist() == source.targets
        assert len({(int(s), int(o)) for s, o, _, _ in prepared.samples}) == len(source.samples)
        for i, (path, _) in enumerate(source.samples):
            original = Image.open(path).convert("RGB")
            payload = prepared.payload(i)
            stored = Image.open(io.BytesIO(payload.numpy().tobytes()))
            scale = min(1.0, 24 / max(original.size))
            assert stored.size == tuple(round(side * scale) for side in original.size)
            resized = np.asarray(original.resize(stored.size, Image.Resampling.BICUBIC), dtype=np.float32)
            assert np.abs(np.asarray(stored, dtype=np.float32) - resized).mean() < 8  # this image, re-encoded
            decoded = decode_jpeg(payload).permute(1, 2, 0).numpy().astype(np.float32)
            assert np.abs(decoded - np.asarray(stored, dtype=np.float32)).max() <= 2  # torchvision's decode ~ PIL's


def test_jpeg_shards_are_tar_files_in_webdataset_naming(jpeg_dir):
    copy = load_splits("prepared", str(jpeg_dir))
    dataset = copy.train
    with tarfile.open(dataset.shards[0]) as tar:
        members = tar.getmembers()
        assert [m.name for m in members[:2]] == ["00000000.jpg", "00000000.cls"]
        jpgs = [m for m in members if m.name.endswith(".jpg")]
        assert [m.offset_data for m in jpgs] == dataset.samples[:len(jpgs), 1].tolist()
        assert [int(tar.extractfile(m).read()) for m in members if m.name.endswith(".cls")] == \
            dataset.labels[:len(jpgs)].tolist()


def test_jpeg_evaluation_is_the_folder_sources_evaluation_of_the_stored_image(jpeg_dir):
    copy = load_splits("prepared", str(jpeg_dir), image_size=16)
    _, evaluate = folder_transforms("none", 16)
    x, _ = every_sample(copy.test)
    assert x.shape == (len(copy.test), 3, 16, 16) and x.dtype == torch.float32
    for i in range(len(copy.test)):
        stored = Image.open(io.BytesIO(copy.test.payload(i).numpy().tobytes())).convert("RGB")
        assert_close(x[i], evaluate(stored), rtol=0, atol=0.05)  # up to the two decoders' rounding


def test_jpeg_training_crops_are_random_resized_crops(jpeg_dir):
    train = load_splits("prepared", str(jpeg_dir), "auto", image_size=16).train
    torch.manual_seed(0)
    a, y = every_sample(train)
    b, _ = every_sample(train)
    assert a.shape == (len(train), 3, 16, 16) and torch.equal(y, train.labels)
    assert not torch.equal(a, b)
    torch.manual_seed(0)
    assert torch.equal(every_sample(train)[0], a)  # drawn from torch's global RNG, so replayed by its state


def test_jpeg_batches_through_workers_match_the_main_process(jpeg_dir):
    train = load_splits("prepared", str(jpeg_dir), "none", image_size=16).train
    batches = [[0, 5, 2], [11, 7, 1]]
    loaded = [list(torch.utils.data.DataLoader(train, batch_sampler=batches, collate_fn=collate_batch,
                                               num_workers=workers, persistent_workers=workers > 0))
              for workers in (0, 2)]
    for (x0, y0), (x2, y2) in zip(*loaded):
        assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_the_training_loader_starts_its_workers_each_epoch_and_pins_for_a_gpu(jpeg_dir):
    train = load_splits("prepared", str(jpeg_dir)).train
    for workers, device in ((0, "cpu"), (2, "cpu"), (2, "cuda")):
        loader = make_train_loader(train, [[0, 1]], workers, torch.device(device), seed=0)
        assert (loader.num_workers, loader.persistent_workers, loader.pin_memory) == (workers, False,
                                                                                   device == "cuda")


def test_unreadable_source_image_is_named(tree, tmp_path):
    bad = tree / "train" / "bee" / "1.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DatasetError, match="1 unreadable image") as error:
        prepare(str(tree), tmp_path / "p")
    assert str(bad) in str(error.value) and not (tmp_path / "p").exists()
    assert not list(tmp_path.glob(".p.tmp-*"))  # the half-built directory is gone


# --------------------------------------------------------------------------- damage and bad input


def shard_of(directory: Path) -> Path:
    return directory / prepared_format.shard_name("train", 0)


def test_a_flipped_byte_in_a_shard_is_named_by_its_sha256(jpeg_dir):
    load_splits("prepared", str(jpeg_dir))  # verified once: a later change must still be seen
    shard = shard_of(jpeg_dir)
    data = bytearray(shard.read_bytes())
    data[len(data) // 3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match="sha256") as error:
        load_splits("prepared", str(jpeg_dir))
    assert str(shard) in str(error.value)


def test_a_truncated_shard_is_named(jpeg_dir):
    shard = shard_of(jpeg_dir)
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size - 1000)
    for verify in ("sha256", "size"):
        with pytest.raises(DatasetError, match=f"{size - 1000} bytes, its index says {size}") as error:
            load_splits("prepared", str(jpeg_dir), verify=verify)
        assert str(shard) in str(error.value)


def test_a_shard_truncated_after_opening_is_named_when_read(jpeg_dir):
    train = load_splits("prepared", str(jpeg_dir)).train
    shard = shard_of(jpeg_dir)
    with open(shard, "r+b") as f:
        f.truncate(0)
    with pytest.raises(DatasetError, match="truncated") as error:
        train.__getitems__([len(train) - 1])
    assert str(shard) in str(error.value)


def test_a_missing_data_file_is_named(jpeg_dir):
    (jpeg_dir / "test-samples.npy").unlink()
    with pytest.raises(DatasetError, match="is missing") as error:
        load_splits("prepared", str(jpeg_dir), verify="size")
    assert str(jpeg_dir / "test-samples.npy") in str(error.value)


def test_a_directory_that_was_not_prepared_is_named(tree):
    with pytest.raises(DatasetError, match="not a prepared data set") as error:
        load_splits("prepared", str(tree))
    assert str(tree / INDEX_NAME) in str(error.value) and "largebatch prepare" in str(error.value)


@pytest.mark.parametrize("change, expected", [
    (lambda index: index | {"version": 99}, "format version 99; this largebatch reads version 1"),
    (lambda index: index | {"format": "other"}, 'expected "format": "largebatch-prepared"'),
    (lambda index: {k: v for k, v in index.items() if k != "classes"}, r"missing \['classes'\]"),
])
def test_an_index_of_another_version_or_kind_is_refused(jpeg_dir, change, expected):
    path = jpeg_dir / INDEX_NAME
    path.write_text(json.dumps(change(json.loads(path.read_text()))))
    with pytest.raises(DatasetError, match=expected) as error:
        load_splits("prepared", str(jpeg_dir))
    assert str(path) in str(error.value)


def test_augment_imagenet_needs_the_jpeg_layout(tmp_path):
    write_npz(tmp_path / "d.npz", (6, 6, 3))
    prepare(str(tmp_path / "d.npz"), tmp_path / "p", source="npz")
    with pytest.raises(DatasetError, match="holds layout 'array'"):
        load_splits("prepared", str(tmp_path / "p"), "imagenet")


@pytest.mark.parametrize("kwargs, expected", [
    ({"source": "npz", "layout": "jpeg"}, "--layout jpeg and --max-side are for folder trees"),
    ({"source": "npz", "max_side": 32}, "--layout jpeg and --max-side are for folder trees"),
    ({"layout": "array"}, "needs --max-side S"),
    ({"quality": 0}, "--quality must be in 1..100"),
    ({"source": "imagenet"}, "--source must be one of"),
    ({"source": "fashion_mnist"}, "takes no SRC"),
])
def test_options_that_cannot_work_are_refused_before_reading(tmp_path, kwargs, expected):
    with pytest.raises(DatasetError, match=expected):
        prepare(str(tmp_path / "anything"), tmp_path / "p", **kwargs)
    assert not (tmp_path / "p").exists()


# --------------------------------------------------------------------------- the command line


@pytest.mark.parametrize("argv, expected", [(["prepare", "--help"], "--shard-mb"),
                                            (["bench", "data", "--help"], "--image-size")])
def test_help_needs_no_torch(argv, expected):
    assert expected in run_python(["-c", TORCH_BLOCKED, *argv]).stdout


def test_prepare_command_writes_the_index_and_refuses_an_existing_destination(tree, tmp_path, capsys):
    dst = tmp_path / "p"
    assert main(["prepare", str(tree), str(dst), "--max-side", "24", "--quality", "80", "--workers", "1"]) == 0
    assert f"--data.source prepared --data.path {dst}" in capsys.readouterr().out
    index = json.loads((dst / INDEX_NAME).read_text())
    assert (index["format"], index["version"], index["layout"], index["source"]) == ("largebatch-prepared", 1,
                                                                                   "jpeg", "folder")
    assert (index["max_side"], index["quality"], index["classes"]) == (24, 80, list(CLASSES))
    assert {split: entry["count"] for split, entry in index["splits"].items()} == {"train": 12, "test": 6}
    assert index["normalization"]["mean"] == [0.485, 0.456, 0.406]
    assert sorted(index["files"]) == sorted(p.name for p in dst.iterdir() if p.name != INDEX_NAME)
    for name, entry in index["files"].items():
        data = (dst / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    assert main(["prepare", str(tree), str(dst)]) == 2
    assert f"{dst} exists: give --overwrite" in capsys.readouterr().err
    assert main(["prepare", str(tree), str(dst), "--overwrite", "--workers", "1"]) == 0
    assert json.loads((dst / INDEX_NAME).read_text())["max_side"] == 384

    keep = tmp_path / "keep"
    (keep / "precious.txt").parent.mkdir()
    (keep / "precious.txt").write_text("x")
    assert main(["prepare", str(tree), str(keep), "--overwrite"]) == 2
    assert "is not a prepared data set" in capsys.readouterr().err and (keep / "precious.txt").exists()


def test_prepare_command_of_an_array_source(tmp_path):
    write_npz(tmp_path / "d.npz", (8, 8))
    assert main(["prepare", "--source", "npz", str(tmp_path / "d.npz"), str(tmp_path / "p")]) == 0
    assert json.loads((tmp_path / "p" / INDEX_NAME).read_text())["splits"]["train"]["shape"] == [1, 8, 8]


def test_bench_data_times_every_pipeline(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", "data", "--images", "40", "--classes", "4", "--image-size", "32", "--batch", "8",
                 "--batches", "2", "--warmup", "1", "--repeats", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["benchmark"] == "bench_data" and "machine" in record
    assert (record["train_images"], record["classes"], record["image_size"]) == (40, 4, 32)
    rows = {row["name"]: row for row in record["rows"]}
    assert set(rows) == {"folder", "prepared", "prepared_uint8", "prepared_encoded", "prepared_raw"}
    assert rows["folder"]["ratio"] == 1.0 and record["raw_fraction"] == 0.5
    assert record["raw_bytes_per_image"] > record["prepared_bytes_per_image"]  # pixels take more room than JPEGs
    assert record["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # --device auto
    assert all(row["images_per_s"] > 0 and len(row["runs"]) == 1 for row in rows.values())
    assert "prepared: prepared JPEG shards" in capsys.readouterr().out


def test_prepared_batches_stay_uint8_for_normalising_on_the_device(jpeg_dir):
    """data.normalize_on = device: the shards' batches leave the loader as uint8 and the same normalisation
    after the transfer gives the loader's float batch."""
    from largebatch.data import defer_normalization
    from largebatch.data.transforms import normalize

    in_loader = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    deferred = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    mean, std = defer_normalization(deferred)
    for split in ("train", "test"):
        x, y = getattr(deferred, split).__getitems__([0, 3, 1])
        expected, labels = getattr(in_loader, split).__getitems__([0, 3, 1])
        assert x.dtype == torch.uint8 and torch.equal(y, labels)
        assert torch.equal(normalize(x, mean, std), expected)


# --------------------------------------------------------------------------- decoding on the device


def jpeg_run(jpeg_dir: Path, out: Path, name: str, overrides: dict) -> list[float]:
    """Per-step losses and test losses of a short run on the prepared JPEG shards, with crops and flips."""
    cfg = largebatch.load_config("fmnist_goyal", {
        "data.source": "prepared", "data.path": str(jpeg_dir), "data.image_size": 16, "data.augment": "imagenet",
        "data.global_batch": 4, "data.micro_batch": 2, "data.bn_batch": 0, "data.eval_batch": 6,
        "data.normalize_on": "device", "schedule.epochs": 2, "schedule.warmup_epochs": 0, "run.log_every": 1,
        "run.progress": False, "run.checkpoint": False, "run.out_dir": str(out), "run.name": name} | overrides)
    records = read_metrics(largebatch.run(cfg).run_dir)
    return [r["loss"] if r["kind"] == "train" else r["test_loss"] for r in records if r["kind"] in ("train", "epoch")]


def test_decoding_on_the_device_trains_what_decoding_in_the_loader_trains(jpeg_dir, tmp_path):
    """data.decode_on = device: the loader hands over the JPEG bytes, the placement decodes, cuts and flips;
    the random cuts are drawn from the same generator in the same order, so on the CPU the run is the same."""
    in_loader = jpeg_run(jpeg_dir, tmp_path, "loader", {})
    on_device = jpeg_run(jpeg_dir, tmp_path, "device", {"data.decode_on": "device"})
    assert len(in_loader) == 2 * (3 + 1) and on_device == in_loader  # 12 images: 3 steps and a test per epoch


def test_encoded_batches_leave_the_loader_as_bytes_and_decode_to_the_loaders_batch(jpeg_dir):
    from largebatch.data import defer_decoding
    from largebatch.data.prepared import EncodedImages

    decoded = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    encoded = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    for splits in (decoded, encoded):
        defer_normalization(splits)
    defer_decoding(encoded)
    for split in ("train", "test"):
        loader = torch.utils.data.DataLoader(getattr(encoded, split), batch_sampler=[[0, 3, 1]],
                                             collate_fn=collate_batch, num_workers=2)
        (x, y), = list(loader)
        expected, labels = getattr(decoded, split).__getitems__([0, 3, 1])
        assert isinstance(x, EncodedImages) and len(x) == 3 and all(p.dtype == torch.uint8 and p.dim() == 1
                                                                    for p in x.payloads)
        dataset = getattr(encoded, split)
        assert all(torch.equal(p, dataset.payload(i)) for p, i in zip(x.payloads, [0, 3, 1]))  # the shards' bytes
        assert torch.equal(y, labels) and torch.equal(x.decode(torch.device("cpu")), expected)
        pinned = x.pin_memory() if torch.cuda.is_available() else x
        assert torch.equal(pinned.decode(torch.device("cpu")), expected)


def test_a_corrupt_jpeg_decoded_on_the_device_names_its_shard(jpeg_dir):
    from largebatch.data import defer_decoding

    splits = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    defer_decoding(splits)
    x, _ = splits.train.__getitems__([0])
    x.payloads[0] = x.payloads[0][:20].clone()
    with pytest.raises(DatasetError, match=r"cannot decode an image read from prepared shard\(s\) .*train-000000.tar"):
        x.decode(torch.device("cpu"))


def test_decoding_on_the_device_is_refused_where_it_cannot_work(tmp_path):
    from largebatch.data import defer_decoding

    with pytest.raises(ConfigError, match="data.decode_on = 'device' decodes prepared JPEG shards"):
        largebatch.load_config("fmnist_goyal", {"data.decode_on": "device", "data.normalize_on": "device"})
    with pytest.raises(ConfigError, match="set data.normalize_on = 'device'"):
        largebatch.load_config("fmnist_goyal", {"data.decode_on": "device", "data.source": "prepared",
                                                "data.path": str(tmp_path)})
    write_npz(tmp_path / "a.npz", (8, 8))
    prepare(str(tmp_path / "a.npz"), tmp_path / "arrays", source="npz")
    with pytest.raises(DatasetError, match="holds uint8 arrays, which need no decoding"):
        defer_decoding(load_splits("prepared", str(tmp_path / "arrays")))


# --------------------------------------------------------------------------- images stored raw


def test_a_raw_fraction_stores_those_images_as_their_pixels_and_reads_them_exactly(tree, jpeg_dir, tmp_path):
    """--raw-fraction 0.5: about half the images (a fixed draw) are .npy members holding exactly the resized
    pixels that the JPEG of the same image encodes; training reads every sample once, with its label, the
    raw ones bit-exact and the JPEG ones as the all-JPEG copy has them, in the loader or on the device."""
    from largebatch.data import defer_decoding
    from largebatch.data.prepare import bounded_image

    index = prepare(str(tree), tmp_path / "raw", max_side=24, workers=1, raw_fraction=0.5)
    assert index["raw_fraction"] == 0.5
    again = prepare(str(tree), tmp_path / "raw2", max_side=24, workers=2, raw_fraction=0.5)
    assert again["files"] == index["files"]  # the same images raw, the same bytes
    folder = load_splits("folder", str(tree), "none")
    mixed = load_splits("prepared", str(tmp_path / "raw"), "none", image_size=16)
    jpeg = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    stored_raw = {}
    for split in ("train", "test"):
        source, dataset, reference = getattr(folder, split), getattr(mixed, split), getattr(jpeg, split)
        raw = [bytes(dataset.payload(i)[:6].tolist()) == b"\x93NUMPY" for i in range(len(dataset))]
        assert sum(raw) == index["splits"][split]["raw"] and 0 < sum(raw) < len(raw)
        assert dataset.labels.tolist() == source.targets
        for i, (path, _) in enumerate(source.samples):
            if raw[i]:
                pixels = np.load(io.BytesIO(dataset.payload(i).numpy().tobytes()))  # a plain .npy
                assert np.array_equal(pixels, np.asarray(bounded_image(path, 24)))
            else:
                assert torch.equal(dataset.payload(i), reference.payload(i))
        x, _ = every_sample(dataset)
        expected, _ = every_sample(reference)
        assert torch.equal(x[~torch.tensor(raw)], expected[~torch.tensor(raw)])
        assert (x[torch.tensor(raw)] - expected[torch.tensor(raw)]).abs().mean() < 0.15  # pixels vs their JPEG
        stored_raw[split] = raw
    with tarfile.open(mixed.train.shards[0]) as tar:  # webdataset naming: <key>.npy for the raw images
        images = [m.name for m in tar.getmembers() if not m.name.endswith(".cls")]
        assert [name.endswith(".npy") for name in images] == [stored_raw["train"][int(name[:8])] for name in images]
        assert all(name.endswith((".npy", ".jpg")) for name in images)
    defer_normalization(mixed)
    defer_decoding(mixed)
    encoded, _ = mixed.test.__getitems__(list(range(len(mixed.test))))
    in_loader = load_splits("prepared", str(tmp_path / "raw"), "none", image_size=16)
    defer_normalization(in_loader)
    assert torch.equal(encoded.decode(torch.device("cpu")), every_sample(in_loader.test)[0])


@pytest.mark.parametrize("kwargs, expected", [
    ({"raw_fraction": 1.5}, "--raw-fraction must be in [0, 1], got 1.5"),
    ({"raw_fraction": 0.5, "layout": "array", "max_side": 16}, "--raw-fraction stores some images of JPEG shards raw"),
])
def test_a_raw_fraction_that_cannot_work_is_refused(tree, tmp_path, kwargs, expected):
    with pytest.raises(DatasetError, match=re.escape(expected)):
        prepare(str(tree), tmp_path / "p", workers=1, **kwargs)
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize("array, cut, expected", [
    (np.zeros((4, 5), dtype=np.uint8), 0, "a raw image must be uint8 H×W×3"),
    (np.zeros((4, 5, 3), dtype=np.float32), 0, "a raw image must be uint8 H×W×3"),
    (np.zeros((4, 5, 3), dtype=np.uint8), 7, "a raw image of shape \\(4, 5, 3\\) needs 60 bytes, the payload holds 53"),
])
def test_a_damaged_raw_image_is_named_with_its_shard(array, cut, expected):
    from largebatch.data.prepared import EncodedImages

    out = io.BytesIO()
    np.save(out, array)
    payload = torch.frombuffer(bytearray(out.getvalue()[:len(out.getvalue()) - cut]), dtype=torch.uint8)
    with pytest.raises(DatasetError, match=f"prepared shard\\(s\\) /data/train-000003.tar: {expected}"):
        EncodedImages([payload], lambda image: image, "/data/train-000003.tar").decode(torch.device("cpu"))


def test_prepare_command_passes_the_raw_fraction(tree, tmp_path, capsys):
    assert main(["prepare", str(tree), str(tmp_path / "p"), "--max-side", "24", "--raw-fraction", "1",
                 "--workers", "1"]) == 0
    index = json.loads((tmp_path / "p" / INDEX_NAME).read_text())
    assert index["raw_fraction"] == 1.0
    assert all(split["raw"] == split["count"] for split in index["splits"].values())


def test_the_dataloaders_pinning_pins_every_payload_of_an_encoded_batch(jpeg_dir, monkeypatch):
    """DataLoader(pin_memory=True) hands a batch to torch's pin_memory helper, which calls
    EncodedImages.pin_memory; pinning is faked as a copy here (a CPU-only torch cannot pin)."""
    from torch.utils.data._utils.pin_memory import pin_memory

    from largebatch.data import defer_decoding
    from largebatch.data.prepared import EncodedImages

    splits = load_splits("prepared", str(jpeg_dir), "none", image_size=16)
    defer_decoding(splits)
    batch = splits.train.__getitems__([0, 3, 1])
    pinned_copies = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *args: pinned_copies.append(self.clone()) or
                        pinned_copies[-1])
    x, y = pin_memory(batch)
    assert isinstance(x, EncodedImages) and x.where == batch[0].where and x.geometry is batch[0].geometry
    assert all(any(p is q for q in pinned_copies) for p in x.payloads)  # every payload went through pinning
    assert [torch.equal(p, q) for p, q in zip(x.payloads, batch[0].payloads)] == [True] * 3
