"""The training loop: epochs of `TrainStep`s, evaluation, logging and checkpoints over a `RunState`.

The learning rate is a stateless function of the global step (the run's plan), so a resume only
needs the step counter; everything else a resume needs is in the run state's one state dict.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from largebatch import build
from largebatch.config import Config
from largebatch.data import collate_batch
from largebatch.data.verify import CHECK_NAME
from largebatch.dist import init_distributed, shutdown
from largebatch.dist.comm_hooks import CommStats
from largebatch.dist.peers import PeerWatch, is_lost_peer_error, previous_attempt_loss
from largebatch.checkpoint import checkpoints_in
from largebatch.errors import NonFiniteLossError, RankLostError, RunInterrupted
from largebatch.evaluate import EvalResult, eval_loader, evaluate
from largebatch.extensions import Extension
from largebatch.metrics import progress_bar
from largebatch.plan import Phase
from largebatch.precision import resolve as resolve_precision
from largebatch.run_dir import write_text_atomic
from largebatch.state import RunState
from largebatch.step import TrainStep
from largebatch.stop import StopSignals


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path | None
    test: EvalResult | None  # the last evaluation of this session
    epochs: int
    steps: int
    skipped_steps: int
    wall_s: float  # MLPerf-style: run_start to run_final
    time_to_accuracy_s: float | None  # first evaluation reaching run.target_accuracy
    resumed_from: Path | None = None  # the checkpoint this session continued from
    already_finished: bool = False  # resumed a run that had no steps left: nothing was trained or written
    stopped_by: str | None = None  # the signal (SIGTERM, SIGINT) that ended this session early
    checkpoint: Path | None = None  # the newest checkpoint this session wrote (rank 0)


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False, extensions: Sequence[Extension] = (),
          prepare_run_dir: Callable[[], None] | None = None) -> TrainResult:
    """Train as configured in this process (under torchrun, as one rank of the job), writing into
    `run_dir` from rank 0; `resume` continues from its newest checkpoint. `prepare_run_dir` runs on
    rank 0 once the data and the model are built, before anything is written. `largebatch.run` is the
    front door: it validates the config and prepares the run directory so."""
    env = init_distributed(cfg.dist)
    peers = PeerWatch.start(env)
    state: RunState | None = None
    try:
        record = run_dir / CHECK_NAME if resume and run_dir is not None else None
        state = build.build_run(cfg, env, run_dir if env.is_main else None, extensions, image_check_record=record)
        if env.is_main and prepare_run_dir is not None:
            prepare_run_dir()
        if env.is_main and run_dir is not None and state.splits.image_check is not None:
            write_text_atomic(run_dir / CHECK_NAME, json.dumps(state.splits.image_check))
        try:
            resumed_from = None
            if resume:
                resumed_from, passed_over = state.restore(run_dir)
                if env.is_main:
                    for line in passed_over:
                        print(f"largebatch: warning: {line}; using an older checkpoint", file=sys.stderr)
            if _finished(state):
                p = state.progress
                return TrainResult(run_dir if env.is_main else None, None, p.epoch, p.step, p.skipped_steps, 0.0,
                                   p.time_to_accuracy_s, resumed_from, already_finished=True)
            state.logger.open(after_step=state.progress.step if resume else None)
            _report_restart(state, resumed_from)
            with StopSignals() as signals:
                return _train(state, run_dir if env.is_main else None, resumed_from, signals)
        finally:
            state.logger.close()
    except BaseException as error:
        step = state.progress.step if state is not None else None
        if env.distributed and is_lost_peer_error(error):
            lost = f"{peers.diagnose()}; rank {env.rank} stopped after step {step}"
            peers.leave_for_restart(lost)
            raise _rank_lost(lost, run_dir) from error
        peers.record_failure(step, error)
        if isinstance(error, KeyboardInterrupt) and env.is_main and run_dir is not None:
            raise _interrupted(step, run_dir) from error
        raise
    finally:
        shutdown(env)


def _train(state: RunState, run_dir: Path | None, resumed_from: Path | None, signals: StopSignals) -> TrainResult:
    cfg, env, plan, progress, logger = state.cfg, state.env, state.plan, state.progress, state.logger
    train_loader = make_train_loader(state.splits.train, state.sampler, cfg.data.workers, env.device,
                                     cfg.run.seed + env.rank)
    test_loader = eval_loader(state.splits.test, cfg.data.eval_batch, env, cfg.data.workers)
    b = plan.batches
    train_size = len(state.splits.train)
    dropped = train_size - plan.steps_per_epoch * b.global_batch
    ramp = {"batch_ramp": [_phase_record(p) for p in plan.phases[1:]]} if len(plan.phases) > 1 else {}
    logger.log("plan", progress.step, world_size=b.world_size, global_batch=b.global_batch, per_worker=b.per_worker,
               micro_batch=b.micro_batch, accum_steps=b.accum_steps, bn_batch=b.bn_batch,
               steps_per_epoch=plan.steps_per_epoch, total_steps=plan.total_steps, peak_lr=plan.peak_lr,
               train_samples=train_size, dropped_per_epoch=dropped, skipped_images=state.splits.skipped_images,
               device=str(env.device), threads=torch.get_num_threads(),
               precision=resolve_precision(cfg.run.precision, env.device), **ramp)
    if state.splits.skipped_images and env.is_main:
        print(f"largebatch: warning: {state.splits.skipped_images} unreadable image(s) left out "
              "(data.on_bad_image = 'skip')", file=sys.stderr)
    if dropped and env.is_main:
        print(f"largebatch: note: {dropped} of {train_size} training samples are left out of every epoch (the global "
              f"batch {b.global_batch} does not divide the training set; each epoch's shuffle leaves out others)",
              file=sys.stderr)
    logger.mlperf_event("run_start", progress.step)
    run_start = time.perf_counter() - progress.elapsed_s
    last_eval: EvalResult | None = None
    step = TrainStep(state)
    comm = getattr(state.ddp_model, "comm_stats", None)  # what a communication hook counts

    bar = progress_bar(_last_step(state), env.is_main and cfg.run.progress, "train")
    bar.update(progress.step)
    session_epochs = 0
    stopped_by, saved = None, None
    while not _finished(state) and not stopped_by and not (cfg.run.stop_after_epochs
                                                            and session_epochs >= cfg.run.stop_after_epochs):
        epoch = progress.epoch
        phase = plan.phase_of_epoch(epoch)
        state.sampler.set_epoch(epoch, progress.step - plan.epoch_start(epoch), phase.batches)
        state.ddp_model.train()
        window = _Window(time.perf_counter(), progress.step, comm)
        micro_batches = iter(train_loader)
        while progress.step < plan.epoch_end(epoch):
            outcome = step(micro_batches, progress.step)
            if not outcome.applied:
                if cfg.run.on_nonfinite == "stop":
                    raise NonFiniteLossError(f"non-finite loss {outcome.loss} at step {progress.step} (epoch {epoch}); "
                                             "set run.on_nonfinite = 'skip' to skip such steps")
                progress.skipped_steps += 1
                logger.log("skip", progress.step, loss=outcome.loss, lr=outcome.lr)
            else:
                window.add(progress.step, outcome.loss)
            progress.step += 1
            bar.update(1)
            at_log = progress.step % cfg.run.log_every == 0
            if step.loss_on_host or at_log or progress.step >= min(plan.epoch_end(epoch), _last_step(state)):
                window.settle()  # one host sync here under run.loss_sync = "log"
                stopped_by = signals.agreed(state.collectives)
            if at_log:
                seconds = time.perf_counter() - window.start
                extra = {k: v for extension in state.extensions for k, v in extension.log_values().items()}
                batch = phase.batches.global_batch
                logger.log("train", progress.step, epoch=plan.epoch_at(progress.step), lr=outcome.lr,
                           loss=window.mean_loss(), global_batch=batch, images_per_s=len(window.losses) * batch / seconds,
                           elapsed_s=time.perf_counter() - run_start, **window.comm_per_step(progress.step), **extra)
                bar.set_postfix(loss=f"{window.mean_loss():.4f}", lr=f"{outcome.lr:.4g}")
                window = _Window(time.perf_counter(), progress.step, comm)
            # after the step's record: a kill between the two must not lose a record the checkpoint counts
            mid_epoch = progress.step < plan.epoch_end(epoch)  # epoch ends save below, after evaluation
            at_max_steps = progress.step >= _last_step(state)
            if cfg.run.checkpoint and mid_epoch and (stopped_by or at_max_steps or cfg.run.checkpoint_every
                                                     and progress.step % cfg.run.checkpoint_every == 0):
                window.settle()  # never a checkpoint of weights a non-finite step has reached
                progress.elapsed_s = time.perf_counter() - run_start
                saved = state.save(run_dir)
            if stopped_by or at_max_steps:
                break
        if progress.step < plan.epoch_end(epoch):  # stopped by a signal or run.max_steps within the epoch
            break
        progress.epoch = epoch + 1
        if progress.step >= _last_step(state) or progress.epoch % cfg.run.eval_every == 0:
            last_eval = evaluate(state.model, test_loader, env, state.autocast, state.place)
            elapsed = time.perf_counter() - run_start
            reached = cfg.run.target_accuracy and last_eval.accuracy >= cfg.run.target_accuracy
            if reached and progress.time_to_accuracy_s is None:
                progress.time_to_accuracy_s = elapsed
            logger.log("epoch", progress.step, epoch=progress.epoch, test_loss=last_eval.loss,
                       test_accuracy=last_eval.accuracy, test_samples=last_eval.samples, elapsed_s=elapsed)
            if env.is_main:
                bar.write(f"epoch {progress.epoch}/{plan.total_epochs}  test loss {last_eval.loss:.4f}  "
                          f"test accuracy {100 * last_eval.accuracy:.2f}%  elapsed {elapsed:.1f}s")
        for extension in state.extensions:
            extension.on_epoch_end(progress.epoch)
        bar.total = _last_step(state)  # a batch ramp driven by the noise scale changes it
        following = plan.phase_of_epoch(progress.epoch)
        if following.start_epoch == progress.epoch and following is not phase and not _finished(state):
            logger.log("ramp", progress.step, **_phase_record(following))  # before the checkpoint: logged once
        progress.elapsed_s = time.perf_counter() - run_start
        session_epochs += 1
        if cfg.run.checkpoint:
            saved = state.save(run_dir)
    bar.close()
    wall_s = time.perf_counter() - run_start
    logger.mlperf_event("run_final" if _finished(state) else "session_stop", progress.step, wall_s=wall_s,
                        accuracy=last_eval.accuracy if last_eval else None,
                        time_to_accuracy_s=progress.time_to_accuracy_s, signal=stopped_by,
                        stopped_at_target=progress.step < _last_step(state) and _finished(state))
    return TrainResult(run_dir, last_eval, progress.epoch, progress.step, progress.skipped_steps, wall_s,
                       progress.time_to_accuracy_s, resumed_from, stopped_by=stopped_by, checkpoint=saved)


def make_train_loader(dataset: torch.utils.data.Dataset, sampler: torch.utils.data.Sampler, workers: int,
                      device: torch.device, seed: int) -> torch.utils.data.DataLoader:
    """The training DataLoader (`largebatch bench data` times this very one): whole micro-batches from the
    dataset's `__getitems__`, in pinned memory when they go to a GPU; `workers` worker processes, each
    prefetching torch's default 2 batches ahead. They start anew each epoch, seeded from the loader's own
    generator (seeded with `seed`), not from the global one that the augmentations use: so an epoch's
    augmentations are the same whether it follows the previous epoch or a resume (persistent workers would
    carry their random state over from epochs a resumed run never ran)."""
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=workers,
        pin_memory=device.type == "cuda", persistent_workers=False,
        generator=torch.Generator().manual_seed(seed))


def _phase_record(phase: Phase) -> dict[str, float]:
    b = phase.batches
    return {"start_epoch": phase.start_epoch, "start_step": phase.start_step, "global_batch": b.global_batch,
            "micro_batch": b.micro_batch, "accum_steps": b.accum_steps, "steps_per_epoch": phase.steps_per_epoch,
            "lr_factor": phase.lr_factor}


def _last_step(state: RunState) -> int:
    """The step count the run ends at: the schedule's, or `run.max_steps` when that comes first."""
    return min(state.plan.total_steps, state.cfg.run.max_steps or state.plan.total_steps)


