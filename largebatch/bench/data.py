"""`largebatch bench data`: how many training images per second the data path delivers, loading alone, from
an ImageNet-style JPEG tree through the folder source (torchvision ImageFolder, PIL decoding, v2
transforms, one image at a time) against its `largebatch prepare` copy (JPEG shards read by offset and
decoded a batch at a time), normalised in the loader or, as `data.normalize_on = "device"` does, after it
from uint8 batches, or decoded after it as well (`data.decode_on = "device"`; on a GPU, nvJPEG), and from a
copy with a fraction of the images stored raw (`prepare --raw-fraction`, FFCV's trade of disk for
decoding). The tree is generated (photo-sized images with ImageNet-sized JPEG files, seeded) unless
`--tree` names one to reuse; every pipeline runs through the trainer's own DataLoader with the same
workers, batch and number of batches, in turns, and the best run of each is reported (another process
on the machine can only slow a run down). Prints a table and writes it as JSON.

Options, table and JSON are here and import no torch, so `largebatch bench data --help` runs without it;
the timing is `largebatch.bench.data_timing`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from largebatch.bench.comm import at_least
from largebatch.bench.record import write_record
from largebatch.config import ConfigError

if TYPE_CHECKING:
    from largebatch.bench.data_timing import DataResult, Loading


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench data` in the sub-benchmarks `benchmarks`."""
    data = benchmarks.add_parser(
        "data", help="images/s of loading: an ImageFolder JPEG tree against its prepared shards",
        description="Time the training data path alone: a JPEG tree (generated, or --tree) read by the folder "
                    "source (ImageFolder + PIL + per-image transforms) against the same images prepared as JPEG "
                    "shards (`largebatch prepare`, batched decode_jpeg; normalised in the loader, and after it "
                    "from uint8 batches), through the trainer's DataLoader with the same workers, batch and number "
                    "of batches. Prints images/s and the ratio to the folder pipeline, and writes them as JSON.")
    data.add_argument("--images", type=at_least(1), default=5000, help="training images to generate (default 5000; "
                      "a tenth as many, at least one per class, for validation)")
    data.add_argument("--classes", type=at_least(1), default=100, help="classes to generate (default 100)")
    data.add_argument("--tree", type=Path, help="the JPEG tree to use: generated there when it does not exist, "
                      "and kept (default: generated in a temporary directory and removed)")
    data.add_argument("--image-size", type=at_least(8), default=224, help="training crop, as data.image_size "
                      "(default 224)")
    data.add_argument("--batch", type=at_least(1), default=64, help="images per batch (default 64)")
    data.add_argument("--batches", type=at_least(1), default=20, help="timed batches per run (default 20)")
    data.add_argument("--warmup", type=at_least(0), default=2, help="untimed batches first (default 2)")
    data.add_argument("--workers", type=at_least(0), default=0, help="DataLoader workers, as data.workers "
                      "(default 0)")
    data.add_argument("--repeats", type=at_least(1), default=2, help="runs per pipeline, in turns (default 2)")
    data.add_argument("--max-side", type=at_least(8), help="prepare's --max-side (default: its default, 384)")
    data.add_argument("--quality", type=at_least(1), help="prepare's --quality (default: its default, 90)")
    data.add_argument("--raw-fraction", type=float, default=0.5, help="prepare's --raw-fraction for the row of a "
                      "copy with that fraction of the images stored raw (default 0.5, FFCV's default)")
    data.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where batches that leave "
                      "the loader uint8 or as JPEG bytes are normalised and decoded, as the trainer's placement "
                      "does (default auto: cuda when torch sees a GPU)")
    data.add_argument("--seed", type=at_least(0), default=0, help="seed of the generated images and of the "
                      "data order (default 0)")
    data.add_argument("--json", type=Path, default=Path("bench_data.json"), help="where the JSON goes (default "
                      "bench_data.json in the current directory)")
    data.set_defaults(func=cmd_bench_data)


def cmd_bench_data(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}")
    from largebatch.bench.data_timing import Loading, measure
    from largebatch.bench.record import bench_device

    loading = Loading(args.image_size, args.batch, args.batches, args.warmup, args.workers, args.repeats, args.seed,
                      bench_device(args.device))
    result = measure(args.tree, args.images, args.classes, loading, args.max_side, args.quality, args.raw_fraction)
    print(table(loading, result))
    write_record(args.json, "bench_data", {
        "tree": str(args.tree) if args.tree else None, **dataclasses.asdict(loading),
        **{k: v for k, v in dataclasses.asdict(result).items() if k != "rows"},
        "rows": [dataclasses.asdict(row) | {"images_per_s": row.images_per_s, "ratio": ratio(result, row)}
                 for row in result.rows]})
    print(f"JSON: {args.json}")
    return 0


def ratio(result: DataResult, row) -> float:
    """The row's images/s over the folder pipeline's."""
    folder = next(r for r in result.rows if r.name == "folder")
    return row.images_per_s / folder.images_per_s


def table(loading: Loading, result: DataResult) -> str:
    """A header saying what was loaded and how, then one line per pipeline."""
    r = result
    lines = [f"{r.train_images} training images in {r.classes} classes, {r.tree_bytes_per_image / 1e3:.0f} KB per "
             f"JPEG file; prepared at max side {r.max_side} px, quality {r.quality}: "
             f"{r.prepared_bytes_per_image / 1e3:.0f} KB per image, {r.prepare_s:.1f} s to prepare; with "
             f"{r.raw_fraction:g} of them raw, {r.raw_bytes_per_image / 1e3:.0f} KB per image",
             f"{loading.image_size} px training batches of {loading.batch}, {loading.workers} DataLoader worker(s), "
             f"uint8 and encoded batches finished on {loading.device}; best of {loading.repeats} run(s) of "
             f"{loading.batches} batches after {loading.warmup} warm-up",
             f"{'pipeline':<66} {'images/s':>9} {'ratio':>6}"]
    for row in r.rows:
        lines.append(f"{row.name + ': ' + row.pipeline:<66} {row.images_per_s:>9.1f} {ratio(r, row):>6.2f}")
    return "\n".join(lines)
