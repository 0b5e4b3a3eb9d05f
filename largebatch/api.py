"""The Python API: the one way to run a config, used by the command line, the benchmarks and scripts.

    import largebatch
    cfg = largebatch.load_config("fmnist_goyal", {"data.global_batch": 4096, "schedule.epochs": 12})
    result = largebatch.run(cfg)
    print(result.test.accuracy, result.run_dir)

Everything here checks the input before a process group, a run directory or a dataset is touched,
and reports bad input as a `largebatch.errors.UserError`. Importing this module does not import torch.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from largebatch import recipes
from largebatch.config import Config, ConfigError, apply_overrides, config_from_dict
from largebatch.gns import needs_micro_batches
from largebatch.plan import phase_batches
from largebatch.run_dir import (CONFIG_NAME, check_new_run_dir, create_run_dir, require_run, resolve_run_dir,
                                update_run_config)

if TYPE_CHECKING:
    from largebatch.extensions import Extension
    from largebatch.train import TrainResult


def load_config(recipe: str = recipes.DEFAULT_RECIPE, overrides: Mapping[str, Any] | None = None,
                resume_dir: str | Path | None = None) -> Config:
    """A validated Config: a recipe (a name from `largebatch recipes` or a TOML path) or, with
    `resume_dir`, that run's saved config, then `overrides` such as {"optim.base_lr": 0.2}."""
    if resume_dir is not None:
        require_run(Path(resume_dir))
        name, tree = recipes.load(str(Path(resume_dir) / CONFIG_NAME))
    else:
        name, tree = recipes.load(recipe)
    return config_from_dict(apply_overrides(tree, overrides or {}), recipe=name)


def load_for_auto_resume(recipe: str = recipes.DEFAULT_RECIPE,
                         overrides: Mapping[str, Any] | None = None) -> tuple[Config, Path, bool]:
    """For a run that may be a restart of itself (`--resume auto`, torchrun --max-restarts): the run
    directory run.out_dir/run.name holds a checkpoint → (its saved config + overrides, the
    directory, True); otherwise → (recipe + overrides, the directory, False), and a directory there
    holds no more than an attempt that died before its first checkpoint, to be replaced."""
    from largebatch.checkpoint import checkpoints_in

    fresh = load_config(recipe, overrides)
    if not fresh.run.name:
        raise ConfigError("--resume auto needs a fixed run directory: give --run.name (and --run.out_dir)")
    if not fresh.run.checkpoint:
        raise ConfigError("--resume auto needs run.checkpoint = true: it resumes from the newest checkpoint")
    run_dir = resolve_run_dir(fresh)
    if checkpoints_in(run_dir):
        return load_config(overrides=overrides, resume_dir=run_dir), run_dir, True
    return fresh, run_dir, False


def launched_world_size() -> int:
    """World size as torchrun announces it (1 without torchrun), read without importing torch."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def check_data_path(cfg: Config) -> None:
    """The dataset must exist before any process group starts or any run directory is made."""
    if cfg.data.path and not Path(cfg.data.path).exists():
        raise ConfigError(f"data.path = {cfg.data.path!r} does not exist")


def check_launch(cfg: Config, world_size: int) -> None:
    """What `run` checks of a config before anything starts, but for the device: every global batch the
    run may train splits over `world_size` processes (with two micro-batches or more when the noise scale
    is measured), and the dataset exists. Torch-free, so a sweep checks all its runs up front with it."""
    for batches in phase_batches(cfg, world_size):
        if cfg.run.noise_scale:
            needs_micro_batches(batches.world_size * batches.accum_steps)
    check_data_path(cfg)


def check_device(cfg: Config) -> None:
    """What the config asks of the device must be there, before any run directory is made."""
    import torch

    cuda = torch.cuda.is_available() and cfg.dist.device != "cpu"
    if cfg.dist.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("dist.device = 'cuda' but no CUDA device is visible; use 'auto' or 'cpu'")
    if cfg.run.precision == "fp16" and not cuda:
        raise ConfigError(f"run.precision = 'fp16' needs a GPU (fp16 with GradScaler), and dist.device = "
                          f"{cfg.dist.device!r} runs on the CPU here; use 'bf16' or 'fp32'")
    if cfg.dist.comm_hook.endswith("bf16") and (cfg.dist.backend == "gloo" or not cuda):
        raise ConfigError(f"dist.comm_hook = {cfg.dist.comm_hook!r} needs the nccl backend (gloo cannot all-reduce "
                          f"bfloat16); use {cfg.dist.comm_hook.replace('bf16', 'fp16')!r}")
    if (cfg.optim.preconditioner == "kfac" and cfg.kfac.factor_dtype == "bf16" and launched_world_size() > 1
            and (cfg.dist.backend == "gloo" or not cuda)):
        raise ConfigError("kfac.factor_dtype = 'bf16' with several processes needs the nccl backend (gloo cannot "
                          "all-reduce bfloat16); use 'fp16' or 'auto'")
    if cfg.dist.backend == "nccl" and not cuda:
        raise ConfigError(f"dist.backend = 'nccl' needs a GPU, and dist.device = {cfg.dist.device!r} runs on the "
                          "CPU here; use 'gloo' or 'auto'")
    if getattr(getattr(cfg.optim, cfg.optim.name), "impl", None) == "fused" and cuda:
        raise ConfigError(f"optim.{cfg.optim.name}.impl = 'fused' is a CPU kernel, and dist.device = "
                          f"{cfg.dist.device!r} trains on a GPU here; use 'foreach' or 'compiled'")


def run(cfg: Config, run_dir: str | Path | None = None, *, resume: bool = False, overwrite: bool = False,
        extensions: Sequence[Extension] = ()) -> TrainResult:
    """Check `cfg` against this launch, prepare the run directory and train; under torchrun, call it
    on every rank. `run_dir` defaults to run.out_dir/run.name (recipe + timestamp when unnamed). A new
    run refuses an existing directory unless `overwrite`; `resume` continues the run in `run_dir`
    from its checkpoint and makes `cfg` its config (the earlier one is kept as config.N.toml).
    `extensions` join the training step (`largebatch.extensions`)."""
    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other")
    if resume and run_dir is None:
        raise ConfigError("resume needs the run directory to continue")
    check_launch(cfg, launched_world_size())
    check_device(cfg)
    run_dir = Path(run_dir) if run_dir is not None else resolve_run_dir(cfg)
    if resume:
        require_run(run_dir)
    elif is_main_process():
        check_new_run_dir(run_dir, overwrite=overwrite)

    def prepare_run_dir() -> None:  # on rank 0, once the data and the model are built
        if resume:
            update_run_config(run_dir, cfg)
        else:
            create_run_dir(run_dir, cfg, overwrite=overwrite)

    from largebatch.checkpoint import checkpoints_in
    from largebatch.train import train

    try:
        return train(cfg, run_dir, resume=resume, extensions=extensions, prepare_run_dir=prepare_run_dir)
    except BaseException:
        # A new run that failed before its first checkpoint leaves nothing behind: the same command can
        # simply be run again. (A run that writes no checkpoints keeps its records of what happened.)
        if (not resume and cfg.run.checkpoint and is_main_process() and run_dir.is_dir()
                and not checkpoints_in(run_dir)):
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