def _finished(state: RunState) -> bool:
    """All steps taken (up to `run.max_steps`), or the target accuracy reached in a run that stops there
    (`run.stop_at_target`)."""
    reached = state.cfg.run.stop_at_target and state.progress.time_to_accuracy_s is not None
    return state.progress.step >= _last_step(state) or reached


class _Window:
    """Loss, throughput and gradient bytes sent over the steps since the last log line."""

    def __init__(self, start: float, step: int, comm: CommStats | None):
        self.start, self.first_step, self.comm = start, step, comm
        self.steps: list[int] = []
        self.losses: list[float | torch.Tensor] = []  # device tensors until settled (run.loss_sync = "log")
        self.sent = (comm.bytes_sent, comm.inter_node_bytes) if comm else (0, 0)

    def add(self, step: int, loss: float | torch.Tensor) -> None:
        self.steps.append(step)
        self.losses.append(loss)

    def settle(self) -> None:
        """Bring the losses still on the device to the host in one transfer, and stop at the first
        non-finite one with its step: under run.loss_sync = "log" the step could not look at it."""
        pending = [i for i, loss in enumerate(self.losses) if isinstance(loss, torch.Tensor)]
        if not pending:
            return
        values = torch.stack([self.losses[i] for i in pending]).tolist()
        for i, value in zip(pending, values):
            self.losses[i] = value
        bad = next((i for i in pending if not math.isfinite(self.losses[i])), None)
        if bad is not None:
            raise NonFiniteLossError(
                f"non-finite loss {self.losses[bad]} at step {self.steps[bad]}, found after step {self.steps[-1]} "
                f"(run.loss_sync = 'log' checks once per log interval; the weights are past that step, no checkpoint "
                f"holds them)")

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan

    def comm_per_step(self, step: int) -> dict[str, float]:
        """Bytes the hook sent per step in this window, in all and across nodes ({} without a hook)."""
        if self.comm is None or step == self.first_step:
            return {}
        steps = step - self.first_step
        return {"comm_bytes_per_step": (self.comm.bytes_sent - self.sent[0]) / steps,
                "inter_node_bytes_per_step": (self.comm.inter_node_bytes - self.sent[1]) / steps}


