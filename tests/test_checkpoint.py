"""Checkpoint files: history by step, the link to the newest, and a process killed while it writes."""

from __future__ import annotations

import multiprocessing
import os
import random
import signal
import time

import pytest
import torch

from largebatch.checkpoint import (CHECKPOINT_NAME, checkpoints_in, load_checkpoint, load_latest, save_checkpoint,
                                   step_checkpoint_name)
from largebatch.errors import CheckpointError


def state(step: int) -> dict:
    # about 16 MB, so that a write takes long enough to be interrupted part-way
    return {"format": 1, "model": {"w": torch.full((4_000_000,), float(step))}, "progress": {"step": step}}


def save_forever(run_dir: str, ready) -> None:
    ready.set()
    step = 0
    while True:
        step += 1
        save_checkpoint(state(step), run_dir, step, keep=2)


def test_newest_link_history_and_pruning(tmp_path):
    for step in (3, 6, 9):
        save_checkpoint(state(step), tmp_path, step, keep=2)
    assert [p.name for p in checkpoints_in(tmp_path)] == [step_checkpoint_name(9), step_checkpoint_name(6)]
    assert (tmp_path / CHECKPOINT_NAME).resolve() == tmp_path / step_checkpoint_name(9)
    path, loaded, passed_over = load_latest(tmp_path)
    assert path.name == step_checkpoint_name(9) and loaded["progress"]["step"] == 9 and passed_over == []


def test_no_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="holds no checkpoint"):
        load_latest(tmp_path)


def test_killed_while_writing_the_newest_complete_checkpoint_still_loads(tmp_path):
    """20 trials: a process writing checkpoints in a loop is SIGKILLed at a random moment; every time,
    the newest checkpoint on disk loads, is complete, and no temporary file is taken for one."""
    context = multiprocessing.get_context("forkserver")  # a plain fork of this threaded process can deadlock
    context.set_forkserver_preload(["torch", "largebatch.checkpoint"])
    loaded_steps, mid_write = [], 0
    for trial in range(20):
        run_dir = tmp_path / f"trial{trial}"
        run_dir.mkdir()
        ready = context.Event()
        writer = context.Process(target=save_forever, args=(str(run_dir), ready))
        writer.start()
        ready.wait(10)
        time.sleep(random.uniform(0.05, 0.6))
        os.kill(writer.pid, signal.SIGKILL)
        writer.join()
        mid_write += any(run_dir.glob(".checkpoint-*.tmp"))  # the kill landed inside a write
        if not checkpoints_in(run_dir):
            continue  # killed before the first rename: nothing to load, nothing half-written either
        path, loaded, passed_over = load_latest(run_dir)
        step = loaded["progress"]["step"]
        assert passed_over == [] and path.name == step_checkpoint_name(step)
        assert torch.equal(loaded["model"]["w"], torch.full((4_000_000,), float(step)))
        loaded_steps.append(step)
    assert len(loaded_steps) >= 15 and mid_write >= 5  # most kills land after the first checkpoint, many mid-write
    print(f"kill-during-save: {mid_write} of 20 kills landed inside a write; {len(loaded_steps)} trials had "
          "checkpoints and every newest one loaded complete")
    save_checkpoint(state(1000), run_dir, 1000, keep=2)
    assert not list(run_dir.glob(".checkpoint-*.tmp"))  # the next save clears what a killed one left


def test_a_torn_newest_checkpoint_is_passed_over(tmp_path):
    for step in (1, 2):
        save_checkpoint(state(step), tmp_path, step, keep=0)
    torn = tmp_path / step_checkpoint_name(2)
    torn.write_bytes(torn.read_bytes()[: 1 << 20])
    path, loaded, passed_over = load_latest(tmp_path)
    assert path.name == step_checkpoint_name(1) and len(passed_over) == 1 and str(torn) in passed_over[0]
    with pytest.raises(CheckpointError, match=str(torn)):
        load_checkpoint(torn)
