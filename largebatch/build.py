"""Turning the validated config into components: the only place that maps config fields onto
constructor arguments, shared by training and evaluation so both build the very same model.
`build_run` assembles a whole run (`largebatch.state.RunState`) once.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from largebatch.config import Config
from largebatch.data import DataSplits, defer_decoding, defer_normalization, load_splits
from largebatch.data.prepared import EncodedImages
from largebatch.data.sampler import GlobalBatchSampler
from largebatch.data.transforms import normalize
from largebatch.data.verify import unreadable_images
from largebatch.dist import Collectives, DistEnv, wrap_model
from largebatch.dist.threads import choose_threads, usable_cores
from largebatch.extensions import Extension, StepContext
from largebatch.extensions.batch_ramp import NoiseScaleRamp
from largebatch.extensions.consistency import RankConsistencyCheck
from largebatch.extensions.grad_clip import GradClip
from largebatch.extensions.kfac import KFAC, kfac_options
from largebatch.extensions.noise_scale import NoiseScale
from largebatch.extensions.trust_ratios import TrustRatioLog
from largebatch.metrics import RunLogger
from largebatch.models import build_model
from largebatch.optim import build_optimizer, param_groups
from largebatch.plan import RunPlan
from largebatch.precision import autocast_factory, grad_scaler, param_dtype
from largebatch.state import RunState


def build_data(cfg: Config, collectives: Collectives | None = None,
               image_check_record: Path | None = None) -> DataSplits:
    """The data splits; with `collectives`, the image check of folder data is split over the ranks, and
    an `image_check_record` made for the same files (a resumed run's) stands in for it."""
    d = cfg.data

    def check_images(paths):
        if collectives is None:
            return unreadable_images(paths)
        return unreadable_images(paths, collectives.rank, collectives.world_size, collectives.all_gather_objects)

    return load_splits(d.source, d.path, d.augment, synthetic_shape=tuple(d.synthetic_shape),
                       synthetic_classes=d.synthetic_classes, synthetic_train=d.synthetic_train,
                       synthetic_test=d.synthetic_test, seed=cfg.run.seed, image_size=d.image_size,
                       on_bad_image=d.on_bad_image, check_images=check_images,
                       image_check_record=image_check_record, verify=d.verify)


def build_network(cfg: Config, splits: DataSplits, device: torch.device, ghost_bn_batch: int = 0) -> nn.Module:
    """The model, seeded identically on every rank. `ghost_bn_batch` > 0 takes BN statistics over
    groups of that many samples inside each forward pass (BN over a fixed per-worker batch, Goyal et
    al. §5.1); the state dict is the same either way, so evaluation builds it with plain BN."""
    m = cfg.model
    torch.manual_seed(cfg.run.seed)
    model = build_model(m.name, num_classes=splits.num_classes, in_channels=splits.in_channels,
                        image_size=splits.image_size, zero_init_residual=m.zero_init_residual,
                        bn_batch=ghost_bn_batch, bn_momentum=m.bn_momentum, bn_eps=m.bn_eps)
    return model.to(device=device, dtype=param_dtype(cfg.run.precision), memory_format=memory_format(cfg))


def memory_format(cfg: Config) -> torch.memory_format:
    return torch.channels_last if cfg.model.channels_last else torch.preserve_format


def build_optimizer_for(cfg: Config, model: nn.Module, lr: float) -> torch.optim.Optimizer:
    """The configured optimizer with its own options (`optim.<name>`), starting at `lr`."""
    o = cfg.optim
    return build_optimizer(o.name, param_groups(model, o.weight_decay, o.exclude_bn_bias), lr=lr,
                           options=getattr(o, o.name))


def input_placement(cfg: Config, device: torch.device,
                    normalization: tuple[tuple[float, ...], tuple[float, ...]] | None = None
                    ) -> Callable[[torch.Tensor, torch.Tensor], tuple]:
    """Moves a batch to the device in the model's dtype and memory format (the same in train and eval);
    with `normalization` (mean, std), the batch arrives as uint8, or still as JPEGs (`EncodedImages`, decoded
    on the device), and is normalised once on the device."""
    dtype = param_dtype(cfg.run.precision)
    layout = memory_format(cfg)

    def place(x: torch.Tensor | EncodedImages, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(x, EncodedImages):
            x = x.decode(device)
        if normalization is not None:
            x = normalize(x.to(device, non_blocking=True), *normalization)
        return x.to(device, dtype, non_blocking=True, memory_format=layout), y.to(device, non_blocking=True)

    return place


def data_placement(cfg: Config, splits: DataSplits, device: torch.device) -> Callable[[torch.Tensor, torch.Tensor],
                                                                                       tuple]:
    """`input_placement` for the batches of `splits`: with data.normalize_on = "device" the datasets are made to
    deliver uint8 and the placement normalises them after the transfer; with data.decode_on = "device" too,
    prepared JPEG shards deliver their bytes and the placement decodes them on the device first."""
    if cfg.data.decode_on == "device":
        defer_decoding(splits)
    normalization = defer_normalization(splits) if cfg.data.normalize_on == "device" else None
    return input_placement(cfg, device, normalization)


def compiled_for_training(cfg: Config, model: nn.Module) -> nn.Module:
    """What the training step calls: `model` (DDP-wrapped or not) through torch.compile when model.compile is
    set (around DDP, so that its optimizer splits the graph at the gradient buckets); the module itself
    otherwise. Checkpoints and evaluation keep using the plain module, so the saved names do not change."""
    torch.backends.cudnn.benchmark = cfg.run.cudnn_benchmark
    return torch.compile(model) if cfg.model.compile else model


def builtin_extensions(cfg: Config) -> list[Extension]:
    """The extensions the config asks for: the noise scale (and the batch ramp that follows it), K-FAC, gradient
    clipping, trust-ratio logging, the rank-consistency check."""
    extensions: list[Extension] = []
    if cfg.run.noise_scale:  # first: it measures the gradient before anything rewrites it
        noise_scale = NoiseScale(cfg.run.noise_scale_decay)
        extensions.append(noise_scale)
        if cfg.schedule.batch_ramp_by_noise_scale:
            extensions.append(NoiseScaleRamp(cfg, noise_scale))
    if cfg.optim.preconditioner == "kfac":  # first: clipping and logging see the preconditioned gradient
        extensions.append(KFAC(kfac_options(cfg.kfac)))
    if cfg.optim.clip_grad_norm > 0:
        extensions.append(GradClip(cfg.optim.clip_grad_norm))
    if cfg.run.trust_log_every > 0:
        extensions.append(TrustRatioLog(cfg.run.trust_log_every))
    if cfg.dist.check_every > 0:
        extensions.append(RankConsistencyCheck(cfg.dist.check_every))
    return extensions


def build_run(cfg: Config, env: DistEnv, run_dir: Path | None, extensions: Sequence[Extension] = (),
              image_check_record: Path | None = None) -> RunState:
    """Every part of a run, built once on this rank; `run_dir` is where this rank writes (None: nowhere);
    `image_check_record`, a resumed run's record of the image check (every rank reads it)."""
    threads = choose_threads(cfg.run.threads, torch.get_num_threads(), env.local_world_size, usable_cores())
    torch.set_num_threads(threads.threads)
    if threads.note and env.local_rank == 0:
        print(f"largebatch: {threads.note}", file=sys.stderr)
    splits = build_data(cfg, Collectives(env), image_check_record)
    plan = RunPlan.build(cfg, env.world_size, len(splits.train))
    sampler = GlobalBatchSampler(len(splits.train), plan.batches, env.rank, cfg.run.seed)
    model = build_network(cfg, splits, env.device, plan.ghost_bn_batch)
    ddp_model = compiled_for_training(cfg, wrap_model(model, env, cfg.dist))
    optimizer = build_optimizer_for(cfg, model, lr=plan.lr(0))
    all_extensions = [*builtin_extensions(cfg), *extensions]
    state = RunState(
        cfg=cfg, env=env, plan=plan, splits=splits, model=model, ddp_model=ddp_model, optimizer=optimizer,
        scaler=grad_scaler(cfg.run.precision, env.device), sampler=sampler,
        autocast=autocast_factory(cfg.run.precision, env.device),
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
        place=data_placement(cfg, splits, env.device), logger=RunLogger(run_dir), extensions=all_extensions)
    scaler = state.scaler
    context = StepContext(model, optimizer, plan, state.collectives, state.logger.log,
                          lambda: scaler.get_scale() if scaler.is_enabled() else 1.0)
    for extension in all_extensions:
        extension.attach(context)
    # Same seed everywhere built the same model; from here on each rank draws its own augmentations.
    torch.manual_seed(cfg.run.seed + 1 + env.rank)
    random.seed(cfg.run.seed + 1 + env.rank)
    return state
