"""The run directory: where a run's resolved config, metrics, TensorBoard events and checkpoint go.

An existing directory is never written into by accident: a new run refuses it unless told to
`overwrite` (which empties it) or to `resume` (which continues from its checkpoint).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

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


def create_run_dir(run_dir: Path, cfg: Config, *, overwrite: bool) -> None:
    """Make (or empty, with `overwrite`) the run directory and write the resolved config into it."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_NAME).write_text(to_toml(config_to_dict(cfg)), encoding="utf-8")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def to_toml(tree: dict[str, Any]) -> str:
    """Write a config tree (top-level scalars, then one table per section) as TOML."""
    top = [f"{k} = {_toml_value(v)}" for k, v in tree.items() if not isinstance(v, dict)]
    tables = [f"\n[{name}]\n" + "\n".join(f"{k} = {_toml_value(v)}" for k, v in values.items())
              for name, values in tree.items() if isinstance(values, dict)]
    return "\n".join(top) + "\n" + "\n".join(tables) + "\n"
