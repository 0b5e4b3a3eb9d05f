"""`largebatch prepare SRC DST`: write a prepared data set (`largebatch.data.prepare`) for
`--data.source prepared --data.path DST`. Parsing and --help import no torch; the work does."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from largebatch.errors import ConfigError

DESCRIPTION = """\
Write a prepared copy of a data set that trains without decoding one image file at a time:
  layout jpeg (default for a folder tree SRC/train/<class>/*, SRC/val/<class>/*): every image made at most
    --max-side px on its longer side and re-encoded at JPEG --quality, packed into tar shards of about
    --shard-mb MB (webdataset naming) with an index of every sample's shard, offset, size and label;
  layout array (default for --source npz|idx|cifar10|cifar100|fashion_mnist): uint8 N x C x H x W .npy
    arrays, memory-mapped when training; a folder tree needs --max-side S, the square the images are cut to
    as data.image_size S cuts them.
DST/index.json lists every file with its size and sha256, the classes and the normalisation to use. DST is
built beside itself and renamed into place when complete; an existing DST is refused unless --overwrite.
Train from it with: largebatch train --data.source prepared --data.path DST"""


def add_prepare_command(commands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `largebatch prepare` to the CLI's sub-commands (an argparse subparsers object)."""
    prepare = commands.add_parser("prepare", help="write a prepared data set (JPEG shards or arrays) to train from",
                                  description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    prepare.set_defaults(func=cmd_prepare)
    prepare.add_argument("src", nargs="?", default="", metavar="SRC",
                         help="the folder tree or the array source's path (none for --source fashion_mnist)")
    prepare.add_argument("dst", metavar="DST", help="the prepared directory to write")
    prepare.add_argument("--source", default="folder", help="folder (default), npz, idx, cifar10, cifar100 or "
                         "fashion_mnist: read SRC as the data.source of that name reads it")
    prepare.add_argument("--layout", choices=("jpeg", "array"), help="jpeg (a folder tree's default) or array")
    prepare.add_argument("--max-side", type=int, help="jpeg: longest image side in px (default 384: ImageNet's "
                         "usual 500x375 photos keep a shorter side >= 256, the evaluation resize at 224); array "
                         "from a folder: the square's side")
    prepare.add_argument("--quality", type=int, help="jpeg: PIL JPEG quality 1..100 (default 90)")
    prepare.add_argument("--shard-mb", type=float, help="jpeg: shard size cap in MB (default 256)")
    prepare.add_argument("--raw-fraction", type=float, help="jpeg: fraction of the images stored as uncompressed "
                         "pixels (.npy members), which training copies instead of decoding: CPU time traded for "
                         "disk, about 6x a JPEG's bytes per raw image, as FFCV's compress_probability (default 0)")
    prepare.add_argument("--workers", type=int, default=0, help="processes re-encoding images (default: one per "
                         "usable core)")
    prepare.add_argument("--overwrite", action="store_true", help="replace DST if it is a prepared data set")
    return prepare


def cmd_prepare(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}")
    from largebatch.data.prepare import prepare
    from largebatch.dist.threads import usable_cores

    given = {"quality": args.quality, "shard_mb": args.shard_mb,  # the others keep prepare's defaults
             "raw_fraction": args.raw_fraction}
    index = prepare(args.src, args.dst, source=args.source, layout=args.layout, max_side=args.max_side,
                    workers=args.workers or usable_cores(), overwrite=args.overwrite,
                    **{name: value for name, value in given.items() if value is not None})
    splits = index["splits"]
    size_mb = sum(entry["bytes"] for entry in index["files"].values()) / 1e6
    shards = sum(len(split.get("shards", ())) for split in splits.values())
    print(f"prepared {args.dst}: layout {index['layout']}, {splits['train']['count']} training and "
          f"{splits['test']['count']} test images of {len(index['classes'])} classes, {size_mb:.1f} MB"
          f"{f' in {shards} shards' if shards else ''}")
    print(f"train from it with: largebatch train --data.source prepared --data.path {args.dst}")
    return 0
