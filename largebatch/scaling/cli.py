"""`largebatch plan`: predicted images/s, scaling efficiency and time to train for N workers at a
global batch, from the α–β model of `largebatch.scaling`; `--published` checks the model against
four published runs, `--measure` takes compute and link figures from this machine.

Torch is imported only by `--measure`, so `largebatch plan` and its --help run without it.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largebatch.config import MODEL_NAMES
from largebatch.errors import ConfigError
from largebatch.scaling.network import ALGORITHMS, Network, allreduce_seconds
from largebatch.scaling.published import TOLERANCE, load_published
from largebatch.scaling.sizes import PARAMETERS
from largebatch.scaling.step import BACKWARD_FRACTION, Prediction, Workload, predict

if TYPE_CHECKING:
    from largebatch.scaling.measure import ComputeTime, LinkFit

DDP_BUCKET_BYTES = 25 * 2**20
"""PyTorch DDP's default bucket_cap_mb (25 MiB): the default bucket count is the gradient over this."""

DESCRIPTION = """\
Predict images/s, scaling efficiency and time to train of synchronous data-parallel training for N
workers at a global batch: a step is the compute of global/N images per worker plus the part of the
gradient all-reduce (ring, tree = recursive halving-doubling, or hierarchical) that the backward pass
does not hide, in an alpha-beta model: latency alpha per step and seconds per byte beta, inside and
across nodes."""
EPILOG = ("examples:\n"
          "  largebatch plan --published\n"
          "  largebatch plan --model resnet50 --image-ms 1.0 --workers 8,64,256,1024 --global-batch 32768 \\\n"
          "      --gpus-per-node 8 --algorithm hierarchical --wire-bytes 2\n"
          "  largebatch plan --measure --model small_cnn --input 1,28,28 --classes 10 --workers 1,2 \\\n"
          "      --global-batch 256 --threads 1")


