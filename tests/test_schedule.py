"""LrSchedule and scaled_lr against closed forms at chosen steps (Goyal et al. 2017's ResNet-50 recipe)."""

import math

import pytest

from largebatch.config import config_from_dict
from largebatch.plan import lr_schedule
from largebatch.schedule import DECAYS, SCALING_RULES, WARMUP_MODES, LrSchedule, scaled_lr

SPE = 10  # steps per epoch used throughout: epoch e starts at step 10 * e


def goyal(**schedule) -> LrSchedule:
    """kn = 8192, eta = 0.1 per 256: peak 3.2, 5-epoch gradual warmup from 0.1, /10 at 30, 60, 80, built from
    a config the way the trainer builds it (`schedule` overrides fields of the [schedule] section)."""
    cfg = config_from_dict({"data": {"global_batch": 8192},
                            "optim": {"base_lr": 0.1, "ref_batch": 256, "scaling": "linear"},
                            "schedule": {"epochs": 90, "warmup_epochs": 5, "milestones": [30, 60, 80]} | schedule})
    return lr_schedule(cfg, SPE)


def test_choices_match_config_lists():
    config = pytest.importorskip("largebatch.config")
    assert (SCALING_RULES, WARMUP_MODES, DECAYS) == (config.SCALING_RULES, config.WARMUP_MODES, config.DECAYS)


def test_scaled_lr_rules():
    assert scaled_lr(0.1, 8192, 256, "linear") == pytest.approx(3.2, rel=1e-15)
    assert scaled_lr(0.1, 256, 256, "linear") == 0.1
    assert scaled_lr(0.1, 64, 256, "linear") == pytest.approx(0.025, rel=1e-15)
    assert scaled_lr(0.1, 8192, 256, "sqrt") == pytest.approx(0.1 * math.sqrt(32), rel=1e-15)
    assert scaled_lr(0.1, 1024, 256, "sqrt") == pytest.approx(0.2, rel=1e-15)
    assert scaled_lr(0.1, 8192, 256, "none") == 0.1
    with pytest.raises(ValueError, match="rule = 'cubic'.*'linear', 'sqrt', 'none'"):
        scaled_lr(0.1, 8192, 256, "cubic")
    with pytest.raises(ValueError, match="ref_batch = 0"):
        scaled_lr(0.1, 8192, 0, "linear")


def test_goyal_gradual_warmup():
    s = goyal()
    assert s.peak_lr == pytest.approx(3.2, rel=1e-15) and s.warmup_start_lr == 0.1
    assert s(0) == pytest.approx(0.1, rel=1e-15)
    assert s(1) == pytest.approx(0.1 + 3.1 * (0.1 / 5), rel=1e-15)  # per iteration, not per epoch
    assert s(25) == pytest.approx(0.1 + (3.2 - 0.1) * 0.5, rel=1e-15)  # mid-warmup, epoch 2.5
    assert s(49) == pytest.approx(0.1 + 3.1 * 4.9 / 5, rel=1e-15)
    assert s(50) == pytest.approx(3.2, rel=1e-15)  # warmup over at epoch 5
    lrs = [s(i) for i in range(51)]
    assert all(a < b for a, b in zip(lrs, lrs[1:]))


def test_goyal_step_decay_at_and_after_milestones():
    s = goyal()
    assert s(299) == pytest.approx(3.2, rel=1e-15)
    assert s(300) == pytest.approx(0.32, rel=1e-14)
    assert s(599) == pytest.approx(0.32, rel=1e-14)
    assert s(600) == pytest.approx(0.032, rel=1e-14)
    assert s(799) == pytest.approx(0.032, rel=1e-14)
    assert s(800) == pytest.approx(0.0032, rel=1e-14)
    assert s(899) == pytest.approx(0.0032, rel=1e-14)
    assert s(5000) == pytest.approx(0.0032, rel=1e-14)  # past the end: the last value
    assert s.total_steps == 900


def test_fractional_milestone_and_epoch_position():
    s = LrSchedule(peak_lr=1.0, steps_per_epoch=4, total_epochs=3, milestones=(1.5,), gamma=0.5)
    assert [s(i) for i in range(8)] == [1.0] * 6 + [0.5] * 2  # step 6 is epoch 1.5


def test_constant_warmup_then_jump():
    s = goyal(warmup_mode="constant")
    assert s(0) == s(25) == s(49) == 0.1
    assert s(50) == pytest.approx(3.2, rel=1e-15)


def test_gradual_warmup_from_zero():
    s = goyal(warmup_from="zero")
    assert s(0) == 0.0
    assert s(25) == pytest.approx(1.6, rel=1e-15)
    assert LrSchedule(peak_lr=2.0, steps_per_epoch=SPE, total_epochs=4, warmup_epochs=2)(10) == 1.0  # None -> 0


