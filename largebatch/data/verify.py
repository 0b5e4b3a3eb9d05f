"""Checking every image of a folder data set before the first step, so that a bad file stops the run
at once, named with all the others, instead of when the sampler first reaches it (hours into an
ImageNet run). Each image's header and structure are checked by PIL without a full decode, on a
pool of threads; under several processes each rank checks its own share and the lists are joined.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from PIL import Image


def image_problem(path: str) -> str | None:
    """Why the image at `path` cannot be used, or None when PIL reads its header and structure."""
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as e:  # PIL raises many types for truncated, foreign or unreadable files
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'}"
    return None


def unreadable_images(paths: Sequence[str], rank: int = 0, world_size: int = 1,
                      gather: Callable[[list], list[list]] = lambda mine: [mine],
                      threads: int | None = None) -> list[tuple[str, str]]:
    """(path, reason) for every unreadable image among `paths`, sorted by path; this rank checks every
    world_size-th path from `rank`, and `gather` joins the ranks' findings (every rank gets all)."""
    share = list(paths[rank::world_size])
    with ThreadPoolExecutor(max_workers=threads or min(32, (os.cpu_count() or 1) * 4)) as pool:
        mine = [(p, why) for p, why in zip(share, pool.map(image_problem, share)) if why is not None]
    return sorted(found for part in gather(mine) for found in part)
