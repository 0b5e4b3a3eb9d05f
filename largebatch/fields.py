"""How a config field is declared: its one default, what is allowed, and a line of help.

The metadata written here is what the validator checks and what `largebatch train --help` prints,
so a field's rules live in one place. Torch-free: recipes validate and help prints without torch.
"""

from __future__ import annotations

from dataclasses import field
from typing import Any


def choice(default: str, choices: tuple[str, ...] | list[str], help: str = "") -> Any:
    """A field whose value must be one of `choices`."""
    return field(default=default, metadata={"choices": tuple(choices), "help": help})


def number(default: float | int, lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, help: str = "") -> Any:
    """A numeric field within [lo, hi] (an open end with lo_open / hi_open); None leaves a side unbounded."""
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": lo_open, "hi_open": hi_open,
                                            "help": help})


def plain(default: Any, help: str = "") -> Any:
    """A field checked for its type only (a bool, a string, a list)."""
    return field(default=default, metadata={"help": help})


def allowed(metadata: Any) -> str:
    """What a field allows, in words, for help and error messages ('' when only the type is checked)."""
    if metadata.get("choices"):
        return ", ".join(metadata["choices"])
    lo, hi = metadata.get("min"), metadata.get("max")
    if lo is None and hi is None:
        return ""
    left = "" if lo is None else (f"> {lo}" if metadata.get("lo_open") else f">= {lo}")
    right = "" if hi is None else (f"< {hi}" if metadata.get("hi_open") else f"<= {hi}")
    return " and ".join(p for p in (left, right) if p)
