"""How many intra-op threads each process of a node may use. torch starts every process with as many
threads as the machine has cores, so k processes on one node ask for k times the cores and all of them
slow down (10-25x with 2 processes on 2 cores, measured). torchrun sets OMP_NUM_THREADS=1 when it
starts several processes; a launch that does not (or that sets it too high) is capped here."""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    note: str  # '' when nothing needs saying


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, which containers and taskset narrow)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def choose_threads(requested: int, current: int, local_world_size: int, cores: int) -> ThreadChoice:
    """`requested` (run.threads; 0: torch's `current` count) threads per process, unless `local_world_size`
    processes with `current` threads each would oversubscribe `cores`: then cores // processes (at least 1).
    A request is honoured, with a warning when it oversubscribes."""
    if requested:
        note = (f"warning: run.threads = {requested} with {local_world_size} processes on this node asks for "
                f"{requested * local_world_size} threads on {cores} cores; expect every process to slow down"
                if requested * local_world_size > cores else "")
        return ThreadChoice(requested, note)
    capped = max(1, cores // local_world_size)
    if current * local_world_size <= cores or capped >= current:  # fits, or one thread each already
        return ThreadChoice(current, "")
    return ThreadChoice(capped, f"note: torch threads per process capped from {current} to {capped}: "
                                f"{local_world_size} processes on this node share {cores} cores (set run.threads "
                                "to choose)")