def _number(text: str, low: float, high: float = math.inf, low_open: bool = False) -> float:
    """`text` as a float in [low, high] (or (low, high]); an argparse error saying so otherwise."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (low < value if low_open else low <= value) or not value <= high or math.isinf(value):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]" if high < math.inf else \
            f"{'>' if low_open else '>='} {low:g}"
        raise argparse.ArgumentTypeError(f"expected a number {interval}, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return int(text)


def _positive_float(text: str) -> float:
    return _number(text, 0.0, low_open=True)


def _non_negative_float(text: str) -> float:
    return _number(text, 0.0)


def _fraction(text: str) -> float:
    return _number(text, 0.0, 1.0)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected integers >= 1 separated by commas (e.g. 8,64,256), got {text!r}")
    return values


def _shape(text: str) -> tuple[int, int, int]:
    values = _int_list(text)
    if len(values) != 3:
        raise argparse.ArgumentTypeError(f"expected channels,height,width (e.g. 3,224,224), got {text!r}")
    return values  # type: ignore[return-value]


def add_plan_command(commands: Any) -> argparse.ArgumentParser:
    """Add `plan` to the `largebatch` subcommands (an argparse subparsers object)."""
    plan = commands.add_parser("plan", help="predict images/s, scaling efficiency and time to train for N workers",
                               description=DESCRIPTION, epilog=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.set_defaults(func=cmd_plan)
    what = plan.add_argument_group("what is trained")
    what.add_argument("--workers", type=_int_list, default=(1, 8, 64, 256), metavar="N,N,...",
                      help="worker (GPU) counts to predict (default 1,8,64,256)")
    what.add_argument("--global-batch", type=_positive_int, default=8192, help="images per step over all workers "
                      "(default 8192); each worker computes global/N")
    what.add_argument("--model", default="resnet50", help=f"model whose parameters are all-reduced: "
                      f"{', '.join(PARAMETERS)} (ImageNet sizes), or with --measure one of {', '.join(MODEL_NAMES)} "
                      "(default resnet50)")
    what.add_argument("--params", type=_positive_int, help="parameter count, instead of the model's")
    what.add_argument("--image-ms", type=_positive_float, help="forward+backward milliseconds per image on one "
                      "worker (needed unless --measure)")
    what.add_argument("--epochs", type=_positive_float, default=90.0, help="for time to train (default 90)")
    what.add_argument("--dataset-size", type=_positive_int, default=1_281_167,
                      help="training images per epoch (default 1,281,167: ImageNet-1k)")
    net = plan.add_argument_group("network (defaults: NCCL's step latencies, NVLink 2 pairs, 100 Gbit/s per node)")
    net.add_argument("--gpus-per-node", type=_positive_int, default=8, help="workers per node (default 8)")
    net.add_argument("--alpha-intra", type=_non_negative_float, default=3.4, metavar="US",
                     help="latency per step inside a node, microseconds (default 3.4)")
    net.add_argument("--beta-intra", type=_positive_float, default=50.0, metavar="GB/S",
                     help="bandwidth of a worker's link inside a node, GB/s; beta = 1/bandwidth (default 50)")
    net.add_argument("--alpha-inter", type=_non_negative_float, default=14.0, metavar="US",
                     help="latency per step between nodes, microseconds (default 14)")
    net.add_argument("--beta-inter", type=_positive_float, default=12.5, metavar="GB/S",
                     help="bandwidth of one node's network links together, GB/s; beta = 1/bandwidth (default 12.5)")
    comm = plan.add_argument_group("all-reduce")
    comm.add_argument("--algorithm", choices=ALGORITHMS, default="ring", help="ring over all workers, tree "
                      "(recursive halving-doubling) or hierarchical (intra-node reduce-scatter, inter-node ring, "
                      "intra-node all-gather) (default ring)")
    comm.add_argument("--group", type=_positive_int, default=0, metavar="X",
                      help="hierarchical: workers per reduce-scatter group, a multiple of --gpus-per-node "
                      "(a 2D torus of X x N/X); default: one node")
    comm.add_argument("--wire-bytes", type=int, choices=(4, 2), default=4,
                      help="bytes per gradient element sent: 4 (fp32) or 2 (fp16/bf16) (default 4)")
    comm.add_argument("--buckets", type=_positive_int, help="all-reduces per step, each paying the latency "
                      "(default: the gradient in 25 MiB buckets, as DDP)")
    comm.add_argument("--overlap", type=_fraction, default=0.5, help="fraction of the all-reduce hidden under the "
                      "backward pass, at most its length (default 0.5)")
    other = plan.add_argument_group("modes and output")
    other.add_argument("--published", action="store_true", help="predict the four published runs (Goyal 2017, "
                       "Horovod 2018, Mikami 2018, Yamazaki 2019) and print them next to the published efficiency, "
                       "with every parameter and its source; other options are ignored")
    other.add_argument("--measure", action="store_true", help="measure compute per image (the model's forward and "
                       "backward at each per-worker batch) and this host's gloo alpha and beta (2 processes), and "
                       "use them for the intra-node link (imports torch)")
    other.add_argument("--threads", type=_positive_int, help="--measure: torch threads for the compute "
                       "(default: torch's, i.e. OMP_NUM_THREADS)")
    other.add_argument("--input", type=_shape, default=(3, 224, 224), metavar="C,H,W",
                       help="--measure: input shape (default 3,224,224)")
    other.add_argument("--classes", type=_positive_int, default=1000, help="--measure: classes (default 1000)")
    other.add_argument("--json", metavar="PATH", help="also write the prediction as JSON")
    return plan


def cmd_plan(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}")
    report = published_report() if args.published else plan_report(args)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _check_inputs(args: argparse.Namespace, net: Network) -> None:
    """Refuse, naming the options, what the model cannot plan."""
    if not args.measure and args.params is None and args.model not in PARAMETERS:
        raise ConfigError(f"--model {args.model}: its size is known for {', '.join(PARAMETERS)}; give --params N, "
                          f"or --measure with one of {', '.join(MODEL_NAMES)}")
    if args.measure and args.model not in MODEL_NAMES:
        raise ConfigError(f"--model {args.model}: --measure builds one of {', '.join(MODEL_NAMES)}")
    if args.group and args.algorithm != "hierarchical":
        raise ConfigError(f"--group applies to --algorithm hierarchical, not {args.algorithm}")
    if not args.measure and args.image_ms is None:
        raise ConfigError("--image-ms is needed (forward+backward milliseconds per image on one worker), "
                          "or --measure to measure it here")
    for n in args.workers:
        if args.global_batch % n:
            raise ConfigError(f"--global-batch {args.global_batch} does not divide over --workers {n}")
        try:
            allreduce_seconds(args.algorithm, 1.0, n, net, group=args.group)
        except ValueError as e:
            raise ConfigError(f"{e} (--workers {n}, --gpus-per-node {args.gpus_per_node}"
                              f"{f', --group {args.group}' if args.group else ''})") from None


def plan_report(args: argparse.Namespace) -> dict[str, Any]:
    """Predict each worker count of `args`, print the table, and return it as a JSON-able dict."""
    net = Network(alpha_intra=args.alpha_intra * 1e-6, beta_intra=1e-9 / args.beta_intra,
                  alpha_inter=args.alpha_inter * 1e-6, beta_inter=1e-9 / args.beta_inter,
                  gpus_per_node=args.gpus_per_node)
    _check_inputs(args, net)
    batches = {n: args.global_batch // n for n in (1, *args.workers)}
    measured: dict[str, Any] = {}
    if args.measure:
        parameters, compute, link = _measure(args, sorted(set(batches.values())))
        net = replace(net, alpha_intra=link.alpha, beta_intra=link.beta)
        measured = {"compute": {str(b): asdict(t) for b, t in compute.items()}, "link": asdict(link)}
        per_image = {b: (t.image_seconds, t.backward_fraction) for b, t in compute.items()}
    else:
        parameters = args.params or PARAMETERS[args.model]
        per_image = {b: (args.image_ms * 1e-3, BACKWARD_FRACTION) for b in batches.values()}
    buckets = args.buckets or max(1, math.ceil(parameters * args.wire_bytes / DDP_BUCKET_BYTES))

    def workload(n: int) -> Workload:
        image_seconds, backward = per_image[batches[n]]
        return Workload(parameters=parameters, image_seconds=image_seconds, wire_bytes=args.wire_bytes,
                        buckets=buckets, overlap=args.overlap, backward_fraction=backward)

    one = predict(workload(1), net, args.algorithm, 1, args.global_batch)
    rows = [predict(workload(n), net, args.algorithm, n, args.global_batch, args.group, baseline=one)
            for n in args.workers]
    inputs = {"model": args.model, "parameters": parameters, "wire_bytes": args.wire_bytes, "buckets": buckets,
              "overlap": args.overlap, "algorithm": args.algorithm, "group": args.group,
              "global_batch": args.global_batch, "epochs": args.epochs, "dataset_size": args.dataset_size,
              "network": asdict(net), "image_seconds": {str(b): s for b, (s, _) in per_image.items()},
              "backward_fraction": {str(b): f for b, (_, f) in per_image.items()}}
    print(_describe(args, parameters, buckets, net, measured))
    print(format_table(rows, args.epochs, args.dataset_size))
    return {"inputs": inputs, "measured": measured,
            "rows": [asdict(r) | {"time_to_train_s": r.time_to_train(args.epochs, args.dataset_size)} for r in rows]}


def _measure(args: argparse.Namespace, batches: list[int]) -> tuple[int, dict[int, ComputeTime], LinkFit]:
    """The model's parameter count, its compute time at each per-worker batch, and this host's gloo link."""
    from largebatch.scaling import measure

    parameters = args.params or measure.count_parameters(args.model, args.input, args.classes)
    compute = {b: measure.measure_compute(args.model, b, args.input, args.classes, args.threads) for b in batches}
    return parameters, compute, measure.measure_link()


def _describe(args: argparse.Namespace, parameters: int, buckets: int, net: Network, measured: dict[str, Any]) -> str:
    """The inputs of a plan, one line each, measured ones said to be measured."""
    lines = [f"model {args.model}: {parameters / 1e6:.2f} M parameters, {parameters * args.wire_bytes / 1e6:.1f} MB "
             f"per all-reduce ({'fp32' if args.wire_bytes == 4 else 'fp16/bf16'}), {args.algorithm}"
             f"{f' (groups of {args.group})' if args.group else ''}, {buckets} bucket(s), overlap {args.overlap:g}"]
    if measured:
        for b, t in measured["compute"].items():
            lines.append(f"measured compute: {1e3 * t['image_seconds']:.3f} ms/image at batch {b} "
                         f"({t['threads']} thread(s), backward {100 * t['backward_fraction']:.0f}%)")
        link = measured["link"]
        lines.append(f"measured gloo link (2 local processes, ring fit over {len(link['points'])} sizes from "
                     f"{link['points'][0][0]} to {link['points'][-1][0]} bytes): alpha {1e6 * link['alpha']:.1f} us, "
                     f"{1e-9 / link['beta']:.2f} GB/s")
    else:
        lines.append(f"compute {args.image_ms:.3f} ms/image (given), backward {100 * BACKWARD_FRACTION:.0f}%")
    lines.append(f"intra-node alpha {1e6 * net.alpha_intra:.1f} us, {1e-9 / net.beta_intra:.2f} GB/s; inter-node "
                 f"alpha {1e6 * net.alpha_inter:.1f} us, {1e-9 / net.beta_inter:.2f} GB/s per node; "
                 f"{net.gpus_per_node} workers per node")
    lines.append(f"global batch {args.global_batch}; time to train: {args.epochs:g} epochs of {args.dataset_size:,} "
                 "images; efficiency: images/s per worker over one worker's")
    return "\n".join(lines) + "\n"


def format_duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(rows: Sequence[Prediction], epochs: float, dataset_size: int) -> str:
    header = (f"{'workers':>8}{'nodes':>7}{'batch/worker':>14}{'compute ms':>12}{'all-reduce ms':>15}"
              f"{'exposed ms':>12}{'step ms':>10}{'images/s':>12}{'efficiency':>12}{'time to train':>15}")
    lines = [header]
    for r in rows:
        lines.append(f"{r.workers:>8}{r.nodes:>7}{r.per_worker_batch:>14g}{1e3 * r.compute_s:>12.2f}"
                     f"{1e3 * r.comm_s:>15.2f}{1e3 * r.exposed_comm_s:>12.2f}{1e3 * r.step_s:>10.2f}"
                     f"{r.images_per_s:>12,.0f}{100 * r.efficiency:>11.1f}%"
                     f"{format_duration(r.time_to_train(epochs, dataset_size)):>15}")
    return "\n".join(lines)


def published_report() -> dict[str, Any]:
    """Print the published runs, predicted against published, then each run's parameters and sources."""
    runs = load_published()
    print(f"{'run':<14}{'GPUs':>6}{'algorithm':>14}{'predicted':>11}{'published':>11}{'diff (pp)':>11}"
          f"{'pred. images/s':>16}{'publ. images/s':>16}")
    report = []
    for run in runs:
        p = run.predict()
        published_rate = run.get("images_per_s")
        print(f"{run.key:<14}{run['workers']:>6}{run['algorithm']:>14}{100 * p.efficiency:>10.1f}%"
              f"{100 * run['efficiency']:>10.1f}%{100 * run.error():>+11.1f}{p.images_per_s:>16,.0f}"
              f"{f'{published_rate:,.0f}' if published_rate else '-':>16}")
        report.append({"key": run.key, "title": run.title, "prediction": asdict(p),
                       "published_efficiency": run["efficiency"], "error": run.error(),
                       "within_tolerance": abs(run.error()) <= TOLERANCE,
                       "values": {k: asdict(v) for k, v in run.values.items()}})
    print(f"(efficiency from each paper's baseline GPU count; tolerance ±{100 * TOLERANCE:.0f} points; "
          f"backward = {100 * BACKWARD_FRACTION:.0f}% of compute in all runs)")
    for run in runs:
        print(f"\n{run.key}: {run.title}")
        width = max(map(len, run.values))
        for name, sourced in run.values.items():
            print(f"  {name:<{width}} = {sourced.value!s:<22} {sourced.source}")
    return {"published": report}
