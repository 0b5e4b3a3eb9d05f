"""Checking every image of a folder data set before the first step, so that a bad file stops the run
at once, named with all the others, instead of when the sampler first reaches it (hours into an
ImageNet run). Each image's header and structure are checked by PIL without a full decode, on a
pool of threads; under several processes each rank checks its own share and the lists are joined.
The findings are kept with a signature of the files (paths, sizes, modification times), so a resumed
run whose files have not changed reads them instead of checking again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

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


CHECK_NAME = "image_check.json"  # the findings, kept in the run directory


def files_signature(paths: Sequence[str]) -> str:
    """A digest of every file's path, size and modification time: it changes when any file does."""
    digest = hashlib.sha256()
    for path in paths:
        stat = os.stat(path)
        digest.update(f"{path}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def check_with_record(paths: Sequence[str], check: Callable[[Sequence[str]], list[tuple[str, str]]],
                      record_file: Path | None) -> tuple[list[tuple[str, str]], dict]:
    """(unreadable images, the record to keep): from `record_file` when it was made for these very files,
    else from `check`."""
    signature = files_signature(paths)
    if record_file is not None and Path(record_file).is_file():
        record = json.loads(Path(record_file).read_text(encoding="utf-8"))
        if record.get("signature") == signature:
            return [tuple(found) for found in record["unreadable"]], record
    bad = check(paths)
    return bad, {"signature": signature, "images": len(paths), "unreadable": bad}
