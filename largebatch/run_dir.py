"""The run directory: where a run's resolved config, metrics, TensorBoard events and checkpoint go.

An existing directory is never written into by accident: a new run refuses it unless told to
`overwrite` (which empties it) or to `resume` (which continues from its checkpoint). A resume that
changes the config (say `--schedule.epochs 20`) rewrites `config.toml`, so the next resume continues
the same run, and keeps the earlier version beside it as `config.N.toml`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import tomli_w

from largebatch.config import Config, ConfigError, config_to_dict

CONFIG_NAME = "config.toml"


def default_run_name(cfg: Config) -> str:
    return f"{Path(cfg.recipe).stem}-{time.strftime('%Y%m%d-%H%M%S')}"


def resolve_run_dir(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / (cfg.run.name or default_run_name(cfg))


def require_run(run_dir: Path) -> None:
    """An earlier run's directory is needed (to resume or evaluate it)."""
    if not (run_dir / CONFIG_NAME).is_file():
        raise ConfigError(f"{run_dir} holds no {CONFIG_NAME} of an earlier run")


def check_new_run_dir(run_dir: Path, *, overwrite: bool) -> None:
    """Refuse to start a new run where it would clobber an earlier one. Writes nothing."""
    if run_dir.exists() and any(run_dir.iterdir()) and not overwrite:
        raise ConfigError(f"run directory {run_dir} already exists: pass --resume to continue it, "
                          "--overwrite to replace it, or choose another --run.name")


def to_toml(cfg: Config) -> str:
    return tomli_w.dumps(config_to_dict(cfg))


def create_run_dir(run_dir: Path, cfg: Config, *, overwrite: bool) -> None:
    """Make (or empty, with `overwrite`) the run directory and write the resolved config into it."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / CONFIG_NAME, to_toml(cfg))


def update_run_config(run_dir: Path, cfg: Config) -> Path | None:
    """Make `cfg` the run's config; if it differs from the saved one, the saved one is kept as
    config.N.toml (N = 0, 1, ...) and that path returned. Returns None when nothing changed."""
    current = run_dir / CONFIG_NAME
    if tomllib.loads(current.read_text(encoding="utf-8")) == config_to_dict(cfg):
        return None
    n = 0
    while (kept := run_dir / f"config.{n}.toml").exists():
        n += 1
    shutil.copy2(current, kept)
    write_text_atomic(current, to_toml(cfg))
    return kept


def write_text_atomic(path: Path, text: str) -> None:
    """Replace the file at `path` with `text` so that a reader sees the old content or the new, never a part."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
