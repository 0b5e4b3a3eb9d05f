"""Command-line entry points: `largebatch train | eval | recipes`.

Options of the form `--section.field VALUE` (or `--section.field=VALUE`) override the recipe;
everything is validated into a Config before a process group, a run directory or a dataset is touched.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from largebatch import recipes
from largebatch.config import Config, ConfigError, apply_overrides, config_from_dict, parse_override_value, plan_batches
from largebatch.run_dir import CONFIG_NAME, check_new_run_dir, create_run_dir, require_run, resolve_run_dir

EPILOG = ("Any field of the recipe can be overridden as --section.field VALUE, e.g. --data.global_batch 4096 "
          "--optim.base_lr 0.2 --schedule.milestones 30,60,80. Sections: data, model, optim, schedule, dist, run. "
          "Run under torchrun for several processes or machines: torchrun --nproc-per-node 2 -m largebatch train ...")


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


def resolve_config(recipe: str, overrides: dict[str, Any], resume_dir: Path | None = None) -> Config:
    """Recipe (or a resumed run's saved config) + overrides -> a validated Config."""
    if resume_dir is not None:
        name, tree = recipes.load(str(resume_dir / CONFIG_NAME))
    else:
        name, tree = recipes.load(recipe)
    return config_from_dict(apply_overrides(tree, overrides), recipe=name)


def launched_world_size() -> int:
    """World size as torchrun announces it (1 without torchrun), read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def check_data_path(cfg: Config) -> None:
    """The dataset must exist before any process group starts or any run directory is made."""
    if cfg.data.path and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path = {cfg.data.path!r} does not exist")


def cmd_train(args: argparse.Namespace, extra: Sequence[str]) -> int:
    resume_dir = Path(args.resume) if args.resume else None
    if resume_dir is not None:
        if args.overwrite:
            raise ConfigError("--resume and --overwrite exclude each other")
        require_run(resume_dir)
    cfg = resolve_config(args.recipe, parse_overrides(extra), resume_dir)
    plan_batches(cfg.data, launched_world_size())
    check_data_path(cfg)
    run_dir = resume_dir or resolve_run_dir(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if is_main and resume_dir is None:
        check_new_run_dir(run_dir, overwrite=args.overwrite)
        create_run_dir(run_dir, cfg, overwrite=args.overwrite)
    from largebatch.train import train

    result = train(cfg, run_dir, resume=resume_dir is not None)
    if is_main:
        if result.test is not None:
            print(f"final test accuracy: {100 * result.test.accuracy:.2f}% (loss {result.test.loss:.4f}, "
                  f"{result.test.samples} samples) after {result.epochs} epochs, {result.steps} steps, "
                  f"{result.wall_s:.1f} s on {launched_world_size()} process(es)")
        if result.time_to_accuracy_s is not None:
            print(f"time to {100 * cfg.run.target_accuracy:.1f}% accuracy: {result.time_to_accuracy_s:.1f} s")
        print(f"run directory: {run_dir}")
    return 0


def cmd_eval(args: argparse.Namespace, extra: Sequence[str]) -> int:
    from largebatch.checkpoint import CHECKPOINT_NAME
    from largebatch.evaluate import evaluate_checkpoint

    run_dir = Path(args.run_dir)
    require_run(run_dir)
    cfg = resolve_config("", parse_overrides(extra), run_dir)
    check_data_path(cfg)
    result = evaluate_checkpoint(cfg, Path(args.checkpoint) if args.checkpoint else run_dir / CHECKPOINT_NAME)
    if result is not None:
        print(f"test accuracy: {100 * result.accuracy:.2f}%  loss {result.loss:.4f}  samples {result.samples}")
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
    train = commands.add_parser("train", help="train a model from a recipe", epilog=EPILOG)
    train.add_argument("--recipe", default=recipes.DEFAULT_RECIPE,
                       help=f"recipe name (see `largebatch recipes`) or path to a TOML file; default "
                            f"{recipes.DEFAULT_RECIPE}")
    train.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint "
                       "(its saved config, plus any overrides)")
    train.add_argument("--overwrite", action="store_true", help="replace an existing run directory")
    train.set_defaults(func=cmd_train)
    evaluate = commands.add_parser("eval", help="evaluate a run's checkpoint on its test set", epilog=EPILOG)
    evaluate.add_argument("run_dir", help="a run directory (holds config.toml and checkpoint.pt)")
    evaluate.add_argument("--checkpoint", help="a checkpoint other than RUN_DIR/checkpoint.pt")
    evaluate.set_defaults(func=cmd_eval)
    listing = commands.add_parser("recipes", help="list the built-in recipes, one line each")
    listing.set_defaults(func=cmd_recipes)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from largebatch.errors import USER_ERRORS

    try:
        return args.func(args, extra)
    except USER_ERRORS as e:
        print(f"largebatch {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
