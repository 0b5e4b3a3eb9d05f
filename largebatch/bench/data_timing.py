"""Timing the training data path for `largebatch bench data`: the trainer's own DataLoader (its sampler,
workers and collate function, `train.make_train_loader`) over the folder source and over its prepared
JPEG shards, the same number of batches each, in turns; what the trainer's placement still does to a
uint8 or encoded batch on the device (normalising; decoding first) counts in those rows.
"""

from __future__ import annotations

import itertools
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from largebatch.bench.image_tree import write_tree
from largebatch.config import DataConfig, plan_batches
from largebatch.data import defer_decoding, defer_normalization, load_splits
from largebatch.data.prepare import prepare
from largebatch.data.sampler import GlobalBatchSampler
from largebatch.data.transforms import normalize
from largebatch.dist.threads import usable_cores
from largebatch.train import make_train_loader

PIPELINES = {"folder": "ImageFolder + PIL + v2 transforms", "prepared": "prepared JPEG shards + decode_jpeg",
             "prepared_uint8": "the same, normalised after the loader (uint8 out)",
             "prepared_encoded": "the same, decoded after the loader (JPEG bytes out)",
             "prepared_raw": "prepared shards with a fraction stored raw (--raw-fraction)"}


@dataclass(frozen=True)
class Loading:
    """What to time: `batches` training batches of `batch` images cut to `image_size` px, after `warmup`
    batches (workers starting), with `workers` DataLoader workers, `repeats` times per pipeline in turns;
    batches that leave the loader uint8 or encoded are finished on `device`."""

    image_size: int
    batch: int
    batches: int
    warmup: int
    workers: int
    repeats: int
    seed: int = 0
    device: str = "cpu"


@dataclass(frozen=True)
class DataRow:
    """One pipeline: what it is, its key in PIPELINES, images/s of each repeat, and its best."""

    pipeline: str
    name: str
    runs: tuple[float, ...]

    @property
    def images_per_s(self) -> float:
        return max(self.runs)  # another process can only slow a run down


@dataclass(frozen=True)
class DataResult:
    """The rows, and the data they loaded: the tree's and the prepared copy's sizes."""

    train_images: int
    classes: int
    tree_bytes_per_image: float
    prepared_bytes_per_image: float
    max_side: int
    quality: int
    prepare_s: float
    raw_fraction: float
    raw_bytes_per_image: float  # of the copy with raw_fraction of the images stored raw
    rows: tuple[DataRow, ...]


def epochs_of(loader: torch.utils.data.DataLoader, sampler: GlobalBatchSampler) -> Iterator:
    """The loader's batches epoch after epoch, the sampler moved to each epoch as the trainer moves it."""
    for epoch in itertools.count():
        sampler.set_epoch(epoch)
        yield from loader


def loading_rate(dataset: torch.utils.data.Dataset, loading: Loading,
                 finish: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Training images per second the trainer's DataLoader delivers from `dataset`, loading alone; `finish`,
    what the main process still does to each batch on the device (decoding, normalising), counts too, up to
    its last kernel."""
    plan = plan_batches(DataConfig(global_batch=loading.batch, micro_batch=0, bn_batch=0), 1)
    sampler = GlobalBatchSampler(len(dataset), plan, 0, loading.seed)
    device = torch.device(loading.device)
    loader = make_train_loader(dataset, sampler, loading.workers, device, loading.seed)
    batches = epochs_of(loader, sampler)
    for _ in range(loading.warmup):
        next(batches)
    start = time.perf_counter()
    for _ in range(loading.batches):
        x, _ = next(batches)
        if finish is not None:
            finish(x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return loading.batches * loading.batch / (time.perf_counter() - start)


def measure(tree: Path | None, images: int, classes: int, loading: Loading, max_side: int | None = None,
            quality: int | None = None, raw_fraction: float = 0.5) -> DataResult:
    """Generate the JPEG tree (at `tree` when it is not there yet, else in a temporary directory; a tree at
    `tree` is used as it is), prepare it (all JPEG, and with `raw_fraction` of the images raw), and time
    every pipeline."""
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        root = tree or Path(tmp) / "tree"
        if not (root / "train").is_dir():
            write_tree(root, images, classes, loading.seed)
        options = {name: value for name, value in (("max_side", max_side), ("quality", quality)) if value is not None}
        start = time.perf_counter()
        index = prepare(str(root), Path(tmp) / "prepared", workers=usable_cores(), **options)
        prepare_s = time.perf_counter() - start
        raw_index = prepare(str(root), Path(tmp) / "prepared_raw", workers=usable_cores(), raw_fraction=raw_fraction,
                            **options)
        splits = {pipeline: load_splits(source, str(path), "auto", image_size=loading.image_size)
                  for pipeline, source, path in (("folder", "folder", root),
                                                 ("prepared", "prepared", Path(tmp) / "prepared"),
                                                 ("prepared_uint8", "prepared", Path(tmp) / "prepared"),
                                                 ("prepared_encoded", "prepared", Path(tmp) / "prepared"),
                                                 ("prepared_raw", "prepared", Path(tmp) / "prepared_raw"))}
        device = torch.device(loading.device)
        normalization = defer_normalization(splits["prepared_uint8"])
        defer_normalization(splits["prepared_encoded"])
        defer_decoding(splits["prepared_encoded"])
        finish = {"prepared_uint8": lambda x: normalize(x.to(device, non_blocking=True), *normalization),
                  "prepared_encoded": lambda x: normalize(x.decode(device), *normalization)}
        runs: dict[str, list[float]] = {pipeline: [] for pipeline in splits}
        for _ in range(loading.repeats):
            for pipeline, data in splits.items():
                runs[pipeline].append(loading_rate(data.train, loading, finish.get(pipeline)))
        folder = splits["folder"].train
        tree_bytes = sum(Path(path).stat().st_size for path, _ in folder.samples)
        prepared_bytes, raw_bytes = (sum(entry["bytes"] for name, entry in copy["files"].items()
                                         if name.startswith("train-")) for copy in (index, raw_index))
        return DataResult(len(folder), len(folder.classes), tree_bytes / len(folder), prepared_bytes / len(folder),
                          index["max_side"], index["quality"], prepare_s, raw_fraction, raw_bytes / len(folder),
                          tuple(DataRow(PIPELINES[pipeline], pipeline, tuple(rates))
                                for pipeline, rates in runs.items()))
