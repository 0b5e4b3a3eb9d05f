"""The one configuration flow: TOML recipe -> CLI overrides -> a validated, frozen dataclass tree.

Every field carries its allowed values in its metadata, so a single validator can name the field,
the value given and what is allowed, before any process group starts. The batch plan (world size,
micro-batches, accumulation) is derived here too, because a global batch that does not divide is a
configuration error, not a runtime one.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration; the message names the field, the value and what is allowed."""


def _choice(default, choices):
    return field(default=default, metadata={"choices": tuple(choices)})


def _range(default, lo=None, hi=None, *, lo_open=False):
    return field(default=default, metadata={"min": lo, "max": hi, "lo_open": lo_open})


# Allowed values are spelled here rather than imported from the component modules so that a recipe can
# be validated (and `largebatch recipes` listed) without importing torch; tests check both lists agree.
DATA_SOURCES = ("fashion_mnist", "npz", "idx", "cifar10", "cifar100", "folder", "synthetic")
AUGMENTS = ("auto", "none", "flip", "crop_flip", "imagenet")
MODEL_NAMES = ("small_cnn", "resnet20", "resnet56", "resnet18", "resnet50", "alexnet_bn")
OPTIMIZER_NAMES = ("sgd", "lars", "lamb")
LARS_MODES = ("lars", "larc_clip", "larc_scale")
SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_MODES = ("gradual", "constant", "none")
DECAYS = ("step", "cosine", "poly", "none")


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how the global batch is cut into worker, micro and BN batches."""

    source: str = _choice("fashion_mnist", DATA_SOURCES)
    path: str = ""
    augment: str = _choice("auto", AUGMENTS)
    global_batch: int = _range(256, 1)
    micro_batch: int = _range(0, 0)  # largest forward pass per device; 0: the whole per-worker batch
    bn_batch: int = _range(32, 0)  # 0: BN statistics over the whole micro-batch
    eval_batch: int = _range(1000, 1)
    workers: int = _range(0, 0)
    synthetic_shape: tuple[int, ...] = (3, 32, 32)
    synthetic_classes: int = _range(10, 2)
    synthetic_train: int = _range(1024, 1)
    synthetic_test: int = _range(256, 1)


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and the BN and memory-layout details Goyal et al. found to matter."""

    name: str = _choice("small_cnn", MODEL_NAMES)
    zero_init_residual: bool = False
    bn_momentum: float = _range(0.1, 0.0, 1.0)
    bn_eps: float = _range(1e-5, 0.0, lo_open=True)
    channels_last: bool = False


@dataclass(frozen=True)
class OptimConfig:
    """The optimizer and its learning rate, stated for `ref_batch` and scaled to the global batch."""

    name: str = _choice("sgd", OPTIMIZER_NAMES)
    base_lr: float = _range(0.1, 0.0, lo_open=True)
    ref_batch: int = _range(256, 1)
    scaling: str = _choice("linear", SCALING_RULES)
    momentum: float = _range(0.9, 0.0, 1.0)
    nesterov: bool = False
    weight_decay: float = _range(1e-4, 0.0)
    exclude_bn_bias: bool = False
    lr_in_momentum: bool = True  # sgd only
    momentum_correction: bool = True  # sgd only
    label_smoothing: float = _range(0.0, 0.0, 1.0)
    trust_coefficient: float = _range(0.001, 0.0, lo_open=True)  # lars: eta in eta*|w|/(|g| + wd*|w|)
    lars_mode: str = _choice("lars", LARS_MODES)
    eps: float = _range(1e-8, 0.0)  # lars / lamb denominators
    betas: tuple[float, ...] = (0.9, 0.999)  # lamb
    trust_clip: float = _range(0.0, 0.0)  # lamb: upper bound of the trust ratio; 0 for none
    compiled: bool = False  # lars / lamb: fuse the update per tensor with torch.compile (first step compiles)


@dataclass(frozen=True)
class ScheduleConfig:
    """Epoch-based, per-iteration learning-rate schedule: warmup then decay."""

    epochs: float = _range(90.0, 0.0, lo_open=True)
    warmup_epochs: float = _range(5.0, 0.0)
    warmup_mode: str = _choice("gradual", WARMUP_MODES)
    warmup_from: str = _choice("base_lr", ("base_lr", "zero"))
    decay: str = _choice("step", DECAYS)
    milestones: tuple[float, ...] = (30.0, 60.0, 80.0)
    gamma: float = _range(0.1, 0.0, 1.0, lo_open=True)
    poly_power: float = _range(2.0, 0.0, lo_open=True)
    final_lr: float = _range(0.0, 0.0)