def test_no_warmup_mode_ignores_warmup_epochs():
    s = LrSchedule(peak_lr=2.0, steps_per_epoch=SPE, total_epochs=10, warmup_epochs=5, warmup_mode="none",
                   decay="cosine")
    assert s(0) == 2.0
    assert s(50) == pytest.approx(1.0, rel=1e-15)  # t = 5 / 10 counted from epoch 0


def test_cosine_endpoints_and_midpoint():
    s = LrSchedule(peak_lr=2.0, steps_per_epoch=SPE, total_epochs=15, warmup_epochs=5, warmup_start_lr=0.5,
                   decay="cosine", final_lr=0.2, milestones=(30, 60))  # milestones ignored off "step"
    assert s(50) == 2.0  # t = 0
    assert s(100) == pytest.approx(0.2 + 1.8 * 0.5, rel=1e-15)  # t = 1/2
    assert s(75) == pytest.approx(0.2 + 1.8 * (1 + math.cos(math.pi / 4)) / 2, rel=1e-15)  # t = 1/4
    assert s(150) == pytest.approx(0.2, rel=1e-15)  # t = 1
    assert s(400) == pytest.approx(0.2, rel=1e-15)  # clipped past the end
    assert s(149) > s(150)


def test_poly_endpoints_and_midpoint():
    s = LrSchedule(peak_lr=4.0, steps_per_epoch=SPE, total_epochs=12, warmup_epochs=2, decay="poly")
    assert s(20) == 4.0
    assert s(70) == pytest.approx(4.0 * 0.25, rel=1e-15)  # t = 1/2, power 2
    assert s(45) == pytest.approx(4.0 * 0.75**2, rel=1e-15)
    assert s(120) == 0.0
    cubic = LrSchedule(peak_lr=4.0, steps_per_epoch=SPE, total_epochs=10, decay="poly", poly_power=3,
                       final_lr=1.0)
    assert cubic(50) == pytest.approx(1.0 + 3.0 * 0.125, rel=1e-15)


def test_none_decay_and_warmup_equal_to_total():
    assert LrSchedule(peak_lr=0.3, steps_per_epoch=SPE, total_epochs=2, decay="none")(19) == 0.3
    s = LrSchedule(peak_lr=1.0, steps_per_epoch=SPE, total_epochs=2, warmup_epochs=2, decay="cosine",
                   final_lr=0.1)
    assert s(10) == pytest.approx(0.5, rel=1e-15)
    assert s(20) == 0.1  # no decay phase: past the end is final_lr


@pytest.mark.parametrize(("fields", "message"), [
    (dict(steps_per_epoch=0), "steps_per_epoch = 0"),
    (dict(steps_per_epoch=2.5), "steps_per_epoch = 2.5"),
    (dict(total_epochs=0), "total_epochs = 0"),
    (dict(warmup_epochs=11), "warmup_epochs = 11 .* <= total_epochs = 10"),
    (dict(warmup_epochs=-1), "warmup_epochs = -1"),
    (dict(warmup_mode="linear"), "warmup_mode = 'linear' .*'gradual', 'constant', 'none'"),
    (dict(warmup_mode="constant", warmup_epochs=1), "warmup_start_lr = None .* 'constant'"),
    (dict(warmup_mode="constant", warmup_epochs=1, warmup_start_lr=0.0), "warmup_start_lr = 0.0 .* lr 0"),
    (dict(warmup_start_lr=-0.1), "warmup_start_lr = -0.1"),
    (dict(decay="exp"), "decay = 'exp' .*'step', 'cosine', 'poly', 'none'"),
    (dict(milestones=(6, 3)), r"milestones = \[6.0, 3.0\]"),
    (dict(milestones=(3, 3)), r"milestones = \[3.0, 3.0\]"),
    (dict(gamma=0), "gamma = 0 .*\\(0, 1\\]"),
    (dict(poly_power=0), "poly_power = 0"),
    (dict(final_lr=-1), "final_lr = -1"),
    (dict(peak_lr=float("nan")), "peak_lr = nan"),
])
def test_validation_names_field_value_and_allowed(fields, message):
    base = dict(peak_lr=1.0, steps_per_epoch=SPE, total_epochs=10)
    with pytest.raises(ValueError, match=message):
        LrSchedule(**{**base, **fields})


def test_negative_step_rejected_and_schedule_is_pure():
    s = goyal()
    with pytest.raises(ValueError, match="step = -1"):
        s(-1)
    assert [s(i) for i in (600, 3, 600, 3)] == [s(600), s(3)] * 2
    assert s == goyal() and hash(s) == hash(goyal())
