"""Config flow: recipe -> overrides -> validated dataclasses, and the derived batch plan."""

import dataclasses
import inspect
import tomllib

import pytest

from largebatch import recipes
from largebatch import load_config
from largebatch.cli import parse_overrides
from largebatch.config import (AUGMENTS, DATA_SOURCES, DECAYS, LARS_MODES, MODEL_NAMES, OPTIMIZER_NAMES, SCALING_RULES,
                               WARMUP_MODES, ConfigError, DataConfig, config_from_dict, plan_batches)
from largebatch.run_dir import to_toml


def test_every_recipe_validates():
    for name in recipes.available():
        recipe, tree = recipes.load(name)
        if tree["data"].get("source", "fashion_mnist") not in ("fashion_mnist", "synthetic"):
            tree["data"]["path"] = "/datasets/somewhere"  # recipes for real datasets leave the path to the user
        assert config_from_dict(tree, recipe).recipe == name


def test_a_recipe_for_a_real_dataset_asks_for_its_path():
    with pytest.raises(ConfigError, match="data.path is required"):
        load_config("goyal2017", {})


def test_overrides_are_typed_by_field():
    cfg = load_config("fmnist_goyal", parse_overrides([
        "--data.global_batch", "4096", "--optim.base_lr=0.2", "--schedule.milestones", "3,6",
        "--model.zero_init_residual", "true", "--run.name", "123"]))
    assert cfg.data.global_batch == 4096 and cfg.optim.base_lr == 0.2
    assert cfg.schedule.milestones == (3.0, 6.0)
    assert cfg.model.zero_init_residual is True
    assert cfg.run.name == "123"  # strings stay strings


@pytest.mark.parametrize("argv, words", [
    (["--optim.scaling", "cube"], ["optim.scaling", "'cube'", "'linear'", "'sqrt'"]),
    (["--optim.sgd.momentum", "1.5"], ["optim.sgd.momentum", "1.5", "< 1.0"]),
    (["--optim.lars.momentum", "1"], ["optim.lars.momentum", "< 1.0"]),
    (["--optim.sgd.nesterov", "true", "--optim.sgd.momentum", "0"], ["optim.sgd.nesterov", "momentum > 0"]),
    (["--optim.momentum", "0.9"], ["optim.momentum", "optim.sgd.momentum or optim.lars.momentum"]),
    (["--optim.lars", "1"], ["optim.lars is a table"]),
    (["--optim.lars.rate", "1"], ["optim.lars.rate", "trust_coefficient"]),
    (["--schedule.warmup_mode", "constant", "--schedule.warmup_from", "zero"], ["lr 0", "warmup_from"]),
    (["--data.global_batch", "0"], ["data.global_batch", ">= 1"]),
    (["--data.global_batch", "many"], ["data.global_batch", "many"]),
    (["--data.global_batch", "2.5"], ["data.global_batch", "2.5", "integer"]),
    (["--model.zero_init_residual", "1"], ["model.zero_init_residual", "true or false"]),
    (["--optim.lrr", "0.1"], ["optim.lrr", "base_lr"]),
    (["--optimizer.lr", "0.1"], ["optimizer.lr", "sections are"]),
    (["--model.name", "vgg"], ["model.name", "'vgg'", "'resnet50'"]),
    (["--schedule.warmup_epochs", "99", "--schedule.epochs", "10"], ["schedule.warmup_epochs", "99"]),
    (["--schedule.decay", "step", "--schedule.milestones", "60,30"], ["schedule.milestones", "increasing"]),
    (["--data.source", "npz"], ["data.path", "required"]),
    (["--run.precision", "fp16", "--dist.device", "cpu"], ["fp16", "GPU"]),
    (["--optim.lamb.betas", "0.9,1.0"], ["optim.lamb.betas", "[0, 1)"]),
    (["--optim.lars.mode", "clip"], ["optim.lars.mode", "'larc_clip'"]),
    (["stray"], ["stray"]),
    (["--data.global_batch"], ["needs a value"]),
])
def test_bad_config_names_field_and_allowed(argv, words):
    with pytest.raises(ConfigError) as err:
        load_config("fmnist_goyal", parse_overrides(argv))
    for word in words:
        assert word in str(err.value)


