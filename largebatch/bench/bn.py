"""`largebatch bench bn`: what BN statistics over fixed groups of n cost inside a larger micro-batch.

Goyal et al. keep BN's batch at a fixed per-worker n however large the batch. A device that fits
more than n samples per forward pass can get there two ways: ghost BN (`data.bn_batch = n` inside a
larger `data.micro_batch`, one native BN kernel per group) or micro-batches of n accumulated
(`data.micro_batch = n`). This times the trainer's step for both against plain BN over the whole
micro-batch (`data.bn_batch = 0`, which changes the statistics and is the speed floor), on one
device-resident global batch, all in one run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict
from pathlib import Path

from largebatch.bench.model import Workload, measure, table, trainer_overrides, trainer_step


def add_parser(benchmarks: argparse._SubParsersAction) -> None:
    """`largebatch bench bn` in the sub-benchmarks `benchmarks`."""
    bn = benchmarks.add_parser(
        "bn", help="ghost BN and micro-batches of n against plain BN over the micro-batch",
        description="Training step time of one network with BN statistics over groups of --bn-batch inside "
                    "micro-batches of --micro-batch (ghost BN), with micro-batches of --bn-batch accumulated, "
                    "and with plain BN over each micro-batch, on one synthetic device-resident batch of "
                    "--micro-batch images. Prints the table with each row's ratio to plain BN and writes JSON.")
    bn.add_argument("--model", default="small_cnn", help="registry model (default small_cnn)")
    bn.add_argument("--image-size", type=int, default=28, help="input side in px (default 28)")
    bn.add_argument("--channels", type=int, default=1, help="input channels (default 1)")
    bn.add_argument("--classes", type=int, default=10)
    bn.add_argument("--micro-batch", type=int, default=256, help="samples per forward pass and per step (default "
                    "256)")
    bn.add_argument("--bn-batch", type=int, default=32, help="n, samples per BN group (default 32)")
    bn.add_argument("--channels-last", action="store_true", help="NHWC weights and inputs in every row")
    bn.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    bn.add_argument("--steps", type=int, default=10)
    bn.add_argument("--repeats", type=int, default=5)
    bn.add_argument("--warmup", type=int, default=3)
    bn.add_argument("--json", type=Path, default=Path("bench_bn.json"), help="where the JSON goes")
    bn.set_defaults(func=cmd_bench_bn)


def cmd_bench_bn(args: argparse.Namespace, extra: list[str]) -> int:
    import torch

    from largebatch.bench.record import bench_device, write_record
    from largebatch.errors import UserError

    if extra:
        raise UserError(f"unknown arguments {' '.join(extra)}")
    if args.bn_batch < 2 or args.micro_batch % args.bn_batch or args.micro_batch == args.bn_batch:
        raise UserError(f"--micro-batch {args.micro_batch} must be a multiple (> 1x) of --bn-batch "
                        f"{args.bn_batch} >= 2")
    device = bench_device(args.device)
    w = Workload(args.model, args.image_size, args.channels, args.classes, args.micro_batch, "fp32", device)
    n, m = args.bn_batch, args.micro_batch
    rows = {f"plain BN over {m}": {"data.bn_batch": 0},
            f"ghost BN {n} in {m}": {"data.bn_batch": n},
            f"micro-batches of {n}": {"data.bn_batch": 0, "data.micro_batch": n}}
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(m, w.channels, w.image_size, w.image_size, generator=generator).to(device)
    y = torch.randint(0, w.classes, (m,), generator=generator).to(device)
    plain = trainer_overrides(w, "plain") | {"model.channels_last": args.channels_last}
    measured = measure({name: trainer_step(plain | fields, x, y) for name, fields in rows.items()}, w, args.warmup,
                       args.steps, args.repeats)
    base = measured[0].images_per_s
    print(table(w, measured, base, args).replace("x baseline", "x plain BN"))
    write_record(args.json, "bench_bn", {"workload": asdict(w), "bn_batch": n, "channels_last": args.channels_last,
                                         "rows": [asdict(r) | {"ratio_to_plain_bn": r.images_per_s / base}
                                                  for r in measured]})
    print(f"JSON: {args.json}")
    return 0
