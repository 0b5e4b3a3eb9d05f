"""Recipes are data: TOML files in this folder, named by their stem; a path to any TOML also works.

A recipe's first comment line is its one-line description (shown by `largebatch recipes`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from largebatch.config import ConfigError, load_toml

RECIPE_DIR = Path(__file__).parent
DEFAULT_RECIPE = "fmnist_fast"
"""What `largebatch train` runs without --recipe: the quickest way to the embedded data set's accuracy here."""
SGD_RECIPE = "fmnist_goyal"
"""Plain data-parallel SGD (Goyal et al. 2017): the default of what measures SGD's gradients and their
all-reduce (`largebatch gns`, `largebatch bench comm`), which a preconditioner would only obscure."""


def available() -> dict[str, str]:
    """Recipe name -> one-line description, sorted by name."""
    return {path.stem: describe(path) for path in sorted(RECIPE_DIR.glob("*.toml"))}


def describe(path: Path) -> str:
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
    return ""


def locate_toml(name_or_path: str, directory: Path, what: str) -> Path:
    """The TOML file `name_or_path` names: one shipped in `directory` by its stem, or a path (anything
    ending in .toml or holding a '/'); a missing one is a ConfigError listing the shipped `what`s."""
    if name_or_path.endswith(".toml") or "/" in name_or_path:
        path = Path(name_or_path)
        if not path.is_file():
            raise ConfigError(f"{what} file {path} does not exist")
        return path
    path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        shipped = ", ".join(p.stem for p in sorted(directory.glob("*.toml")))
        raise ConfigError(f"unknown {what} {name_or_path!r}: the shipped {what}s are {shipped} (or give the path of "
                          "a .toml file)")
    return path


def locate(name_or_path: str) -> Path:
    """The TOML file of a recipe name, or the given path if it names a file."""
    return locate_toml(name_or_path, RECIPE_DIR, "recipe")


def load(name_or_path: str) -> tuple[str, dict[str, Any]]:
    """(recipe name, parsed TOML tree); a run's saved config keeps the name of the recipe it came from."""
    path = locate(name_or_path)
    tree = load_toml(path)
    return tree.pop("recipe", path.stem), tree