def test_unknown_recipe_lists_the_known_ones():
    with pytest.raises(ConfigError, match="goyal2017"):
        recipes.load("goyal2018")


def test_unknown_section_and_field_in_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlearning_rate = 0.1\n")
    with pytest.raises(ConfigError, match="optim.learning_rate"):
        load_config(str(bad), {})


def test_resolved_config_round_trips_through_toml():
    cfg = load_config("goyal2017", {"data.path": "/imagenet"})
    again = config_from_dict({k: v for k, v in tomllib.loads(to_toml(cfg)).items() if k != "recipe"},
                             recipe=cfg.recipe)
    assert again == cfg


def test_choice_lists_match_the_components():
    from largebatch import data, models, optim, schedule

    assert set(DATA_SOURCES) == set(data.SOURCES)
    assert set(AUGMENTS) == set(data.AUGMENTS)
    assert set(MODEL_NAMES) == set(models.MODELS)
    assert set(OPTIMIZER_NAMES) == set(optim.OPTIMIZERS)
    assert set(LARS_MODES) == set(optim.LARS_MODES)
    from largebatch.config import KFAC_DAMPING_MODES, KFAC_INVERSES, DistConfig
    from largebatch.optim import kfac

    assert (set(KFAC_INVERSES), set(KFAC_DAMPING_MODES)) == (set(kfac.INVERSE_METHODS), set(kfac.DAMPING_MODES))
    from largebatch.dist.comm_hooks import COMM_HOOKS

    assert set(next(f for f in dataclasses.fields(DistConfig) if f.name == "comm_hook").metadata["choices"]) == set(
        COMM_HOOKS)
    assert (set(SCALING_RULES), set(WARMUP_MODES), set(DECAYS)) == (
        set(schedule.SCALING_RULES), set(schedule.WARMUP_MODES), set(schedule.DECAYS))


@pytest.mark.parametrize("overrides, message", [
    ({"kfac.factor_every": [1, 10]}, r"kfac.factor_every = \[1, 10\]: must be 1 step count\(s\) >= 1, one more than "
                                     r"kfac.every_milestones = \[\]"),
    ({"kfac.inverse_every": [0]}, r"kfac.inverse_every = \[0\]: must be 1 step count"),
    ({"kfac.every_milestones": [500, 100], "kfac.factor_every": [1, 2, 3], "kfac.inverse_every": [1, 2, 3]},
     r"kfac.every_milestones = \[500, 100\]: must be strictly increasing"),
    ({"kfac.inverse": "cholesky", "kfac.damping_mode": "exact"}, r"needs kfac.damping_mode = 'pi'"),
    ({"kfac.damping": 0}, r"kfac.damping = 0.0: must be > 0"),
])
def test_kfac_schedule_and_solver_combinations_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config("fmnist_goyal", overrides)


def test_goyal_plan_256_workers():
    plan = plan_batches(DataConfig(global_batch=8192, bn_batch=32), 256)
    assert (plan.per_worker, plan.micro_batch, plan.accum_steps, plan.bn_batch) == (32, 32, 1, 32)


def test_plan_derives_accumulation():
    plan = plan_batches(DataConfig(global_batch=8192, micro_batch=256, bn_batch=32), 8)
    assert (plan.per_worker, plan.micro_batch, plan.accum_steps) == (1024, 256, 4)
    assert plan.world_size * plan.accum_steps * plan.micro_batch == plan.global_batch


def test_micro_batch_is_a_cap_per_device():
    plan = plan_batches(DataConfig(global_batch=1024, micro_batch=128, bn_batch=32), 16)
    assert (plan.per_worker, plan.micro_batch, plan.accum_steps) == (64, 64, 1)