def _report_restart(state: RunState, resumed_from: Path | None) -> None:
    """Under torchrun --max-restarts, say (and log) why the previous attempt ended and where this one resumed."""
    lost = previous_attempt_loss(state.env)
    if lost is None or not state.env.is_main:
        return
    state.logger.log("restart", state.progress.step, cause=lost, resumed_from=str(resumed_from))
    print(f"largebatch: restarted by torchrun after: {lost}; resumed from "
          f"{resumed_from or 'the start (no checkpoint yet)'}", file=sys.stderr)


def _interrupted(step: int | None, run_dir: Path) -> RunInterrupted:
    newest = checkpoints_in(run_dir)
    if not newest:
        return RunInterrupted(f"stopped at once in step {(step or 0) + 1}; no checkpoint was written, so there is "
                              "nothing to resume")
    return RunInterrupted(f"stopped at once in step {(step or 0) + 1}, without a checkpoint of its own; the newest "
                          f"checkpoint is {newest[0]}: continue with `largebatch train --resume {run_dir}`")


def _rank_lost(lost: str, run_dir: Path | None) -> RankLostError:
    newest = checkpoints_in(run_dir) if run_dir is not None else []
    where = f"the newest checkpoint is {newest[0]}" if newest else "no checkpoint was written yet"
    return RankLostError(f"{lost}; {where}; under torchrun --max-restarts N with --resume auto the job restarts "
                         "from it")
