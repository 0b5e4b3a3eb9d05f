"""Single-process training runs: run-directory contents, bit-exact resume, non-finite losses."""

import math
import os
import signal

import numpy as np
import pytest
import torch

import largebatch
from largebatch.checkpoint import load_checkpoint
from largebatch.cli import parse_overrides
from largebatch.errors import NonFiniteLossError, RunInterrupted
from largebatch.extensions import Extension
from largebatch.metrics import read_metrics
from largebatch.run_dir import CONFIG_NAME

SMALL = ["--data.source", "synthetic", "--data.synthetic_shape", "1,16,16", "--data.synthetic_train", "256",
         "--data.synthetic_test", "64", "--data.global_batch", "64", "--data.micro_batch", "32", "--data.bn_batch", "16",
         "--data.augment", "flip", "--optim.base_lr", "1.0", "--schedule.epochs", "3", "--schedule.warmup_epochs", "1",
         "--schedule.decay", "step", "--schedule.milestones", "2", "--run.progress", "false", "--run.log_every", "2"]


def config(tmp_path, *extra):
    return largebatch.load_config("fmnist_goyal", parse_overrides([*SMALL, "--run.out_dir", str(tmp_path), *extra]))


def run(tmp_path, name, *extra, resume=False):
    if resume:
        cfg = largebatch.load_config(overrides=parse_overrides(extra), resume_dir=tmp_path / name)
        return largebatch.run(cfg, tmp_path / name, resume=True)
    return largebatch.run(config(tmp_path, "--run.name", name, *extra))


def test_run_directory_holds_config_metrics_events_and_checkpoint(tmp_path):
    result = run(tmp_path, "r", "--run.target_accuracy", "0.2", "--run.trust_log_every", "4")
    run_dir = tmp_path / "r"
    assert (run_dir / CONFIG_NAME).is_file() and (run_dir / "checkpoint.pt").is_file()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    records = read_metrics(run_dir)
    kinds = [r["kind"] for r in records]
    assert kinds[0] == "plan" and kinds.count("epoch") == 3 and "trust" not in kinds  # SGD has no trust ratios
    mlperf = [r["key"] for r in records if r["kind"] == "mlperf"]
    assert mlperf == ["run_start", "run_final"]
    train_lines = [r for r in records if r["kind"] == "train"]
    assert {"lr", "loss", "images_per_s", "elapsed_s", "epoch"} <= train_lines[0].keys()
    assert result.steps == 12 and result.test.samples == 64
    assert result.time_to_accuracy_s is not None and result.time_to_accuracy_s <= result.wall_s
    # The logged lr follows the schedule: the linearly scaled peak, divided by 10 after the milestone.
    assert train_lines[-1]["lr"] == pytest.approx(1.0 * 64 / 256 * 0.1)


def test_resume_is_bit_exact(tmp_path):
    run(tmp_path, "straight")
    interrupted = run(tmp_path, "split", "--run.stop_after_epochs", "2")
    assert interrupted.epochs == 2
    assert read_metrics(tmp_path / "split")[-1]["key"] == "session_stop"
    run(tmp_path, "split", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    for pid, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][pid]["momentum_buffer"])
    assert a["progress"]["step"] == b["progress"]["step"] == 12