@dataclass(frozen=True)
class DistConfig:
    """How processes talk; world size and rank come from torchrun's environment, not from here."""

    device: str = _choice("auto", ("auto", "cpu", "cuda"))
    backend: str = _choice("auto", ("auto", "gloo", "nccl"))
    bucket_cap_mb: float = _range(25.0, 0.0, lo_open=True)
    broadcast_buffers: bool = True


@dataclass(frozen=True)
class RunConfig:
    """Where the run writes, how often, with which seed and numeric precision."""

    out_dir: str = "runs"
    name: str = ""  # run directory name under out_dir; default: recipe name + timestamp
    seed: int = _range(0, 0)
    precision: str = _choice("fp32", ("fp32", "bf16", "fp16", "fp64"))  # fp64: for numerical checks
    threads: int = _range(0, 0)  # torch intra-op threads per process; 0 keeps torch's default
    log_every: int = _range(10, 1)
    trust_log_every: int = _range(100, 0)  # steps between per-layer LARS/LAMB trust-ratio records; 0: never
    eval_every: int = _range(1, 1)
    stop_after_epochs: int = _range(0, 0)  # end this session after N epochs (resume later); 0: no limit
    checkpoint: bool = True
    target_accuracy: float = _range(0.0, 0.0, 1.0)  # time-to-accuracy threshold (fraction)
    on_nonfinite: str = _choice("stop", ("stop", "skip"))
    progress: bool = True


@dataclass(frozen=True)
class Config:
    recipe: str = "default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    dist: DistConfig = DistConfig()
    run: RunConfig = RunConfig()


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "recipe")


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(Config)
    return {name: hints[name] for name in SECTIONS}


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


# ---------------------------------------------------------------------------------------------------
# Building a Config from nested dicts (TOML) and overrides.


