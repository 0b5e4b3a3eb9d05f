"""The one configuration flow: TOML recipe -> CLI overrides -> a validated, frozen dataclass tree.

Every field carries its default, its allowed values and a line of help in its metadata
(`largebatch.fields`), so a single validator can name the field, the value given and what is
allowed, before any process group starts, and `largebatch train --help` lists them all. A field
whose type is itself a dataclass is a sub-table: `[optim.lars]` in TOML, `--optim.lars.mode` on the
command line. The batch plan (world size, micro-batches, accumulation) is derived here too, because
a global batch that does not divide is a configuration error, not a runtime one. Torch-free.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from largebatch.errors import ConfigError
from largebatch.fields import allowed, choice, number, plain
from largebatch.optim.registry import LARS_MODES, OPTIMIZERS

# Allowed values are spelled here rather than imported from the component modules so that a recipe can
# be validated (and `largebatch recipes` listed) without importing torch; tests check both lists agree.
DATA_SOURCES = ("fashion_mnist", "npz", "idx", "cifar10", "cifar100", "folder", "prepared", "synthetic")
AUGMENTS = ("auto", "none", "flip", "crop_flip", "imagenet")
MODEL_NAMES = ("small_cnn", "resnet20", "resnet56", "resnet18", "resnet50", "alexnet_bn")
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
SCALING_RULES = ("linear", "sqrt", "none")
WARMUP_MODES = ("gradual", "constant", "none")
DECAYS = ("step", "cosine", "poly", "none")
PRECONDITIONERS = ("none", "kfac")
KFAC_INVERSES = ("eigen", "cholesky")
KFAC_DAMPING_MODES = ("pi", "exact")


@dataclass(frozen=True)
class DataConfig:
    """What to train on and how the global batch is cut into worker, micro and BN batches."""

    source: str = choice("fashion_mnist", DATA_SOURCES, "dataset format (fashion_mnist is embedded)")
    path: str = plain("", "file or directory of the dataset (not for fashion_mnist, synthetic)")
    augment: str = choice("auto", AUGMENTS, "training augmentation; auto: by dataset")
    global_batch: int = number(256, 1, help="kn: samples per optimizer step over all workers")
    micro_batch: int = number(0, 0, help="largest forward pass per device; 0: the whole per-worker batch")
    bn_batch: int = number(32, 0, help="n: samples per BN statistics group; 0: the whole micro-batch")
    eval_batch: int = number(1000, 1, help="samples per evaluation forward pass")
    workers: int = number(0, 0, help="DataLoader worker processes per rank")
    image_size: int = number(224, 8, help="folder, prepared jpeg: training and evaluation crop, in px")
    on_bad_image: str = choice("stop", ("stop", "skip"), "folder: an unreadable image stops before step 1, or is left "
                               "out and counted")
    normalize_on: str = choice("loader", ("loader", "device"), "where augmented uint8 images become normalised "
                               "float32: in the DataLoader (its workers), or after the transfer to the device (4x "
                               "fewer bytes from the workers and to a GPU); not for the folder source")
    decode_on: str = choice("loader", ("loader", "device"), "prepared JPEG shards: decode in the DataLoader (its "
                            "workers), or on the training device after the transfer (torchvision's batched "
                            "decode_jpeg: nvJPEG on a GPU; compressed bytes leave the workers); needs "
                            "normalize_on = 'device'")
    verify: str = choice("sha256", ("sha256", "size"), "prepared: check every data file's sha256 against the index "
                         "(reads the data set once per run), or only that each is there with its size")
    synthetic_shape: tuple[int, ...] = plain((3, 32, 32), "synthetic images: [channels, height, width]")
    synthetic_classes: int = number(10, 2, help="synthetic: number of classes")
    synthetic_train: int = number(1024, 1, help="synthetic: training samples")
    synthetic_test: int = number(256, 1, help="synthetic: test samples")


@dataclass(frozen=True)
class ModelConfig:
    """Which network, and the BN and memory-layout details Goyal et al. found to matter."""

    name: str = choice("small_cnn", MODEL_NAMES, "network")
    zero_init_residual: bool = plain(False, "zero-initialise the last BN gamma of each residual block")
    bn_momentum: float = number(0.1, 0.0, 1.0, help="BN running-statistics momentum (torch's convention)")
    bn_eps: float = number(1e-5, 0.0, lo_open=True, help="BN epsilon")
    channels_last: bool = plain(False, "NHWC memory format for weights and inputs")
    compile: bool = plain(False, "torch.compile the model for training (inductor: fused kernels; the first steps "
                          "compile); not with optim.preconditioner = 'kfac', whose layer hooks it would trace")


@dataclass(frozen=True)
class OptimCommon:
    """The optimizer and its learning rate, stated for `ref_batch` and scaled to the global batch."""

    name: str = choice("sgd", OPTIMIZER_NAMES, "optimizer; its options are the table optim.<name>")
    base_lr: float = number(0.1, 0.0, lo_open=True, help="learning rate at ref_batch")
    ref_batch: int = number(256, 1, help="the batch base_lr is stated for")
    scaling: str = choice("linear", SCALING_RULES, "how the lr scales from ref_batch to global_batch")
    weight_decay: float = number(1e-4, 0.0, help="L2 coefficient (decoupled for lamb)")
    exclude_bn_bias: bool = plain(False, "no weight decay and no trust ratio for BN and bias parameters")
    label_smoothing: float = number(0.0, 0.0, 1.0, help="label smoothing of the cross-entropy")
    clip_grad_norm: float = number(0.0, 0.0, help="clip the averaged gradient to this global L2 norm; 0: off")
    preconditioner: str = choice("none", PRECONDITIONERS, "kfac: K-FAC natural-gradient preconditioning (table kfac) "
                                 "before the optimizer's step")


# One sub-table per registered optimizer, holding that optimizer's own options with their defaults.
OptimConfig = dataclasses.make_dataclass(
    "OptimConfig", [(name, entry.options, field(default_factory=entry.options)) for name, entry in OPTIMIZERS.items()],
    bases=(OptimCommon,), frozen=True)
OptimConfig.__module__ = __name__
OptimConfig.__doc__ = OptimCommon.__doc__ + " Each optimizer's options are the sub-table of its name."


@dataclass(frozen=True)
class KFACConfig:
    """K-FAC (Osawa et al. 2019), used when optim.preconditioner = 'kfac': damping, the schedule of
    stale statistics (intervals that change at every_milestones) and the precision of the factors."""

    damping: float = number(1e-3, 0.0, lo_open=True, help="Tikhonov damping lambda")
    damping_mode: str = choice("pi", KFAC_DAMPING_MODES, "pi: lambda split between A and G by pi; exact: "
                               "(A (x) G + lambda I)^-1, eigen only")
    decay: float = number(0.95, 0.0, 1.0, hi_open=True, help="running-average decay of the factors")
    factor_every: tuple[int, ...] = plain((1,), "steps between factor updates: one entry, or one more than "
                                          "every_milestones")
    inverse_every: tuple[int, ...] = plain((1,), "steps between inverse updates, as factor_every")
    every_milestones: tuple[int, ...] = plain((), "steps at which factor_every and inverse_every take their next "
                                              "entry")
    kl_clip: float = number(1e-3, 0.0, help="scale an update down to lr^2 * <update, grad> <= kl_clip; 0: off")
    factor_dtype: str = choice("auto", ("auto", "bf16", "fp16"), "factors computed and all-reduced in; auto: the "
                               "parameters' dtype")
    inverse: str = choice("eigen", KFAC_INVERSES, "eigendecomposition or Cholesky of the factors")
    inverse_dtype: str = choice("fp32", ("fp32", "fp64"), "precision of the decompositions (at least the "
                                "parameters')")
    batchnorm: bool = plain(True, "precondition BN with its unit-wise 2x2 Fisher; false: BN left to the optimizer")


@dataclass(frozen=True)
class ScheduleConfig:
    """Epoch-based, per-iteration learning-rate schedule: warmup then decay."""

    epochs: float = number(90.0, 0.0, lo_open=True, help="length of the run")
    warmup_epochs: float = number(5.0, 0.0, help="length of the warmup")
    warmup_mode: str = choice("gradual", WARMUP_MODES, "gradual: linear ramp to the peak; constant: then a jump")
    warmup_from: str = choice("base_lr", ("base_lr", "zero"), "where the warmup starts")
    decay: str = choice("step", DECAYS, "decay after warmup")
    milestones: tuple[float, ...] = plain((30.0, 60.0, 80.0), "step decay: epochs at which lr *= gamma")
    gamma: float = number(0.1, 0.0, 1.0, lo_open=True, help="step decay factor")
    poly_power: float = number(2.0, 0.0, lo_open=True, help="poly decay power")
    final_lr: float = number(0.0, 0.0, help="cosine / poly: lr at the end")
    batch_ramp_epochs: tuple[int, ...] = plain((), "batch ramp (Smith et al. 2018): epochs at which the global batch "
                                               "grows, each to the matching batch_ramp_batches entry")
    batch_ramp_batches: tuple[int, ...] = plain((), "batch ramp: the global batch from each batch_ramp_epochs entry "
                                                "on (growing; data.global_batch before the first)")
    batch_ramp_by_noise_scale: bool = plain(False, "batch ramp driven by the measured noise scale: at each epoch end, "
                                            "double the global batch while the doubled batch is <= B_simple (needs "
                                            "run.noise_scale), up to batch_ramp_max")
    batch_ramp_max: int = number(0, 0, help="the noise-scale ramp's largest global batch: data.global_batch x a power "
                                 "of 2")
    batch_ramp_lr: str = choice("keep", ("keep", "scale"), "batch ramp: keep the schedule's lr at a batch change (the "
                                "growth replaces a decay, as Smith et al.) or scale it to the new batch by optim.scaling")


@dataclass(frozen=True)
class DistConfig:
    """How processes talk; world size and rank come from torchrun's environment, not from here."""

    device: str = choice("auto", ("auto", "cpu", "cuda"), "auto: cuda when visible")
    backend: str = choice("auto", ("auto", "gloo", "nccl"), "auto: nccl on cuda, gloo on cpu")
    bucket_cap_mb: float = number(25.0, 0.0, lo_open=True, help="DDP gradient bucket size")
    first_bucket_cap_mb: float = number(1.0, 0.0, lo_open=True, help="DDP's first gradient bucket, the gradients "
                                        "ready first (small: their all-reduce starts early; torch's default); capped "
                                        "by bucket_cap_mb")
    broadcast_buffers: bool = plain(True, "DDP: broadcast rank 0's BN buffers every forward")
    comm_hook: str = choice("none", ("none", "fp16", "bf16", "hierarchical", "hierarchical_fp16", "hierarchical_bf16"),
                            "gradient all-reduce: flat in fp32 (none), fp16 or bf16; hierarchical (reduce-scatter in "
                            "the node, all-reduce across nodes, all-gather), in fp32 or with an fp16/bf16 wire; bf16 "
                            "needs nccl")
    check_every: int = number(0, 0, help="steps between checks that all ranks hold the same parameters; 0: never")


