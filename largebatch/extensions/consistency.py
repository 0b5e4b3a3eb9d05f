"""A guard against ranks that silently diverge (a bit flip, a non-deterministic kernel, a rank that
skipped an update): every `dist.check_every` steps all ranks compare fingerprints of their
parameters and the run stops, naming the first differing tensor and the ranks, at the first
mismatch. BN running statistics are rank-local between DDP's broadcasts, so they are not compared.
"""

from __future__ import annotations

from largebatch.errors import RanksDivergedError
from largebatch.extensions import Extension
from largebatch.fingerprint import fingerprints


class RankConsistencyCheck(Extension):
    name = "consistency_check"

    def __init__(self, every: int):
        self.every = every

    def after_step(self, step: int, applied: bool) -> None:
        if (step + 1) % self.every:
            return
        names, params = zip(*self.ctx.model.named_parameters())
        prints = self.ctx.collectives.all_gather_objects(fingerprints(params))
        differing = [rank for rank, p in enumerate(prints) if p != prints[0]]
        if differing:
            first = next(i for i, pair in enumerate(prints[differing[0]]) if pair != prints[0][i])
            raise RanksDivergedError(f"after step {step + 1} the ranks no longer hold the same parameters: rank(s) "
                                     f"{differing} differ from rank 0, first in {names[first]!r} (checked every "
                                     f"{self.every} steps, dist.check_every)")