def _coerce(where: str, value: Any, annotation: Any) -> Any:
    """Check one TOML/CLI value against a field's type; ints are accepted where floats are."""
    origin = typing.get_origin(annotation)
    if origin is tuple:
        (item_type, _ellipsis) = typing.get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} = {value!r}: expected a list of {item_type.__name__}")
        return tuple(_coerce(f"{where}[{i}]", v, item_type) for i, v in enumerate(value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} = {value!r}: expected true or false")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} = {value!r}: expected an integer")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} = {value!r}: expected a number")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} = {value!r}: expected a string")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def _check_metadata(where: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{where} = {value!r}: allowed values are {', '.join(map(repr, choices))}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None:
        if meta.get("lo_open") and not value > lo:
            raise ConfigError(f"{where} = {value!r}: must be > {lo}")
        if not meta.get("lo_open") and not value >= lo:
            raise ConfigError(f"{where} = {value!r}: must be >= {lo}")
    if hi is not None and not value <= hi:
        raise ConfigError(f"{where} = {value!r}: must be <= {hi}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r}: must be finite")


def _build_section(name: str, cls: type, values: typing.Mapping[str, Any]) -> Any:
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        where = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown field {where}: fields of [{name}] are {', '.join(fields)}")
        value = _coerce(where, raw, types_[key])
        _check_metadata(where, value, fields[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(tree: typing.Mapping[str, Any], recipe: str = "default") -> Config:
    """Build and validate a Config from a nested mapping such as a parsed TOML recipe."""
    sections = _section_types()
    kwargs: dict[str, Any] = {"recipe": recipe}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]: sections are {', '.join(sections)}")
        if not isinstance(values, typing.Mapping):
            raise ConfigError(f"[{name}] must be a table of fields, got {values!r}")
        kwargs[name] = _build_section(name, sections[name], values)
    cfg = Config(**kwargs)
    validate_relations(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a nested dict (tuples as lists), ready for TOML or JSON."""

    def plain(value):
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        return value

    return {
        name: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, name)).items()} for name in SECTIONS
    } | {"recipe": cfg.recipe}


def parse_override_value(key: str, text: str) -> Any:
    """Turn the text of `--section.field TEXT` into a value of the field's type.

    Strings are taken verbatim; anything else is read as a TOML value, so `true`, `0.1`, `[30, 60]`
    work as they do in a recipe (a bare comma list `30,60` is accepted for lists too).
    """
    section, _, name = key.partition(".")
    sections = _section_types()
    if section not in sections or not name:
        raise ConfigError(f"unknown option --{key}: options look like --section.field, sections are "
                          f"{', '.join(sections)}")
    types_ = _field_types(sections[section])
    if name not in types_:
        raise ConfigError(f"unknown field {key}: fields of [{section}] are {', '.join(types_)}")
    if types_[name] is str:
        return text
    if typing.get_origin(types_[name]) is tuple and not text.strip().startswith("["):
        text = f"[{text}]"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--{key} {text!r}: not a valid value for a {_describe(types_[name])}") from None


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"list of {typing.get_args(annotation)[0].__name__}"
    return annotation.__name__


def apply_overrides(tree: dict[str, Any], overrides: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of the recipe tree with `section.field -> value` overrides applied."""
    merged = {section: dict(values) for section, values in tree.items()}
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        merged.setdefault(section, {})[name] = value
    return merged


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"recipe file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"recipe file {path} is not valid TOML: {e}") from None


# ---------------------------------------------------------------------------------------------------
# Relations between fields and the derived batch plan.


def validate_relations(cfg: Config) -> None:
    """Checks that involve more than one field (single-field ranges are checked while building)."""
    s = cfg.schedule
    if s.warmup_epochs > s.epochs:
        raise ConfigError(f"schedule.warmup_epochs = {s.warmup_epochs} must be <= schedule.epochs = {s.epochs}")
    if s.decay == "step" and list(s.milestones) != sorted(set(s.milestones)):
        raise ConfigError(f"schedule.milestones = {list(s.milestones)}: must be strictly increasing")
    if len(cfg.optim.betas) != 2 or not all(0.0 <= b < 1.0 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas = {list(cfg.optim.betas)}: must be two numbers in [0, 1)")
    if cfg.optim.compiled and cfg.optim.name not in ("lars", "lamb"):
        raise ConfigError(f"optim.compiled = true applies to optim.name = 'lars' or 'lamb', not {cfg.optim.name!r}")
    d = cfg.data
    if d.source in ("npz", "idx", "cifar10", "cifar100", "folder") and not d.path:
        raise ConfigError(f"data.path is required when data.source = {d.source!r}")
    if d.source == "synthetic" and (len(d.synthetic_shape) != 3 or min(d.synthetic_shape) < 1):
        raise ConfigError(f"data.synthetic_shape = {list(d.synthetic_shape)}: must be [channels, height, width], "
                          "all >= 1")
    if cfg.run.precision == "fp16" and cfg.dist.device == "cpu":
        raise ConfigError("run.precision = 'fp16' needs a GPU (fp16 with GradScaler); on CPU use 'bf16' or 'fp32'")
    if cfg.dist.backend == "nccl" and cfg.dist.device == "cpu":
        raise ConfigError("dist.backend = 'nccl' needs dist.device = 'cuda' (or 'auto' on a GPU machine)")


def _divisors_near(total: int, target: int) -> str:
    """Divisors of `total` closest to `target`, to suggest a batch that would divide."""
    divisors = [d for d in range(1, total + 1) if total % d == 0]
    best = sorted(divisors, key=lambda d: (abs(d - target), d))[:2]
    return " or ".join(str(d) for d in sorted(best))


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is split: world_size x accum_steps x micro_batch."""

    global_batch: int
    world_size: int
    per_worker: int  # samples one worker contributes to each step
    micro_batch: int  # samples in one forward/backward pass
    accum_steps: int  # micro-batches accumulated per optimizer step
    bn_batch: int  # samples per BN statistics group (== micro_batch when BN is not ghosted)


def plan_batches(data: DataConfig, world_size: int) -> BatchPlan:
    """Derive the split of the global batch; a split that does not divide says what would."""
    g = data.global_batch
    if g % world_size:
        lower, upper = (g // world_size) * world_size, (g // world_size + 1) * world_size
        raise ConfigError(
            f"data.global_batch = {g} does not divide over {world_size} workers; use a global batch of "
            f"{lower or upper}{f' or {upper}' if lower else ''}, or {_divisors_near(g, world_size)} workers")
    per_worker = g // world_size
    micro = min(data.micro_batch or per_worker, per_worker)  # a cap: no accumulation when the worker's share fits
    if per_worker % micro:
        raise ConfigError(
            f"data.micro_batch = {micro} does not divide the per-worker batch {per_worker} "
            f"(data.global_batch {g} / {world_size} workers); use a micro_batch of {_divisors_near(per_worker, micro)}")
    bn = data.bn_batch or micro
    if micro % bn:
        raise ConfigError(
            f"data.bn_batch = {bn} does not divide the micro-batch {micro} (per-worker batch {per_worker}); "
            f"use a bn_batch of {_divisors_near(micro, bn)}, or set data.micro_batch to a multiple of {bn}")
    return BatchPlan(g, world_size, per_worker, micro, per_worker // micro, bn)


__all__ = [
    "BatchPlan", "Config", "ConfigError", "DataConfig", "DistConfig", "ModelConfig", "OptimConfig", "RunConfig",
    "ScheduleConfig", "apply_overrides", "config_from_dict", "config_to_dict", "load_toml", "parse_override_value",
    "plan_batches",
]