def test_a_kfac_run_resumed_mid_schedule_is_bit_exact(tmp_path):
    """Stopped after an epoch (4 steps) between two inverse updates (every 3 steps): the factors, inverses
    and counters come back from the checkpoint, and the run ends bitwise equal to an uninterrupted one."""
    kfac = ["--optim.preconditioner", "kfac", "--kfac.factor_every", "2", "--kfac.inverse_every", "3"]
    run(tmp_path, "straight", *kfac)
    run(tmp_path, "split", *kfac, "--run.stop_after_epochs", "1")
    saved = load_checkpoint(tmp_path / "split" / "checkpoint.pt")["kfac"]
    assert saved["factors"] and saved["inverses"]
    run(tmp_path, "split", "--run.stop_after_epochs", "0", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert a["progress"]["step"] == b["progress"]["step"] == 12
    for name, factors in a["kfac"]["factors"].items():
        assert all(torch.equal(x, y) for x, y in zip(factors, b["kfac"]["factors"][name])), name


def test_nonfinite_loss_stops_with_the_step_number(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at step \d+"):
        run(tmp_path, "nan", "--optim.base_lr", "1e30", "--schedule.warmup_epochs", "0")


def test_nonfinite_loss_can_be_skipped(tmp_path):
    result = run(tmp_path, "skip", "--optim.base_lr", "1e30", "--schedule.warmup_epochs", "0",
                 "--run.on_nonfinite", "skip")
    assert result.skipped_steps > 0
    skips = [r for r in read_metrics(tmp_path / "skip") if r["kind"] == "skip"]
    assert len(skips) == result.skipped_steps and not math.isfinite(float(skips[0]["loss"]))


def test_bf16_autocast_trains_on_cpu(tmp_path):
    result = run(tmp_path, "bf16", "--run.precision", "bf16", "--model.channels_last", "true")
    assert math.isfinite(result.test.loss)


@pytest.mark.parametrize("name, extra", [("lars", ["--optim.lars.mode", "larc_clip"]), ("lamb", []),
                                         ("lars", ["--optim.lars.impl", "compiled"]),
                                         ("lamb", ["--optim.lamb.impl", "fused"])],
                         ids=["larc_clip", "lamb", "lars-compiled", "lamb-fused"])
def test_layerwise_optimizers_train_through_the_config(tmp_path, name, extra):
    result = run(tmp_path, name, "--optim.name", name, "--optim.exclude_bn_bias", "true",
                 "--optim.base_lr", "4.0", "--run.trust_log_every", "4", *extra)
    assert math.isfinite(result.test.loss) and result.steps == 12
    state = load_checkpoint(tmp_path / name / "checkpoint.pt")["optimizer"]
    decay, no_decay = state["param_groups"]
    assert (decay["trust"], no_decay["trust"]) == (True, False)
    ratio_key = "local_lr" if name == "lars" else "trust_ratio"
    assert all(float(state["state"][i][ratio_key]) == 1.0 for i in no_decay["params"])
    assert any(float(state["state"][i][ratio_key]) != 1.0 for i in decay["params"])
    # Per-layer trust ratios are logged (every 100 steps by default; here every 4) for the trusted layers only.
    records = [r for r in read_metrics(tmp_path / name) if r["kind"] == "trust"]
    assert [r["step"] for r in records] == [4, 8, 12]
    layers = set(records[-1]) - {"kind", "step", "time"}
    assert "features.0.weight" in layers and not any("bias" in k or k.startswith("features.1.") for k in layers)


def train_records(run_dir):
    return [r["step"] for r in read_metrics(run_dir) if r["kind"] == "train"]


def test_resume_from_a_mid_epoch_checkpoint_is_bit_exact_and_records_each_step_once(tmp_path):
    """A crash after step 7 (simulated: the checkpoints after step 6 are removed, the records after it
    stay in metrics.jsonl) resumes from step 6, mid-epoch, and ends bit-equal to an uninterrupted run."""
    every = ["--run.checkpoint_every", "3", "--run.keep_checkpoints", "0", "--run.log_every", "1"]
    run(tmp_path, "straight", *every)
    run(tmp_path, "crashed", *every)
    for path in (tmp_path / "crashed").glob("checkpoint-*.pt"):
        if int(path.stem.split("-")[1]) > 6:
            path.unlink()
    result = run(tmp_path, "crashed", resume=True)
    assert result.resumed_from == tmp_path / "crashed" / "checkpoint-00000006.pt"
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "crashed" / "checkpoint.pt")
    for key, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][key]), key
    assert train_records(tmp_path / "crashed") == list(range(1, 13))


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    run(tmp_path, "r", "--run.stop_after_epochs", "2")
    newest = tmp_path / "r" / "checkpoint-00000008.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write, as a failing disk would leave
    result = run(tmp_path, "r", resume=True)
    assert result.resumed_from == tmp_path / "r" / "checkpoint-00000004.pt" and result.steps == 12
    err = capsys.readouterr().err
    assert str(newest) in err and "using an older checkpoint" in err


def test_resuming_a_finished_run_trains_and_writes_nothing(tmp_path):
    run(tmp_path, "done")
    files = {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()}
    result = run(tmp_path, "done", resume=True)
    assert result.already_finished and result.steps == 12 and result.test is None
    assert {p: p.read_bytes() for p in (tmp_path / "done").rglob("*") if p.is_file()} == files


