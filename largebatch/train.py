"""The training loop: synchronous data-parallel SGD in which the global batch is the unit.

One optimizer step consumes exactly `global_batch` samples: each of `world_size` workers runs
`accum_steps` micro-batches, each loss is divided by `accum_steps`, and DDP averages over workers,
so the applied gradient is the mean over all kn samples (Goyal et al. §2.1) whatever the split.
The learning rate is set per iteration from a stateless schedule of the global step, so a resume
only needs the step counter. Gradients synchronise only on the last micro-batch of a step.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from largebatch import build, checkpoint
from largebatch.config import BatchPlan, Config, plan_batches
from largebatch.data import collate_batch
from largebatch.data.sampler import GlobalBatchSampler
from largebatch.dist import DistEnv, all_gather_objects, all_reduce_sum, init_distributed, shutdown, wrap_model
from largebatch.evaluate import EvalResult, eval_loader, evaluate
from largebatch.metrics import RunLogger, progress_bar
from largebatch.precision import autocast_factory, grad_scaler


class NonFiniteLossError(RuntimeError):
    """The global loss became NaN or infinite (run.on_nonfinite = 'stop')."""


@dataclass(frozen=True)
class TrainResult:
    run_dir: Path | None
    test: EvalResult | None  # the last evaluation
    epochs: int
    steps: int
    skipped_steps: int
    wall_s: float  # MLPerf-style: run_start to run_final
    time_to_accuracy_s: float | None  # first evaluation reaching run.target_accuracy


@dataclass
class Progress:
    """Where training stands; with the model/optimizer states, all a checkpoint must restore."""

    epoch: int = 0  # next epoch to run
    step: int = 0  # optimizer steps taken (including skipped ones)
    skipped_steps: int = 0
    elapsed_s: float = 0.0  # training time of earlier sessions of this run
    time_to_accuracy_s: float | None = None


def train(cfg: Config, run_dir: Path | None = None, resume: bool = False) -> TrainResult:
    """Train as configured, in this process; under torchrun, as one rank of the job."""
    env = init_distributed(cfg.dist)
    try:
        return _train(cfg, env, run_dir if env.is_main else None, resume_dir=run_dir if resume else None)
    finally:
        shutdown(env)


def _train(cfg: Config, env: DistEnv, run_dir: Path | None, resume_dir: Path | None) -> TrainResult:
    plan = plan_batches(cfg.data, env.world_size)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    splits = build.build_data(cfg)
    model = build.build_network(cfg, splits, plan, env.device)
    ddp_model = wrap_model(model, env, cfg.dist)
    optimizer = build.build_optimizer_for(cfg, model)
    scaler = grad_scaler(cfg.run.precision, env.device)
    autocast = autocast_factory(cfg.run.precision, env.device)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing)

    sampler = GlobalBatchSampler(len(splits.train), plan, env.rank, cfg.run.seed)
    schedule = build.build_schedule(cfg, sampler.steps_per_epoch)
    total_steps = schedule.total_steps
    total_epochs = math.ceil(total_steps / sampler.steps_per_epoch)
    train_loader = torch.utils.data.DataLoader(
        splits.train, batch_sampler=sampler, collate_fn=collate_batch, num_workers=cfg.data.workers,
        pin_memory=env.device.type == "cuda", persistent_workers=False)
    test_loader = eval_loader(splits.test, cfg.data.eval_batch, env, cfg.data.workers)

    # Same seed everywhere built the same model; from here on each rank draws its own augmentations.
    torch.manual_seed(cfg.run.seed + 1 + env.rank)
    random.seed(cfg.run.seed + 1 + env.rank)
    progress = Progress()
    if resume_dir is not None:
        progress = _restore(resume_dir / checkpoint.CHECKPOINT_NAME, env, model, optimizer, scaler, sampler)

    logger = RunLogger(run_dir)
    logger.log("plan", progress.step, world_size=plan.world_size, global_batch=plan.global_batch,
               per_worker=plan.per_worker, micro_batch=plan.micro_batch, accum_steps=plan.accum_steps,
               bn_batch=plan.bn_batch, steps_per_epoch=sampler.steps_per_epoch, total_steps=total_steps,
               peak_lr=build.peak_lr(cfg), device=str(env.device))
    logger.mlperf_event("run_start", progress.step)
    run_start = time.perf_counter() - progress.elapsed_s
    last_eval: EvalResult | None = None
    loop = _StepRunner(cfg, plan, env, ddp_model, optimizer, scaler, autocast, criterion, schedule)

    bar = progress_bar(total_steps, env.is_main and cfg.run.progress, "train")
    bar.update(progress.step)
    session_epochs = 0
    while progress.step < total_steps and not (cfg.run.stop_after_epochs
                                               and session_epochs >= cfg.run.stop_after_epochs):
        epoch = progress.epoch
        sampler.set_epoch(epoch, progress.step - epoch * sampler.steps_per_epoch)
        ddp_model.train()
        window = _Window(time.perf_counter())
        micro_batches = iter(train_loader)
        while progress.step < min(total_steps, (epoch + 1) * sampler.steps_per_epoch):
            lr, loss = loop.step(micro_batches, progress.step)
            if not math.isfinite(loss):
                if cfg.run.on_nonfinite == "stop":
                    raise NonFiniteLossError(f"non-finite loss {loss} at step {progress.step} (epoch {epoch}); "
                                             "set run.on_nonfinite = 'skip' to skip such steps")
                progress.skipped_steps += 1
                logger.log("skip", progress.step, loss=loss, lr=lr)
            else:
                window.add(loss)
            progress.step += 1
            bar.update(1)
            if cfg.run.trust_log_every and progress.step % cfg.run.trust_log_every == 0:
                if ratios := _trust_ratios(model, optimizer):
                    logger.log("trust", progress.step, **ratios)
            if progress.step % cfg.run.log_every == 0:
                _log_window(logger, window, progress, plan, lr, epoch, sampler.steps_per_epoch, run_start)
                bar.set_postfix(loss=f"{window.mean_loss():.4f}", lr=f"{lr:.4g}")
                window = _Window(time.perf_counter())
        progress.epoch = epoch + 1
        is_last = progress.step >= total_steps
        if is_last or progress.epoch % cfg.run.eval_every == 0:
            last_eval = evaluate(model, test_loader, env, autocast, loop.place)
            elapsed = time.perf_counter() - run_start
            reached = cfg.run.target_accuracy and last_eval.accuracy >= cfg.run.target_accuracy
            if reached and progress.time_to_accuracy_s is None:
                progress.time_to_accuracy_s = elapsed
            logger.log("epoch", progress.step, epoch=progress.epoch, test_loss=last_eval.loss,
                       test_accuracy=last_eval.accuracy, test_samples=last_eval.samples, elapsed_s=elapsed)
            if env.is_main:
                bar.write(f"epoch {progress.epoch}/{total_epochs}  test loss {last_eval.loss:.4f}  "
                          f"test accuracy {100 * last_eval.accuracy:.2f}%  elapsed {elapsed:.1f}s")
        progress.elapsed_s = time.perf_counter() - run_start
        session_epochs += 1
        if cfg.run.checkpoint:
            _save(run_dir, env, model, optimizer, scaler, sampler, progress)
    bar.close()
    wall_s = time.perf_counter() - run_start
    finished = progress.step >= total_steps
    logger.mlperf_event("run_final" if finished else "session_stop", progress.step, wall_s=wall_s,
                        accuracy=last_eval.accuracy if last_eval else None,
                        time_to_accuracy_s=progress.time_to_accuracy_s)
    logger.close()
    return TrainResult(run_dir, last_eval, progress.epoch, progress.step, progress.skipped_steps, wall_s,
                       progress.time_to_accuracy_s)


class _StepRunner:
    """One optimizer step over `accum_steps` micro-batches; returns (lr, global mean loss)."""

    def __init__(self, cfg: Config, plan: BatchPlan, env: DistEnv, model: nn.Module, optimizer, scaler,
                 autocast, criterion, schedule):
        self.plan, self.env, self.model, self.optimizer = plan, env, model, optimizer
        self.scaler, self.autocast, self.criterion, self.schedule = scaler, autocast, criterion, schedule
        self.place = build.input_placement(cfg, env.device)

    def step(self, micro_batches, step: int) -> tuple[float, float]:
        lr = self.schedule(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.env.device)
        for i in range(self.plan.accum_steps):
            x, y = self.place(*next(micro_batches))
            last = i == self.plan.accum_steps - 1
            sync = contextlib.nullcontext() if last or not self.env.distributed else self.model.no_sync()
            with sync:
                with self.autocast():
                    loss = self.criterion(self.model(x), y) / self.plan.accum_steps
                self.scaler.scale(loss).backward()
            loss_sum += loss.detach().float()
        global_loss = all_reduce_sum(loss_sum, self.env).item() / self.env.world_size
        if math.isfinite(global_loss):
            self.scaler.step(self.optimizer)  # GradScaler also skips steps whose fp16 gradients overflowed
            self.scaler.update()
        return lr, global_loss


class _Window:
    """Loss and throughput over the steps since the last log line."""

    def __init__(self, start: float):
        self.start, self.losses = start, []

    def add(self, loss: float) -> None:
        self.losses.append(loss)

    def mean_loss(self) -> float:
        return sum(self.losses) / len(self.losses) if self.losses else math.nan


def _log_window(logger: RunLogger, window: _Window, progress: Progress, plan: BatchPlan, lr: float, epoch: int,
                steps_per_epoch: int, run_start: float) -> None:
    seconds = time.perf_counter() - window.start
    logger.log("train", progress.step, epoch=epoch + (progress.step - epoch * steps_per_epoch) / steps_per_epoch,
               lr=lr, loss=window.mean_loss(), images_per_s=len(window.losses) * plan.global_batch / seconds,
               elapsed_s=time.perf_counter() - run_start)


def _trust_ratios(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """Per-layer factor of the last step of a layer-wise optimizer (LARS `local_lr`, LAMB `trust_ratio`),
    by parameter name, for the layers it applies to; empty for optimizers without one."""
    names = {p: name for name, p in model.named_parameters()}
    ratios = {}
    for group in optimizer.param_groups:
        if not group.get("trust", False):
            continue
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            ratio = state.get("local_lr", state.get("trust_ratio"))
            if ratio is not None:
                ratios[names[p]] = float(ratio)
    return ratios


def _save(run_dir: Path | None, env: DistEnv, model, optimizer, scaler, sampler, progress: Progress) -> None:
    """Write the epoch-end checkpoint from rank 0, with every rank's random-generator state."""
    rng_states = all_gather_objects(checkpoint.capture_rng_state(), env)
    if run_dir is None:
        return
    checkpoint.save_atomic({
        "format": checkpoint.FORMAT_VERSION,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "sampler": sampler.state_dict(),
        "progress": vars(progress).copy(),
        "rng": rng_states,
    }, run_dir / checkpoint.CHECKPOINT_NAME)


def _restore(path: Path, env: DistEnv, model, optimizer, scaler, sampler) -> Progress:
    state = checkpoint.load_checkpoint(path, map_location=env.device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    sampler.load_state_dict(state["sampler"])
    if len(state["rng"]) == env.world_size:
        checkpoint.restore_rng_state(state["rng"][env.rank])
    return Progress(**state["progress"])
