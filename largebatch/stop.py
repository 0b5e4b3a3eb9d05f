"""Stopping a run cleanly when asked: SIGTERM (a cluster scheduler's notice, or torchrun passing on
its own) or Ctrl-C. The step in progress finishes, every rank stops after the same step, a
checkpoint is written and the run says where, so `--resume` continues it exactly. A second Ctrl-C
stops at once."""

from __future__ import annotations

import signal
import threading
from types import FrameType

import torch

from largebatch.dist.env import Collectives

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Installs the handlers for its `with` block (in the main thread; elsewhere it never fires)."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # asked twice: stop now, without the checkpoint
        self.received = signum

    def agreed(self, collectives: Collectives) -> str | None:
        """The name of a signal any rank has received, or None; the same answer on every rank."""
        local = torch.tensor([self.received or 0], device=collectives.env.device)
        signum = int(collectives.all_reduce_max(local).item()) if collectives.world_size > 1 else int(local)
        return signal.Signals(signum).name if signum else None