@dataclass(frozen=True)
class RunConfig:
    """Where the run writes, how often, with which seed and numeric precision."""

    out_dir: str = plain("runs", "directory of run directories")
    name: str = plain("", "run directory name under out_dir; default: recipe name + timestamp")
    seed: int = number(0, 0, help="model init (the same on every rank) and data order")
    precision: str = choice("fp32", ("fp32", "bf16", "fp16", "fp64", "auto"), "fp16 needs a GPU; fp64 for checks; "
                            "auto: bf16 where the device has bf16 arithmetic (a CUDA GPU that supports it, a CPU "
                            "with AVX-512 BF16 or AMX), fp32 elsewhere")
    threads: int = number(0, 0, help="torch intra-op threads per process; 0 keeps torch's default")
    log_every: int = number(10, 1, help="steps per train record")
    trust_log_every: int = number(100, 0, help="steps between per-layer trust-ratio records; 0: never")
    eval_every: int = number(1, 1, help="epochs between evaluations (the last epoch always)")
    max_steps: int = number(0, 0, help="end the run after this many optimizer steps, as if finished (the lr "
                            "schedule stays that of schedule.epochs; no evaluation unless an epoch ends there); 0: no "
                            "limit")
    stop_after_epochs: int = number(0, 0, help="end this session after N epochs (resume later); 0: no limit")
    checkpoint: bool = plain(True, "write checkpoints (at each epoch end, and every checkpoint_every steps)")
    checkpoint_every: int = number(0, 0, help="steps between checkpoints within an epoch; 0: epoch ends only")
    keep_checkpoints: int = number(3, 0, help="newest checkpoints kept in the run directory; 0: all")
    target_accuracy: float = number(0.0, 0.0, 1.0, help="time-to-accuracy threshold (fraction)")
    stop_at_target: bool = plain(False, "end the run at the first evaluation reaching target_accuracy (steps to "
                                 "target); it then counts as finished")
    noise_scale: bool = plain(False, "estimate the gradient noise scale B_simple (McCandlish et al. 2018) from micro-batch "
                              "and global-batch gradients and log it (gns_* in train records); needs >= 2 micro-batches "
                              "per step")
    noise_scale_decay: float = number(0.95, 0.0, 1.0, hi_open=True, help="moving-average decay of the noise-scale "
                                      "estimates, per step")
    on_nonfinite: str = choice("stop", ("stop", "skip"), "what a NaN/inf global loss does")
    loss_sync: str = choice("step", ("step", "log"), "step: read the global loss on the host every step (what "
                            "on_nonfinite = 'skip' needs); log: keep it on the device and check it once per log "
                            "interval and before every checkpoint and evaluation, naming the first non-finite step "
                            "(one host sync per run.log_every steps instead of one per step; with 'stop' only)")
    cudnn_benchmark: bool = plain(False, "let cuDNN time its convolution algorithms for the run's shapes and keep "
                                  "the fastest (GPU; nothing on CPU)")
    progress: bool = plain(True, "progress bar on rank 0")


