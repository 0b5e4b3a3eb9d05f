"""Command-line entry points: `largebatch train | gns | eval | config | recipes` (and plan, prepare, bench, report,
sweep).

Options of the form `--section.field VALUE` (or `--section.field=VALUE`, `--optim.lars.mode VALUE`)
override the recipe; everything is validated into a Config before a process group, a run directory
or a dataset is touched. Listing recipes, printing a config and every --help run without torch.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from largebatch import recipes
from largebatch.api import (check_data_path, is_main_process, launched_world_size, load_config, load_for_auto_resume,
                            run)
from largebatch.bench.command import add_bench_command
from largebatch.config import ConfigError, describe_fields, parse_override_value, plan_batches
from largebatch.errors import RankLostError, RanksDivergedError, RunInterrupted, UserError
from largebatch.plan import peak_lr, phase_batches
from largebatch.prepare_command import add_prepare_command
from largebatch.report import add_report_command
from largebatch.run_dir import to_toml
from largebatch.scaling.cli import add_plan_command
from largebatch.sweep.command import add_sweep_command

USAGE_NOTE = ("Any field of the recipe can be overridden as --section.field VALUE (lists as 30,60,80), e.g. "
              "--data.global_batch 4096 --optim.base_lr 0.2 --optim.lars.trust_coefficient 0.002. "
              "Run under torchrun for several processes or machines: "
              "torchrun --nproc-per-node 2 -m largebatch train ...")


def parse_overrides(extra: Sequence[str]) -> dict[str, Any]:
    """`--a.b VALUE` / `--a.b=VALUE` pairs -> {'a.b': value}, each value typed by its field."""
    overrides: dict[str, Any] = {}
    items = list(extra)
    while items:
        token = items.pop(0)
        if not token.startswith("--") or "." not in token:
            raise ConfigError(f"unexpected argument {token!r}: overrides look like --section.field VALUE")
        key, has_value, text = token[2:].partition("=")
        if not has_value:
            if not items:
                raise ConfigError(f"--{key} needs a value")
            text = items.pop(0)
        overrides[key] = parse_override_value(key, text)
    return overrides


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if args.resume and args.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other")
    overrides = parse_overrides(extra)
    if args.resume == "auto":
        cfg, run_dir, resume = load_for_auto_resume(args.recipe, overrides)
        result = run(cfg, run_dir, resume=resume, overwrite=not resume)
    else:
        cfg = load_config(args.recipe, overrides, resume_dir=args.resume)
        result = run(cfg, args.resume, resume=args.resume is not None, overwrite=args.overwrite)
    if not is_main_process():
        return 0
    if result.resumed_from is not None:
        print(f"resumed from {result.resumed_from}")
    if result.already_finished:
        print(f"the run in {result.run_dir} is already finished ({result.steps} steps, {result.epochs} epochs); "
              "nothing was trained or written. To train longer, resume with a larger --schedule.epochs")
        return 0
    if result.stopped_by:
        saved = f"checkpoint {result.checkpoint}" if result.checkpoint else "no checkpoint (run.checkpoint = false)"
        print(f"stopped by {result.stopped_by} after step {result.steps}: {saved}; continue with "
              f"`largebatch train --resume {result.run_dir}`")
        return 128 + signal.Signals[result.stopped_by].value
    if result.test is not None:
        print(f"final test accuracy: {100 * result.test.accuracy:.2f}% (loss {result.test.loss:.4f}, "
              f"{result.test.samples} samples) after {result.epochs} epochs, {result.steps} steps, "
              f"{result.wall_s:.1f} s on {launched_world_size()} process(es)")
    if result.skipped_steps:
        print(f"warning: {result.skipped_steps} of {result.steps} steps were skipped for a non-finite loss "
              f"(run.on_nonfinite = 'skip'); see the 'skip' records in metrics.jsonl")
    if result.time_to_accuracy_s is not None:
        print(f"time to {100 * cfg.run.target_accuracy:.1f}% accuracy: {result.time_to_accuracy_s:.1f} s")
    print(f"run directory: {result.run_dir}")
    return 0


def cmd_gns(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """Train the recipe briefly with the noise-scale extension and print B_simple, the critical-batch estimate."""
    from largebatch.metrics import read_metrics

    overrides = parse_overrides(extra)
    cfg = load_config(args.recipe, overrides)
    micro_batch = overrides.get("data.micro_batch") or micro_batch_for_noise_scale(cfg)
    cfg = load_config(args.recipe, {"run.noise_scale": True, "run.max_steps": args.steps, "run.checkpoint": False,
                                    "run.name": cfg.run.name or f"gns-{cfg.recipe}-{time.strftime('%Y%m%d-%H%M%S')}",
                                    "run.log_every": max(1, min(cfg.run.log_every, args.steps // 20))}
                      | overrides | {"data.micro_batch": micro_batch})
    result = run(cfg)
    if not is_main_process():
        return 0
    records = [r for r in read_metrics(result.run_dir) if r["kind"] == "train" and "gns_b_simple" in r]
    if not records:
        raise ConfigError(f"no step was logged in {args.steps} steps: give more --steps")
    b = plan_batches(cfg.data, launched_world_size())
    print(f"gradient noise scale of {cfg.recipe} (small batch {b.micro_batch}, big batch {b.global_batch}; moving "
          f"average over ~{1 / (1 - cfg.run.noise_scale_decay):.0f} steps)")
    print(f"{'step':>7} {'epoch':>7} {'lr':>9} {'loss':>8} {'|G|^2':>10} {'tr(S)':>10} {'B_simple':>9}")
    shown = records[::max(1, len(records) // 10)]
    for r in shown if shown[-1] is records[-1] else [*shown, records[-1]]:
        print(f"{r['step']:>7} {r['epoch']:>7.2f} {r['lr']:>9.4g} {r['loss']:>8.4f} {r['gns_grad_sq']:>10.4g} "
              f"{r['gns_trace']:>10.4g} {r['gns_b_simple']:>9.0f}")
    estimate = records[-1]["gns_b_simple"]
    print(f"critical batch estimate B_simple ~ {estimate:.0f} after {records[-1]['step']} steps; the recipe's global "
          f"batch is {b.global_batch} ({b.global_batch / estimate:.2g}x). Below B_simple, doubling the batch nearly "
          "halves the steps to a given loss; well above it, extra samples per step buy few steps (McCandlish et al. "
          "2018). B_simple usually grows as training goes on.")
    print(f"run directory: {result.run_dir}")
    return 0


def micro_batch_for_noise_scale(cfg) -> int:
    """The configured micro-batch, or, when one process would take the whole per-worker batch in one pass, the
    largest smaller one that divides it (a multiple of the BN batch): the estimate needs two micro-batches."""
    b = plan_batches(cfg.data, launched_world_size())
    if b.world_size * b.accum_steps >= 2:
        return b.micro_batch
    multiple = cfg.data.bn_batch if 0 < cfg.data.bn_batch < b.per_worker else 1
    smaller = [m for m in range(b.per_worker // 2, 0, -1) if b.per_worker % m == 0 and m % multiple == 0]
    return smaller[0] if smaller else b.micro_batch


def cmd_eval(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from largebatch.checkpoint import load_checkpoint, load_latest
    from largebatch.evaluate import evaluate_checkpoint

    cfg = load_config(overrides=parse_overrides(extra), resume_dir=args.run_dir)
    check_data_path(cfg)
    if args.checkpoint:
        path, state = Path(args.checkpoint), load_checkpoint(Path(args.checkpoint))
    else:
        path, state, passed_over = load_latest(Path(args.run_dir))
        for line in passed_over:
            print(f"largebatch: warning: {line}; using an older checkpoint", file=sys.stderr)
    print(f"checkpoint {path} (step {state['progress']['step']})")
    result = evaluate_checkpoint(cfg, state["model"])
    if result is not None:
        print(f"test accuracy: {100 * result.accuracy:.2f}%  loss {result.loss:.4f}  samples {result.samples}")
    return 0


def cmd_config(args: argparse.Namespace, extra: Sequence[str]) -> int:
    """The resolved config as TOML, then the derived batch plan and peak lr as TOML comments."""
    cfg = load_config(args.recipe, parse_overrides(extra), resume_dir=args.resume)
    world = args.world_size or launched_world_size()
    b = plan_batches(cfg.data, world)
    o = cfg.optim
    print(to_toml(cfg), end="")
    print(f"\n# derived for {world} process(es):\n"
          f"# global batch {b.global_batch} = {world} workers x {b.accum_steps} micro-batches x {b.micro_batch} "
          f"samples; BN statistics over groups of {b.bn_batch}"
          f"{' (ghost BN)' if b.ghost_bn_batch else ''}\n"
          f"# peak lr {peak_lr(cfg):.6g} = base_lr {o.base_lr:g} for {o.ref_batch}, {o.scaling} scaling to "
          f"{b.global_batch}; warmup {cfg.schedule.warmup_epochs:g} epochs ({cfg.schedule.warmup_mode}) from "
          f"{o.base_lr if cfg.schedule.warmup_from == 'base_lr' else 0:g}")
    for epoch, r in zip(cfg.schedule.batch_ramp_epochs, phase_batches(cfg, world)[1:]):
        print(f"# batch ramp: from epoch {epoch}, global batch {r.global_batch} = {world} workers x {r.accum_steps} "
              f"micro-batches x {r.micro_batch} samples; lr {cfg.schedule.batch_ramp_lr}")
    return 0


def cmd_recipes(args: argparse.Namespace, extra: Sequence[str]) -> int:
    if extra:
        raise ConfigError(f"unexpected arguments {' '.join(extra)}")
    entries = recipes.available()
    width = max(map(len, entries))
    for name, description in entries.items():
        marker = " (default)" if name == recipes.DEFAULT_RECIPE else ""
        print(f"{name:<{width}}  {description}{marker}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="largebatch", description="Large-mini-batch synchronous SGD for image "
                                     "classifiers (Goyal et al. 2017 and successors).")
    commands = parser.add_subparsers(dest="command", required=True)
    fields_help = f"{USAGE_NOTE}\n\nfields (default, [allowed], meaning):\n{describe_fields()}"
    recipe_help = (f"recipe name (see `largebatch recipes`) or path to a TOML file; default "
                   f"{recipes.DEFAULT_RECIPE}")

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help, epilog=fields_help,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        sub.set_defaults(func=func)
        return sub

    train = command("train", "train a model from a recipe", cmd_train)
    train.add_argument("--recipe", default=recipes.DEFAULT_RECIPE, help=recipe_help)
    train.add_argument("--resume", metavar="RUN_DIR|auto", help="continue the run in RUN_DIR from its newest "
                       "checkpoint (its saved config, plus any overrides, which become the run's config); 'auto': "
                       "resume run.out_dir/run.name if it holds a checkpoint, else start it (for torchrun "
                       "--max-restarts)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    gns = command("gns", "train a recipe briefly and print its gradient noise scale B_simple (the critical batch "
                  "estimate of McCandlish et al. 2018)", cmd_gns)
    gns.add_argument("--recipe", default=recipes.SGD_RECIPE,
                     help=f"recipe name (see `largebatch recipes`) or path to a TOML file; default {recipes.SGD_RECIPE}")
    gns.add_argument("--steps", type=int, default=100, help="optimizer steps to train (default 100)")
    evaluate = command("eval", "evaluate a run's checkpoint on its test set", cmd_eval)
    evaluate.add_argument("run_dir", help="a run directory (holds config.toml and checkpoints)")
    evaluate.add_argument("--checkpoint", help="a checkpoint other than the run's newest")
    add_bench_command(commands)
    config = command("config", "print the resolved config (TOML) with the derived batch plan and peak lr", cmd_config)
    config.add_argument("--recipe", default=recipes.DEFAULT_RECIPE, help=recipe_help)
    config.add_argument("--resume", metavar="RUN_DIR", help="start from the config of the run in RUN_DIR")
    config.add_argument("--world-size", type=int, default=0, help="processes to plan for (default: torchrun's "
                        "WORLD_SIZE, else 1)")
    listing = commands.add_parser("recipes", help="list the built-in recipes, one line each")
    listing.set_defaults(func=cmd_recipes)
    add_plan_command(commands)
    add_prepare_command(commands)
    add_report_command(commands)
    add_sweep_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    try:
        return args.func(args, extra)
    except UserError as e:
        print(f"largebatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (RankLostError, RanksDivergedError) as e:
        print(f"largebatch {args.command}: error: {e}", file=sys.stderr)
        return 1
    except RunInterrupted as e:
        print(f"largebatch {args.command}: interrupted (a second Ctrl-C): {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print(f"largebatch {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