class SignalAfterStep(Extension):
    """Sends this process `signum` (`times` times) right after optimizer step `step`, as a scheduler's notice
    or a user's Ctrl-C would arrive."""

    name = "signal_after_step"

    def __init__(self, signum, step, times=1):
        self.signum, self.step, self.times = signum, step, times

    def after_step(self, step, applied):
        if step + 1 == self.step:
            for _ in range(self.times):
                os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_resume_is_exact(tmp_path, signum):
    run(tmp_path, "straight")
    cfg = config(tmp_path, "--run.name", "stopped")
    handler_before = signal.getsignal(signum)
    result = largebatch.run(cfg, extensions=[SignalAfterStep(signum, 6)])
    assert signal.getsignal(signum) is handler_before  # the run's handlers are gone with it
    assert result.stopped_by == signal.Signals(signum).name and result.steps == 6
    assert result.checkpoint == tmp_path / "stopped" / "checkpoint-00000006.pt"  # mid-epoch (4 steps an epoch)
    assert read_metrics(tmp_path / "stopped")[-1]["signal"] == result.stopped_by
    run(tmp_path, "stopped", resume=True)
    a = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["model"]
    b = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_ctrl_c_stops_at_once_and_names_the_newest_checkpoint(tmp_path):
    cfg = config(tmp_path, "--run.name", "twice")
    with pytest.raises(RunInterrupted, match=r"stopped at once in step 6, .* the newest checkpoint is "
                       rf"{tmp_path / 'twice' / 'checkpoint-00000004.pt'}: continue with `largebatch train --resume "):
        largebatch.run(cfg, extensions=[SignalAfterStep(signal.SIGINT, 6, times=2)])
    assert [r["step"] for r in read_metrics(tmp_path / "twice") if r["kind"] == "train"] == [2, 4]  # step 6 never ended


def test_a_run_that_fails_before_its_first_checkpoint_leaves_no_directory(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, "early", "--optim.base_lr", "1e30", "--schedule.warmup_epochs", "0")
    assert not (tmp_path / "early").exists()
    # the same name can simply be used again, without --overwrite
    assert run(tmp_path, "early", "--schedule.epochs", "1").steps == 4


def test_samples_left_out_of_each_epoch_are_said(tmp_path, capsys):
    run(tmp_path, "r", "--data.synthetic_train", "250")
    plan = read_metrics(tmp_path / "r")[0]
    assert plan["kind"] == "plan" and (plan["train_samples"], plan["dropped_per_epoch"]) == (250, 58)
    assert "58 of 250 training samples are left out of every epoch" in capsys.readouterr().err


def test_a_resumed_run_reuses_the_image_check_of_unchanged_files(tmp_path, monkeypatch):
    from PIL import Image

    from largebatch import build

    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("a", "b"):
            (tmp_path / "images" / split / label).mkdir(parents=True)
            for i in range(8):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(
                    tmp_path / "images" / split / label / f"{i}.png")
    (tmp_path / "images" / "train" / "a" / "0.png").write_bytes(b"junk")
    checks = []
    monkeypatch.setattr(build, "unreadable_images", lambda paths, *a: checks.append(len(paths)) or
                        [(p, "junk") for p in paths if p.endswith("train/a/0.png")])
    folder = ["--data.source", "folder", "--data.path", str(tmp_path / "images"), "--data.image_size", "16",
              "--data.on_bad_image", "skip", "--data.global_batch", "5", "--data.micro_batch", "0",
              "--data.bn_batch", "0", "--data.augment", "none"]
    run(tmp_path, "r", *folder, "--run.stop_after_epochs", "1")
    assert checks == [32] and (tmp_path / "r" / "image_check.json").is_file()
    result = run(tmp_path, "r", resume=True)
    assert checks == [32] and result.steps == 6  # read from the record; 31 usable images: 6 steps of 5 an epoch
    changed = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
    Image.fromarray(changed).save(tmp_path / "images" / "val" / "b" / "7.png")  # a changed file: checked again
    run(tmp_path, "r", "--schedule.epochs", "4", resume=True)
    assert checks == [32, 32]


def test_a_run_without_checkpoints_keeps_its_records_when_it_fails(tmp_path):
    with pytest.raises(NonFiniteLossError):
        run(tmp_path, "nockpt", "--optim.base_lr", "1e30", "--schedule.warmup_epochs", "0", "--run.checkpoint", "false")
    assert [r["kind"] for r in read_metrics(tmp_path / "nockpt")][:2] == ["plan", "mlperf"]


def test_a_step_checkpoint_is_written_after_the_steps_record(tmp_path, monkeypatch):
    """A kill between the two must not leave a checkpoint that counts a step whose record was never written
    (the resume would drop nothing and the record would be missing for good)."""
    from largebatch.state import RunState

    seen = []
    save = RunState.save

    def checked_save(self, run_dir):
        if run_dir is not None:
            last = read_metrics(run_dir)[-1]
            seen.append((self.progress.step, last["kind"], last["step"]))
        return save(self, run_dir)

    monkeypatch.setattr(RunState, "save", checked_save)
    run(tmp_path, "r", "--run.checkpoint_every", "1", "--run.log_every", "1", "--schedule.epochs", "1")
    mid_epoch = [s for s in seen if s[0] % 4]
    assert mid_epoch == [(step, "train", step) for step in (1, 2, 3)]