@dataclass(frozen=True)
class Config:
    recipe: str = "default"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    kfac: KFACConfig = KFACConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    dist: DistConfig = DistConfig()
    run: RunConfig = RunConfig()


SECTIONS = tuple(f.name for f in dataclasses.fields(Config) if f.name != "recipe")


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _is_table(annotation: Any) -> bool:
    return dataclasses.is_dataclass(annotation)


def _lookup(key: str) -> tuple[type, str]:
    """The dataclass holding the dotted field `key` (e.g. 'optim.lars.mode') and the field's name."""
    parts = key.split(".")
    cls, where = Config, ""
    for i, part in enumerate(parts):
        types_ = {k: v for k, v in _field_types(cls).items() if not (cls is Config and k == "recipe")}
        if part not in types_:
            if cls is Config:
                raise ConfigError(f"unknown option --{key}: options look like --section.field, sections are "
                                  f"{', '.join(SECTIONS)}")
            raise ConfigError(_unknown_field(cls, where, part))
        if i == len(parts) - 1:
            if _is_table(types_[part]):
                example = dataclasses.fields(types_[part])[0].name
                raise ConfigError(f"{key} is a table: set its fields, e.g. --{key}.{example}")
            return cls, part
        if not _is_table(types_[part]):
            raise ConfigError(f"{where + part} is a field, not a table: --{where + part} VALUE")
        cls, where = types_[part], f"{where}{part}."
    raise ConfigError(f"unknown option --{key}")


