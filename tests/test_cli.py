"""The command line: help, recipe listing, and bad input reported in one line with nothing half-written."""

import re
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch
from PIL import Image

from largebatch.cli import main
from largebatch.checkpoint import load_checkpoint
from multiproc import base_env, run_python

QUICK = ["--recipe", "fmnist_goyal", "--data.source", "synthetic", "--data.synthetic_shape", "1,8,8", "--data.synthetic_train", "64",
         "--data.synthetic_test", "16", "--data.global_batch", "32", "--data.bn_batch", "8",
         "--schedule.epochs", "1", "--schedule.warmup_epochs", "0", "--run.progress", "false"]


def test_help_and_module_entry_point():
    for argv in (["--help"], ["train", "--help"], ["eval", "--help"]):
        out = run_python(["-m", "largebatch", *argv]).stdout
        assert "usage: largebatch" in out


def test_recipes_lists_one_line_each(capsys):
    assert main(["recipes"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("goyal2017 ") for line in lines)
    assert any(line.startswith("fmnist_fast ") and line.endswith("(default)") for line in lines)


def error_of(capsys, argv):
    assert main(argv) == 2
    return capsys.readouterr().err


def test_unknown_recipe(capsys, tmp_path):
    err = error_of(capsys, ["train", "--recipe", "nope", "--run.out_dir", str(tmp_path)])
    assert "unknown recipe 'nope'" in err and "goyal2017" in err
    assert not any(tmp_path.iterdir())


def test_bad_field_creates_no_run_directory(capsys, tmp_path):
    err = error_of(capsys, ["train", *QUICK, "--optim.sgd.momentum", "2", "--run.out_dir", str(tmp_path)])
    assert "optim.sgd.momentum = 2.0" in err
    assert not any(tmp_path.iterdir())


def test_batch_that_does_not_divide_the_launched_world(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    err = error_of(capsys, ["train", *QUICK, "--run.out_dir", str(tmp_path)])
    assert "does not divide over 3 workers" in err and "30 or 33" in err


def test_missing_dataset_path(capsys, tmp_path):
    err = error_of(capsys, ["train", "--data.source", "npz", "--data.path", str(tmp_path / "none.npz"),
                            "--run.out_dir", str(tmp_path)])
    assert "none.npz" in err and "does not exist" in err


def test_existing_run_directory_is_refused_unless_resume_or_overwrite(capsys, tmp_path):
    argv = ["train", *QUICK, "--run.out_dir", str(tmp_path), "--run.name", "r"]
    assert main(argv) == 0
    capsys.readouterr()
    assert "already exists" in error_of(capsys, argv)
    assert main([*argv, "--overwrite"]) == 0
    assert main(["train", "--resume", str(tmp_path / "r"), "--schedule.epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "after 2 epochs" in out


def test_resume_of_a_directory_without_a_run(capsys, tmp_path):
    assert "holds no config.toml of an earlier run" in error_of(capsys, ["train", "--resume", str(tmp_path)])


def test_unreadable_image_is_named(capsys, tmp_path):
    root = tmp_path / "images"
    for split in ("train", "val"):
        for label in ("a", "b"):
            (root / split / label).mkdir(parents=True)
            for i in range(8):
                Image.new("RGB", (8, 8), (40 * i, 0, 0) if label == "a" else (0, 40 * i, 0)).save(
                    root / split / label / f"{i}.png")
    bad = root / "train" / "b" / "3.png"
    bad.write_bytes(b"not a png at all")
    err = error_of(capsys, ["train", *QUICK, "--data.source", "folder", "--data.path", str(root),
                            "--data.augment", "none", "--model.name", "small_cnn", "--data.global_batch", "16",
                            "--run.out_dir", str(tmp_path / "runs")])
    assert str(bad) in err


def test_corrupt_checkpoint_is_named(capsys, tmp_path):
    argv = ["train", *QUICK, "--run.out_dir", str(tmp_path), "--run.name", "r"]
    assert main(argv) == 0
    newest = tmp_path / "r" / "checkpoint-00000002.pt"
    assert (tmp_path / "r" / "checkpoint.pt").resolve() == newest
    newest.write_bytes(b"garbage")
    err = error_of(capsys, ["eval", str(tmp_path / "r")])
    assert str(newest) in err and "corrupt" in err


class Payload:
    def __reduce__(self):
        return (print, ("the payload ran",))


def test_pickle_payload_checkpoint_is_refused_without_unsafe_advice(capsys, tmp_path):
    argv = ["train", *QUICK, "--run.out_dir", str(tmp_path), "--run.name", "r"]
    assert main(argv) == 0
    newest = tmp_path / "r" / "checkpoint-00000002.pt"
    torch.save({"format": 1, "model": Payload()}, newest)
    capsys.readouterr()
    err = error_of(capsys, ["eval", str(tmp_path / "r")])
    assert str(newest) in err and "never loaded" in err
    assert "the payload ran" not in capsys.readouterr().out
    assert "weights_only" not in err and "unsafe" not in err.lower() and "trust" not in err.lower()


TORCH_BLOCKED = "import sys; sys.modules['torch'] = None; from largebatch.cli import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("argv, expected", [
    (["recipes"], "fmnist_goyal"),
    (["train", "--help"], "--optim.lars.trust_coefficient"),
    (["eval", "--help"], "usage: largebatch eval"),
    (["config", "--help"], "--run.on_nonfinite"),
    (["config", "--recipe", "goyal2017", "--data.path", "/imagenet", "--world-size", "256"], "peak lr 3.2 "),
])
def test_listing_help_and_config_need_no_torch(argv, expected):
    assert expected in run_python(["-c", TORCH_BLOCKED, *argv]).stdout


def test_the_torch_block_is_real():
    result = run_python(["-c", TORCH_BLOCKED.replace("from largebatch.cli", "import torch; from largebatch.cli")],
                        check=False)
    assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr


def test_train_help_lists_every_field_with_default_and_allowed_values():
    out = run_python(["-m", "largebatch", "train", "--help"]).stdout
    assert "--optim.scaling" in out and "[linear, sqrt, none]" in out
    assert "--data.global_batch" in out and "[>= 1]" in out
    for section in ("[data]", "[model]", "[optim]", "[optim.sgd]", "[optim.lars]", "[optim.lamb]", "[schedule]",
                    "[dist]", "[run]"):
        assert section in out


def test_config_prints_resolved_toml_and_derived_plan(capsys):
    assert main(["config", "--data.global_batch", "4096", "--optim.sgd.nesterov", "true", "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    tree = tomllib.loads(out)  # the derived lines are TOML comments: the output is a valid recipe
    assert tree["recipe"] == "fmnist_fast" and tree["data"]["global_batch"] == 4096  # the default recipe
    assert tree["optim"]["sgd"]["nesterov"] is True
    assert "2 workers x 16 micro-batches x 128 samples" in out and "peak lr 0.8 " in out


def test_train_without_a_recipe_trains_the_default_job(capsys, tmp_path):
    """fmnist_fast, on synthetic data for two steps: K-FAC in front of SGD, precision 'auto' as this CPU resolves it."""
    from largebatch.metrics import read_metrics
    from largebatch.precision import native_bf16

    argv = ["train", *QUICK[2:], "--run.max_steps", "2", "--run.log_every", "1", "--run.out_dir", str(tmp_path),
            "--run.name", "r"]
    assert QUICK[:2] == ["--recipe", "fmnist_goyal"] and main(argv) == 0
    saved = tomllib.loads((tmp_path / "r" / "config.toml").read_text())
    assert saved["recipe"] == "fmnist_fast" and saved["optim"]["preconditioner"] == "kfac"
    records = read_metrics(tmp_path / "r")
    plan = next(r for r in records if r["kind"] == "plan")
    assert plan["precision"] == ("bf16" if native_bf16(torch.device("cpu")) else "fp32")
    assert [r["step"] for r in records if r["kind"] == "train" and "kfac_nu" in r] == [1, 2]


def test_gns_and_bench_comm_default_to_the_plain_sgd_recipe():
    """The noise scale and the all-reduce are measured on plain SGD's gradients, not the default job's K-FAC."""
    from largebatch import recipes
    from largebatch.cli import build_parser

    parser = build_parser()
    assert recipes.SGD_RECIPE == "fmnist_goyal" != recipes.DEFAULT_RECIPE
    assert parser.parse_args(["gns"]).recipe == recipes.SGD_RECIPE
    assert parser.parse_args(["bench", "comm"]).recipe == recipes.SGD_RECIPE
    assert parser.parse_args(["train"]).recipe == recipes.DEFAULT_RECIPE


def test_fp16_without_a_gpu_is_a_one_line_error_before_the_run_directory(capsys, tmp_path):
    err = error_of(capsys, ["train", *QUICK, "--run.precision", "fp16", "--run.out_dir", str(tmp_path)])
    assert "run.precision = 'fp16' needs a GPU" in err and "Traceback" not in err
    assert not any(tmp_path.iterdir())
    err = error_of(capsys, ["train", *QUICK, "--dist.device", "cuda", "--run.out_dir", str(tmp_path)])
    assert "no CUDA device" in err and not any(tmp_path.iterdir())


def test_resume_with_overrides_becomes_the_runs_config(capsys, tmp_path):
    run_dir = tmp_path / "r"
    assert main(["train", *QUICK, "--run.out_dir", str(tmp_path), "--run.name", "r"]) == 0
    assert main(["train", "--resume", str(run_dir), "--schedule.epochs", "3", "--run.stop_after_epochs", "1"]) == 0
    assert "after 2 epochs" in capsys.readouterr().out
    assert tomllib.loads((run_dir / "config.toml").read_text())["schedule"]["epochs"] == 3.0
    assert tomllib.loads((run_dir / "config.0.toml").read_text())["schedule"]["epochs"] == 1.0
    assert main(["train", "--resume", str(run_dir)]) == 0  # no flags: continues the same run to 3 epochs
    assert "after 3 epochs" in capsys.readouterr().out
    assert not (run_dir / "config.1.toml").exists()  # nothing changed this time


def test_skipped_steps_and_a_finished_run_are_said(capsys, tmp_path):
    argv = ["train", *QUICK, "--optim.base_lr", "1e30", "--run.on_nonfinite", "skip", "--run.out_dir", str(tmp_path),
            "--run.name", "r"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert re.search(r"warning: \d+ of 2 steps were skipped for a non-finite loss", out)
    assert main(["train", "--resume", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "already finished" in out and "nothing was trained or written" in out


def test_sigterm_checkpoints_and_says_how_to_resume(tmp_path):
    argv = [sys.executable, "-m", "largebatch", "train", "--recipe", "fmnist_goyal", "--data.source", "synthetic", "--data.synthetic_shape",
            "1,32,32", "--data.synthetic_train", "2048", "--data.synthetic_test", "16", "--data.global_batch", "32",
            "--data.bn_batch", "8", "--schedule.epochs", "3", "--schedule.warmup_epochs", "0", "--run.progress",
            "false", "--run.log_every", "1", "--run.out_dir", str(tmp_path), "--run.name", "r"]
    proc = subprocess.Popen(argv, env=base_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "r" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().count('"kind": "train"') >= 3):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, out + err
    stopped = re.search(r"stopped by SIGTERM after step (\d+): checkpoint (\S+); continue with "
                        r"`largebatch train --resume (\S+)`", out)
    assert stopped, out + err
    step, path = int(stopped.group(1)), Path(stopped.group(2))
    assert 3 <= step < 64 * 3 and path == tmp_path / "r" / f"checkpoint-{step:08d}.pt"
    assert load_checkpoint(path)["progress"]["step"] == step


def test_a_second_ctrl_c_is_said_in_one_line_with_the_trainers_words(capsys, monkeypatch):
    """The trainer's words (tested in test_train) reach the screen as one line, exit status 130."""
    from largebatch import cli
    from largebatch.errors import RunInterrupted

    def interrupted(*args, **kwargs):
        raise RunInterrupted("stopped at once in step 6; the newest checkpoint is X")

    monkeypatch.setattr(cli, "run", interrupted)
    assert main(["train", "--data.source", "synthetic"]) == 130
    assert capsys.readouterr().err == ("largebatch train: interrupted (a second Ctrl-C): stopped at once in step 6; "
                                       "the newest checkpoint is X\n")


def test_gns_trains_briefly_and_prints_the_logged_critical_batch_estimate(capsys, tmp_path):
    """One process and a recipe without accumulation: the command picks a smaller micro-batch itself."""
    from largebatch.metrics import read_metrics

    assert main(["gns", "--steps", "6", *QUICK, "--schedule.epochs", "4", "--data.micro_batch", "0",
                 "--run.out_dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    run_dir = Path(out.strip().splitlines()[-1].removeprefix("run directory: "))
    records = [r for r in read_metrics(run_dir) if r["kind"] == "train"]
    assert [r["step"] for r in records] == list(range(1, 7))
    plan = next(r for r in read_metrics(run_dir) if r["kind"] == "plan")
    assert (plan["micro_batch"], plan["accum_steps"]) == (16, 2)
    assert f"B_simple ~ {records[-1]['gns_b_simple']:.0f} after 6 steps" in out
    assert "small batch 16, big batch 32" in out
