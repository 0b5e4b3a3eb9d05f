"""Which rank died, and why. When a process of the job dies, the others only see a broken
connection; this names the lost rank and its cause in one line.

Every rank publishes where it runs (host, pid) once at start. A rank whose training raises records
the error in torchrun's store before its process group goes away. A rank whose collective then
breaks reads those records and looks at the pids of the ranks on its own host: a record names the
error, a vanished pid without one means the process was killed. The line is left in the store, where
torchrun's next attempt (after --max-restarts) reads it to say why it restarted.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from largebatch.dist.env import DistEnv, all_gather_objects, attempt_prefix

KILLED = ("its process ended without recording an error: killed by a signal (SIGKILL, the out-of-memory killer, "
          "a lost node) or crashed in native code")


@dataclass(frozen=True)
class Peer:
    rank: int
    host: str
    pid: int

    def __str__(self) -> str:
        return f"rank {self.rank} (pid {self.pid} on {self.host})"


def is_lost_peer_error(error: BaseException) -> bool:
    """Whether a collective failed because a peer process went away (gloo / NCCL transport errors)."""
    text = str(error)
    return isinstance(error, dist.DistError) or isinstance(error, RuntimeError) and any(
        marker in text for marker in ("Connection reset", "Connection closed", "Broken pipe", "Connection refused",
                                      "gloo", "NCCL"))


class PeerWatch:
    """This rank's view of the others, for naming the one that died (a no-op at world size 1)."""

    def __init__(self, env: DistEnv, peers: list[Peer]):
        self.env, self.peers = env, peers

    @classmethod
    def start(cls, env: DistEnv) -> PeerWatch:
        """Every rank's host and pid, gathered once (the job's first collective)."""
        mine = (socket.gethostname(), os.getpid())
        return cls(env, [Peer(rank, host, pid) for rank, (host, pid) in enumerate(all_gather_objects(mine, env))])

    def record_failure(self, step: int | None, error: BaseException) -> None:
        """Leave this rank's error where the others can read it (best effort: the store may be gone);
        `step` counts the steps completed, so the failing one is step + 1 (as metrics.jsonl numbers it)."""
        if self.env.store is None:
            return
        first_line = (str(error).strip().splitlines() or [""])[0][:300]
        at = f" in step {step + 1}" if step is not None else " before training started"
        try:
            self.env.store.set(f"failed/{self.env.rank}", f"failed{at}: {type(error).__name__}: {first_line}")
        except (RuntimeError, OSError):
            pass

    def diagnose(self, wait_s: float = 3.0) -> str:
        """One line naming the rank that died and why, after a collective broke. Waits up to `wait_s`
        for a record or a vanished process to appear, then names what it can."""
        host = socket.gethostname()
        others = [p for p in self.peers if p.rank != self.env.rank]
        deadline = time.monotonic() + wait_s
        while True:
            # A failing rank records before it exits, so a pid seen gone first has written its record if any.
            gone = [p for p in others if p.host == host and not _alive(p.pid)]
            for peer in others:
                record = self._read(f"failed/{peer.rank}")
                if record is not None:
                    return f"{peer} {record}"
            if gone:
                return f"{gone[0]} died: {KILLED}"
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
        remote = [p.rank for p in others if p.host != host]
        if remote:
            return (f"a rank on another host stopped answering (ranks {remote} run elsewhere; none recorded an "
                    "error): its process or node was lost")
        return "another rank stopped answering, though every process on this host is still running"

    def leave_for_restart(self, line: str) -> None:
        """Keep `line` in the store for torchrun's next attempt (see `previous_attempt_loss`)."""
        if self.env.store is not None:
            try:
                self.env.store.set("lost", line)
            except (RuntimeError, OSError):
                pass

    def _read(self, key: str) -> str | None:
        store = self.env.store
        try:
            return store.get(key).decode() if store is not None and store.check([key]) else None
        except (RuntimeError, OSError):
            return None


def previous_attempt_loss(env: DistEnv) -> str | None:
    """Why torchrun's previous attempt of this job ended, as its surviving ranks recorded it (None in a
    first attempt, outside torchrun, or when no survivor could record it)."""
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt == 0 or not isinstance(env.store, dist.PrefixStore):
        return None
    previous = dist.PrefixStore(attempt_prefix(attempt - 1), env.store.underlying_store)
    try:
        return previous.get("lost").decode() if previous.check(["lost"]) else None
    except (RuntimeError, OSError):
        return None


def _alive(pid: int) -> bool:
    """Whether process `pid` on this host still runs (a zombie, killed but not yet reaped, does not)."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            return stat.read_text().rpartition(")")[2].split()[0] not in ("Z", "X")
        except (FileNotFoundError, ProcessLookupError, IndexError):
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