def _unknown_field(cls: type, table: str, name: str) -> str:
    """The message for a field `name` that table `table` (e.g. 'optim.') does not have."""
    fields = [f.name for f in dataclasses.fields(cls)]
    message = f"unknown field {table}{name}: fields of [{table.rstrip('.')}] are {', '.join(fields)}"
    elsewhere = [f"{table}{f.name}.{name}" for f in dataclasses.fields(cls) if _is_table(_field_types(cls)[f.name])
                 and name in {g.name for g in dataclasses.fields(_field_types(cls)[f.name])}]
    return message + (f" (did you mean {' or '.join(elsewhere)}?)" if elsewhere else "")


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
    if hi is not None and meta.get("hi_open") and not value < hi:
        raise ConfigError(f"{where} = {value!r}: must be < {hi}")
    if hi is not None and not meta.get("hi_open") and not value <= hi:
        raise ConfigError(f"{where} = {value!r}: must be <= {hi}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{where} = {value!r}: must be finite")


def _build_table(where: str, cls: type, values: typing.Mapping[str, Any]) -> Any:
    """One table (a section or a sub-table such as optim.lars) from its TOML/override values."""
    if not isinstance(values, typing.Mapping):
        raise ConfigError(f"[{where}] must be a table of fields, got {values!r}")
    types_ = _field_types(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in values.items():
        path = f"{where}.{key}"
        if key not in fields:
            raise ConfigError(_unknown_field(cls, f"{where}.", key))
        if _is_table(types_[key]):
            kwargs[key] = _build_table(path, types_[key], raw)
            continue
        value = _coerce(path, raw, types_[key])
        _check_metadata(path, value, fields[key].metadata)
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(tree: typing.Mapping[str, Any], recipe: str = "default") -> Config:
    """Build and validate a Config from a nested mapping such as a parsed TOML recipe."""
    sections = {name: _field_types(Config)[name] for name in SECTIONS}
    kwargs: dict[str, Any] = {"recipe": recipe}
    for name, values in tree.items():
        if name not in sections:
            raise ConfigError(f"unknown section [{name}]: sections are {', '.join(sections)}")
        kwargs[name] = _build_table(name, sections[name], values)
    cfg = Config(**kwargs)
    validate_relations(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The resolved config as a nested dict (tuples as lists), ready for TOML or JSON."""

    def plain_value(value):
        if isinstance(value, (tuple, list)):
            return [plain_value(v) for v in value]
        if isinstance(value, dict):
            return {k: plain_value(v) for k, v in value.items()}
        return value

    return {"recipe": cfg.recipe} | {name: plain_value(dataclasses.asdict(getattr(cfg, name))) for name in SECTIONS}


def parse_override_value(key: str, text: str) -> Any:
    """Turn the text of `--section.field TEXT` (or `--section.table.field TEXT`) into a value of the field's type.

    Strings are taken verbatim; anything else is read as a TOML value, so `true`, `0.1`, `[30, 60]`
    work as they do in a recipe (a bare comma list `30,60` is accepted for lists too).
    """
    cls, name = _lookup(key)
    annotation = _field_types(cls)[name]
    if annotation is str:
        return text
    if typing.get_origin(annotation) is tuple and not text.strip().startswith("["):
        text = f"[{text}]"
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        raise ConfigError(f"--{key} {text!r}: not a valid value for a {_describe(annotation)}") from None


def _describe(annotation: Any) -> str:
    if typing.get_origin(annotation) is tuple:
        return f"list of {typing.get_args(annotation)[0].__name__}"
    return annotation.__name__


def apply_overrides(tree: typing.Mapping[str, Any], overrides: typing.Mapping[str, Any]) -> dict[str, Any]:
    """Return a copy of the recipe tree with dotted `section.field` (or `section.table.field`) -> value applied."""

    def copy(node):
        return {k: copy(v) for k, v in node.items()} if isinstance(node, typing.Mapping) else node

    merged = copy(tree)
    for key, value in overrides.items():
        _lookup(key)  # an unknown key is reported by its full name
        *tables, name = key.split(".")
        node = merged
        for table in tables:
            node = node.setdefault(table, {})
        node[name] = value
    return merged


def describe_fields() -> str:
    """Every field as `--section.field  default  allowed  help`, section by section, for --help."""
    lines = []

    def walk(cls: type, prefix: str) -> None:
        types_ = _field_types(cls)
        for f in dataclasses.fields(cls):
            if _is_table(types_[f.name]):
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            if isinstance(default, tuple):
                default = ",".join(map(str, default))
            shown = str(default) if default != "" else '""'
            rule = f"[{allowed(f.metadata)}] " if allowed(f.metadata) else ""
            lines.append(f"  --{prefix + f.name:<32} {shown:<12} {rule}{f.metadata.get('help', '')}".rstrip())
        for f in dataclasses.fields(cls):
            if _is_table(types_[f.name]):
                lines.append(f"  [{prefix}{f.name}] {types_[f.name].__doc__ or ''}".rstrip())
                walk(types_[f.name], f"{prefix}{f.name}.")

    for name in SECTIONS:
        cls = _field_types(Config)[name]
        lines.append(f"[{name}] {cls.__doc__}")
        walk(cls, f"{name}.")
    return "\n".join(lines)


def upgrade_saved(tree: dict[str, Any]) -> dict[str, Any]:
    """`tree` (a parsed config file) with the fields of earlier largebatch versions in today's terms, so that
    run directories saved before a rename still resume, evaluate and report: `optim.lars.compiled` and
    `optim.lamb.compiled` (true/false) became `optim.<name>.impl` ("compiled"/the default)."""
    for name in ("lars", "lamb"):
        table = tree.get("optim", {}).get(name)
        if isinstance(table, dict) and "compiled" in table:
            if table.pop("compiled") is True:
                table.setdefault("impl", "compiled")
    return tree


def load_toml(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return upgrade_saved(tomllib.load(f))
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
    if s.warmup_mode == "constant" and s.warmup_from == "zero" and s.warmup_epochs > 0:
        raise ConfigError("schedule.warmup_mode = 'constant' with schedule.warmup_from = 'zero' trains at lr 0 for "
                          "the whole warmup: use warmup_from = 'base_lr' (Goyal's constant warmup) or a gradual warmup")
    options = getattr(cfg.optim, cfg.optim.name)
    if getattr(options, "nesterov", False) and options.momentum == 0:
        raise ConfigError(f"optim.{cfg.optim.name}.nesterov = true needs optim.{cfg.optim.name}.momentum > 0")
    betas = cfg.optim.lamb.betas
    if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
        raise ConfigError(f"optim.lamb.betas = {list(betas)}: must be two numbers in [0, 1)")
    _validate_kfac(cfg.kfac)
    _validate_batch_ramp(cfg)
    if cfg.run.loss_sync == "log" and cfg.run.on_nonfinite == "skip":
        raise ConfigError("run.loss_sync = 'log' finds a non-finite loss only after the step is applied, so it cannot "
                          "skip it: use run.on_nonfinite = 'stop', or run.loss_sync = 'step'")
    if cfg.model.compile and cfg.optim.preconditioner == "kfac":
        raise ConfigError("model.compile = true would trace K-FAC's layer hooks (optim.preconditioner = 'kfac'): "
                          "turn one of them off")
    if cfg.run.stop_at_target and cfg.run.target_accuracy == 0:
        raise ConfigError("run.stop_at_target = true needs run.target_accuracy > 0 (the accuracy to stop at)")
    d = cfg.data
    if d.source in ("npz", "idx", "cifar10", "cifar100", "folder", "prepared") and not d.path:
        raise ConfigError(f"data.path is required when data.source = {d.source!r}")
    if d.decode_on == "device" and d.source != "prepared":
        raise ConfigError(f"data.decode_on = 'device' decodes prepared JPEG shards (data.source = 'prepared'), not "
                          f"data.source = {d.source!r}; use data.decode_on = 'loader'")
    if d.decode_on == "device" and d.normalize_on != "device":
        raise ConfigError("data.decode_on = 'device' makes the batch on the device, so it is normalised there too: "
                          "set data.normalize_on = 'device'")
    if d.normalize_on == "device" and d.source == "folder":
        raise ConfigError("data.normalize_on = 'device' needs batched uint8 data: the folder source normalises in its "
                          "PIL transforms (prepare the tree with `largebatch prepare` and use data.source = 'prepared')")
    if d.source == "synthetic" and (len(d.synthetic_shape) != 3 or min(d.synthetic_shape) < 1):
        raise ConfigError(f"data.synthetic_shape = {list(d.synthetic_shape)}: must be [channels, height, width], "
                          "all >= 1")
    if cfg.run.precision == "fp16" and cfg.dist.device == "cpu":
        raise ConfigError("run.precision = 'fp16' needs a GPU (fp16 with GradScaler); on CPU use 'bf16' or 'fp32'")
    if cfg.dist.backend == "nccl" and cfg.dist.device == "cpu":
        raise ConfigError("dist.backend = 'nccl' needs dist.device = 'cuda' (or 'auto' on a GPU machine)")


def _validate_batch_ramp(cfg: Config) -> None:
    s = cfg.schedule
    epochs, batches = list(s.batch_ramp_epochs), list(s.batch_ramp_batches)
    if len(epochs) != len(batches):
        raise ConfigError(f"schedule.batch_ramp_epochs = {epochs} and schedule.batch_ramp_batches = {batches} must "
                          "have one entry each per batch change")
    if epochs and (epochs[0] < 1 or epochs != sorted(set(epochs)) or epochs[-1] >= s.epochs):
        raise ConfigError(f"schedule.batch_ramp_epochs = {epochs}: must be strictly increasing whole epochs >= 1 and "
                          f"< schedule.epochs = {s.epochs:g}")
    if s.batch_ramp_by_noise_scale:
        g, top = cfg.data.global_batch, s.batch_ramp_max
        if epochs:
            raise ConfigError("schedule.batch_ramp_by_noise_scale = true decides the batch changes itself: leave "
                              "schedule.batch_ramp_epochs and batch_ramp_batches empty")
        if not cfg.run.noise_scale:
            raise ConfigError("schedule.batch_ramp_by_noise_scale = true needs run.noise_scale = true (the estimate "
                              "it follows)")
        if top <= g or top % g or (top // g) & (top // g - 1):
            raise ConfigError(f"schedule.batch_ramp_max = {top}: must be data.global_batch = {g} times a power of 2 "
                              "(2, 4, 8, ...): the ramp doubles the batch")
    growing = [cfg.data.global_batch, *batches]
    if any(a >= b for a, b in zip(growing, growing[1:])):
        raise ConfigError(f"schedule.batch_ramp_batches = {batches}: each must be larger than the one before "
                          f"(data.global_batch = {cfg.data.global_batch} first)")


def _validate_kfac(k: KFACConfig) -> None:
    for name in ("factor_every", "inverse_every"):
        every = getattr(k, name)
        if len(every) != len(k.every_milestones) + 1 or min(every, default=0) < 1:
            raise ConfigError(f"kfac.{name} = {list(every)}: must be {len(k.every_milestones) + 1} step count(s) >= 1, "
                              f"one more than kfac.every_milestones = {list(k.every_milestones)}")
    if list(k.every_milestones) != sorted(set(k.every_milestones)) or min(k.every_milestones, default=1) < 1:
        raise ConfigError(f"kfac.every_milestones = {list(k.every_milestones)}: must be strictly increasing steps >= 1")
    if k.inverse == "cholesky" and k.damping_mode != "pi":
        raise ConfigError("kfac.inverse = 'cholesky' inverts A and G separately: it needs kfac.damping_mode = 'pi'")


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

    @property
    def ghost_bn_batch(self) -> int:
        """The BN group size when BN statistics are taken over groups smaller than the micro-batch
        (ghost BN); 0 when each forward pass's BN sees the whole micro-batch."""
        return self.bn_batch if self.bn_batch < self.micro_batch else 0


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
    "ScheduleConfig", "apply_overrides", "config_from_dict", "config_to_dict", "describe_fields", "load_toml",
    "parse_override_value", "plan_batches",
]