def test_plan_bn_zero_means_whole_micro_batch():
    assert plan_batches(DataConfig(global_batch=512, bn_batch=0), 2).bn_batch == 256


@pytest.mark.parametrize("data, world, suggestion", [
    (DataConfig(global_batch=1000, bn_batch=0), 3, "999 or 1002"),
    (DataConfig(global_batch=1024, micro_batch=96, bn_batch=32), 2, "micro_batch of"),
    (DataConfig(global_batch=96, bn_batch=32), 2, "bn_batch of"),
    (DataConfig(global_batch=1024, micro_batch=192, bn_batch=32), 1, "micro_batch of 128 or 256"),
    (DataConfig(global_batch=960, micro_batch=48, bn_batch=32), 1, "bn_batch of 16 or 24"),
])
def test_plan_rejects_what_does_not_divide_and_says_what_would(data, world, suggestion):
    with pytest.raises(ConfigError, match=suggestion):
        plan_batches(data, world)


def test_config_is_frozen():
    cfg = load_config("fmnist_goyal", {})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.data.global_batch = 1


@pytest.mark.parametrize("recipe, peak, per_gpu", [
    ("you2018_lars", 34.0, 32),              # 32,768 on 1024 workers of 32
    ("you2018_lars_alexnet", 10.0, 64),      # 8,192 on 128 workers
    ("yamazaki2019", 13.0 * 81920 / 86016, 40),  # 81,920 on 2,048 GPUs of 40 (the paper's layout)
])
def test_lars_recipes_derive_the_papers_numbers(recipe, peak, per_gpu):
    from largebatch.plan import lr_schedule, peak_lr

    cfg = load_config(recipe, {"data.path": "/imagenet"})
    assert cfg.optim.name == "lars" and cfg.optim.exclude_bn_bias
    assert peak_lr(cfg) == pytest.approx(peak)
    world = cfg.data.global_batch // per_gpu
    plan = plan_batches(cfg.data, world)
    assert plan.per_worker == per_gpu and plan.accum_steps == 1
    steps_per_epoch = 1_281_167 // cfg.data.global_batch
    schedule = lr_schedule(cfg, steps_per_epoch)
    warmup_end = round(cfg.schedule.warmup_epochs * steps_per_epoch)
    assert schedule(warmup_end) == pytest.approx(peak, rel=0.02)
    assert schedule(0) < 0.1 * peak  # warmup from zero
    assert schedule(int(cfg.schedule.epochs * steps_per_epoch)) == pytest.approx(cfg.schedule.final_lr)


def test_each_optimizer_has_its_own_options_with_one_default():
    from largebatch.optim.lamb import LAMB
    from largebatch.optim.lars import LARS

    cfg = load_config("fmnist_goyal", {"optim.name": "lars"})
    assert cfg.optim.lars.eps == 0.0 and cfg.optim.lamb.eps == 1e-6  # no shared eps any more
    # The constructors' defaults are the registry's.
    assert inspect.signature(LARS).parameters["eps"].default == cfg.optim.lars.eps
    assert inspect.signature(LAMB).parameters["eps"].default == cfg.optim.lamb.eps
    assert load_config("fmnist_goyal", {"optim.lars.impl": "fused"}).optim.lars.impl == "fused"


@pytest.mark.parametrize("compiled, impl", [(True, "compiled"), (False, "foreach")])
def test_a_config_saved_with_the_former_compiled_flag_still_loads(tmp_path, compiled, impl):
    """Run directories written before optim.<name>.compiled became optim.<name>.impl resume and evaluate."""
    saved = tmp_path / "config.toml"
    flag = str(compiled).lower()
    saved.write_text(f'[optim]\nname = "lars"\n[optim.lars]\ncompiled = {flag}\n[optim.lamb]\ncompiled = {flag}\n')
    cfg = load_config(str(saved))
    assert cfg.optim.lars.impl == impl and cfg.optim.lamb.impl == impl
