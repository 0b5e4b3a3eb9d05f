"""`largebatch sweep`: the grid, the runner (skip, resume after Ctrl-C and after SIGKILL), the results
and figures, and the numbers they are read by, checked by hand."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tomli_w
import torch

from largebatch import load_config
from largebatch.checkpoint import checkpoint_step, checkpoints_in, load_latest
from largebatch.config import config_to_dict
from largebatch.errors import ConfigError
from largebatch.metrics import read_metrics
from largebatch.sweep.analysis import bend, largest_batch_within, mean_std, scaling_efficiencies, steps_to_target
from largebatch.sweep.command import add_sweep_command
from largebatch.sweep.figures import FIGURE_NAMES
from largebatch.sweep.grid import load_grid, plan_runs
from largebatch.sweep.results import build_report, write_json
from largebatch.sweep.status import config_changes
from tests.multiproc import base_env

pytestmark = pytest.mark.usefixtures("one_thread")

# 2 methods x 2 batches x 1 seed of a tiny synthetic problem: 2 epochs of 32 or 16 steps, a checkpoint after
# each step.
GRID = """\
[sweep]
name = "tiny"
out_dir = "{out_dir}"
batches = [32, 64]
seeds = [0]
target_accuracy = 0.5

[sweep.overrides]
data.source = "synthetic"
data.synthetic_shape = [1, 16, 16]
data.synthetic_train = 1024
data.synthetic_test = 64
data.micro_batch = 32
data.bn_batch = 16
data.augment = "none"
data.eval_batch = 64
"schedule.epochs" = 2
"schedule.warmup_epochs" = 0.5
"run.log_every" = 1
"run.threads" = 1
"run.checkpoint_every" = 1

[[method]]
name = "sgd"
recipe = "fmnist_goyal"

[[method]]
name = "noscale"
recipe = "fmnist_goyal"
[method.overrides]
"optim.scaling" = "none"
"""
RUN_NAMES = ["sgd-b32-s0", "sgd-b64-s0", "noscale-b32-s0", "noscale-b64-s0"]
TOTAL_STEPS = {"sgd-b32-s0": 64, "sgd-b64-s0": 32, "noscale-b32-s0": 64, "noscale-b64-s0": 32}

# `largebatch sweep ARGS` in a process of its own, as the CLI would run it.
SWEEP_MAIN = """\
import argparse, sys
from largebatch.sweep.command import add_sweep_command
parser = argparse.ArgumentParser(prog="largebatch")
add_sweep_command(parser.add_subparsers(dest="command", required=True))
args, extra = parser.parse_known_args(sys.argv[1:])
sys.exit(args.func(args, extra))
"""


def sweep(*argv: str) -> int:
    """`largebatch sweep ARGV` in this process; its exit status."""
    parser = argparse.ArgumentParser(prog="largebatch")
    add_sweep_command(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["sweep", *argv])
    return args.func(args, extra)


def write_grid(directory: Path, text: str = GRID) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "grid.toml"
    path.write_text(text.format(out_dir=directory / "out"))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, Path, str]:
    """The tiny grid swept once, uninterrupted: (grid file, sweep directory, what it printed)."""
    directory = tmp_path_factory.mktemp("reference")
    grid = write_grid(directory)
    with contextlib.redirect_stdout(io.StringIO()) as out:  # capsys is per test
        assert sweep(str(grid)) == 0
    return grid, directory / "out" / "tiny", out.getvalue()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


# ---------------------------------------------------------------------------------------------------
# The numbers, by hand.


def test_steps_to_target_by_hand():
    records = [{"kind": "plan", "step": 0, "steps_per_epoch": 10},
               {"kind": "train", "step": 10, "loss": 2.0},
               {"kind": "epoch", "step": 10, "epoch": 1, "test_accuracy": 0.40},
               {"kind": "epoch", "step": 20, "epoch": 2, "test_accuracy": 0.75},
               {"kind": "epoch", "step": 30, "epoch": 3, "test_accuracy": 0.70},
               {"kind": "epoch", "step": 40, "epoch": 4, "test_accuracy": 0.90}]
    assert steps_to_target(records, 0.40) == 10  # at or above: equal counts
    assert steps_to_target(records, 0.70) == 20  # the first evaluation above, not the first of a streak
    assert steps_to_target(records, 0.80) == 40
    assert steps_to_target(records, 0.95) is None  # never reached
    assert steps_to_target([], 0.5) is None


def test_mean_std_and_batch_within_one_point_by_hand():
    mean, std = mean_std([0.90, 0.92, 0.94])
    assert mean == pytest.approx(0.92) and std == pytest.approx(0.02)  # sample std: sqrt((4e-4 + 0 + 4e-4) / 2)
    assert mean_std([0.9]) == (0.9, None)
    accuracy = {256: 0.910, 1024: 0.905, 4096: 0.899, 8192: 0.85}
    assert largest_batch_within(accuracy, base=0.910) == 1024  # 4096 is 1.1 points below
    assert largest_batch_within(accuracy, base=0.905) == 4096
    assert largest_batch_within({256: 0.5}, base=0.9) is None


def test_scaling_efficiency_and_bend_by_hand():
    steps = {256: 1000.0, 512: 520.0, 1024: 300.0, 2048: 280.0}
    efficiencies = scaling_efficiencies(steps)
    assert [(e.small, e.large) for e in efficiencies] == [(256, 512), (512, 1024), (1024, 2048)]
    # (1000/520)/2 = 0.9615, (520/300)/2 = 0.8667, (300/280)/2 = 0.5357
    assert [e.efficiency for e in efficiencies] == pytest.approx([0.961538, 0.866667, 0.535714], abs=1e-6)
    assert [e.per_doubling for e in efficiencies] == pytest.approx([e.efficiency for e in efficiencies])
    assert bend(steps) == 1024
    # x4 apart: (1000/400)/4 = 0.625 over two doublings, sqrt = 0.79 each: kept; (400/300)/4 = 0.333, sqrt 0.577: not
    spaced = {256: 1000.0, 1024: 400.0, 4096: 300.0}
    assert [e.per_doubling for e in scaling_efficiencies(spaced)] == pytest.approx([0.790569, 0.577350], abs=1e-6)
    assert bend(spaced) == 1024
    assert bend({256: 1000.0, 512: 900.0, 1024: 450.0}) == 256  # the first doubling keeps 55.6%
    assert bend({256: 1000.0, 512: 500.0, 1024: None}) == 512  # 1024 never reached the target
    assert bend({256: None, 512: 500.0}) is None
    assert scaling_efficiencies({256: 1000.0, 512: None})[0].efficiency is None
    assert bend({256: 1000.0, 512: 500.0, 1024: 250.0}) == 1024  # perfect scaling all the way


def write_run(spec, evaluations: list[tuple[int, float]]) -> None:
    """A finished run's metrics.jsonl by hand: an evaluation (step, test accuracy) at each epoch end."""
    spec.run_dir.mkdir(parents=True)
    records = [{"kind": "epoch", "step": step, "epoch": epoch, "test_accuracy": accuracy, "test_loss": 1 - accuracy}
               for epoch, (step, accuracy) in enumerate(evaluations, 1)]
    records.append({"kind": "mlperf", "key": "run_final", "step": evaluations[-1][0], "wall_s": 10.0})
    (spec.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def test_results_from_hand_made_runs(tmp_path):
    grid_file = tmp_path / "grid.toml"
    grid_file.write_text(f"""\
[sweep]
out_dir = "{tmp_path / 'out'}"
batches = [4096, 256, 1024]
seeds = [0, 1]
target_accuracy = 0.9
baseline = "a"
[[method]]
name = "a"
recipe = "fmnist_goyal"
[[method]]
name = "b"
recipe = "fmnist_goyal"
""")
    grid = load_grid(str(grid_file))
    runs = {(spec.method, spec.batch, spec.seed): spec for spec in plan_runs(grid)}
    curves = {("a", 256, 0): [(500, 0.85), (1000, 0.90)], ("a", 256, 1): [(600, 0.88), (1200, 0.92)],
              ("a", 1024, 0): [(150, 0.89), (300, 0.91)], ("a", 1024, 1): [(150, 0.88), (300, 0.90)],
              ("a", 4096, 0): [(250, 0.90)], ("a", 4096, 1): [(250, 0.85)],
              ("b", 256, 0): [(1000, 0.905)], ("b", 256, 1): [(1000, 0.905)],
              ("b", 1024, 0): [(300, 0.90)], ("b", 1024, 1): [(300, 0.90)], ("b", 4096, 0): [(250, 0.85)]}
    for key, curve in curves.items():
        write_run(runs[key], curve)
    report = build_report(grid, [(spec, None if key in curves else "new") for key, spec in runs.items()])

    assert report.missing == ("b b=4096 seed 1 (new)",)
    a256, a1024, a4096 = report.rows[:3]
    assert (a256.batch, a256.seeds) == (256, (0, 1))
    assert a256.accuracy == pytest.approx(0.91) and a256.accuracy_std == pytest.approx(0.02 / 2 ** 0.5)  # sample std
    assert (a256.steps_to_target, a256.epochs_to_target, a256.reached) == (1100, 2, 2)  # 1000 and 1200
    assert (a4096.steps_to_target, a4096.reached) == (250, 1)  # seed 1 never reached 90%
    assert report.rows[-1].seeds == (0,) and report.rows[-1].accuracy_std is None
    a, b = report.series
    # a: 256 -> 1024 (1100/300)/4 = 0.917, per doubling 0.957; 1024 -> 4096 (300/250)/4 = 0.3, per doubling 0.548
    assert [e.efficiency for e in a.efficiencies] == pytest.approx([1100 / 300 / 4, 300 / 250 / 4])
    assert a.bend == 1024
    assert a.base_accuracy == pytest.approx(0.91) and a.largest_batch_within == 1024  # 4096: 0.875
    # b is compared with a at 256 (the baseline): 0.905 and 0.90 are within a point of 0.91, 0.85 is not
    assert (b.base_series, b.base_accuracy) == ("a", pytest.approx(0.91)) and b.largest_batch_within == 1024
    assert b.bend == 1024  # (1000/300)/4 = 0.83, per doubling 0.91; then 4096 never reached 90%


def test_vary_crosses_every_run_and_names_its_directory(tmp_path):
    text = GRID.replace("[[method]]", '[sweep.vary]\n"optim.base_lr" = [0.05, 0.2]\n\n[[method]]', 1)
    runs = plan_runs(load_grid(str(write_grid(tmp_path, text))))
    assert [spec.run_dir.name for spec in runs[:4]] == [
        "sgd-b32-s0-optim.base_lr=0.05", "sgd-b64-s0-optim.base_lr=0.05",
        "sgd-b32-s0-optim.base_lr=0.2", "sgd-b64-s0-optim.base_lr=0.2"]
    assert len(runs) == 8 and [spec.config.optim.base_lr for spec in runs[:4]] == [0.05, 0.05, 0.2, 0.2]
    assert runs[2].series == "sgd optim.base_lr=0.2" and runs[2].config.data.global_batch == 32
    with pytest.raises(ConfigError, match="two runs would share the directory"):
        plan_runs(load_grid(str(write_grid(tmp_path, text.replace("[0.05, 0.2]", "[0.05, 0.05]")))))


def test_a_method_seeds_replace_the_sweep_seeds_for_that_method_only(tmp_path):
    text = GRID.replace('name = "noscale"\nrecipe = "fmnist_goyal"\n', 'name = "noscale"\nrecipe = "fmnist_goyal"\nseeds = [0, 7]\n')
    grid = load_grid(str(write_grid(tmp_path, text)))
    runs = plan_runs(grid)
    assert [(spec.method, spec.batch, spec.seed, spec.config.run.seed) for spec in runs] == [
        ("sgd", 32, 0, 0), ("sgd", 64, 0, 0),
        ("noscale", 32, 0, 0), ("noscale", 32, 7, 7), ("noscale", 64, 0, 0), ("noscale", 64, 7, 7)]
    assert runs[3].run_dir.name == "noscale-b32-s7"
    document = json.loads(write_json(build_report(grid, [(spec, "new") for spec in runs]), tmp_path / "r.json")
                          .read_text())
    assert document["grid"]["method_seeds"] == {"noscale": [0, 7]}


# ---------------------------------------------------------------------------------------------------
# A bad grid fails before anything is written.


@pytest.mark.parametrize("edit, message", [
    (("seeds = [0]", "seeds = [0]\nbatchs = [128]"), "[sweep]: unknown key 'batchs'"),
    (('recipe = "fmnist_goyal"\n\n', 'recipe = "fmnist_goyal"\nrecipes = "x"\n\n'),
     "[[method]] #1: unknown key 'recipes'"),
    (('"optim.scaling" = "none"', '"optim.scaling" = "cubic"'), "method 'noscale', batch 32: optim.scaling = 'cubic'"),
    (('"optim.scaling" = "none"', '"optim.scalng" = "none"'), "method 'noscale', batch 32: unknown field optim.scalng"),
    (("batches = [32, 64]", "batches = [32, 48]"), "method 'sgd', batch 48: data.micro_batch = 32 does not divide"),
    (('"run.threads" = 1', '"run.seed" = 3'), "[sweep.overrides]: run.seed is set by [sweep] seeds"),
    (("target_accuracy = 0.5", "target_accuracy = 50"), "[sweep] target_accuracy = 50"),
    (('name = "sgd"\n', 'name = "sgd"\nseeds = [1, 1]\n'), "[[method]] 'sgd' seeds = [1, 1]: each value once"),
    (('name = "sgd"\n', 'name = "sgd"\nseeds = []\n'), "[[method]] 'sgd' seeds = []: expected a non-empty list"),
])
def test_bad_grid_fails_before_any_run_directory(tmp_path, edit, message):
    old, new = edit
    assert GRID.count(old) == 1
    grid = write_grid(tmp_path, GRID.replace(old, new))
    with pytest.raises(ConfigError) as error:
        sweep(str(grid))
    assert message in str(error.value)
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_runs_and_trains_nothing(tmp_path, capsys):
    grid = write_grid(tmp_path)
    assert sweep(str(grid), "--dry-run", "--only", "noscale") == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"[1/2] noscale b=32 seed 0: new  {tmp_path / 'out/tiny/noscale-b32-s0'}",
                     f"[2/2] noscale b=64 seed 0: new  {tmp_path / 'out/tiny/noscale-b64-s0'}"]
    assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="--only lars: the grid's methods are sgd, noscale"):
        sweep(str(grid), "--dry-run", "--only", "lars")
    assert sweep(str(grid), "--dry-run", "--batches", "64") == 0
    assert capsys.readouterr().out.splitlines() == [
        f"[1/2] sgd b=64 seed 0: new  {tmp_path / 'out/tiny/sgd-b64-s0'}",
        f"[2/2] noscale b=64 seed 0: new  {tmp_path / 'out/tiny/noscale-b64-s0'}"]
    with pytest.raises(ConfigError, match="--batches 48: the grid's batches are 32, 64"):
        sweep(str(grid), "--dry-run", "--batches", "48")


@pytest.mark.parametrize("grid", ["quick", *(str(Path(__file__).parents[1] / "docs/results" / name)
                                   for name in ("fashion_mnist.toml", "fashion_mnist_ramp.toml"))])
def test_the_shipped_and_the_results_page_grids_plan(grid):
    """Every run of the grids the README names is a valid config on one process (nothing runs)."""
    from largebatch.sweep.grid import load_grid, plan_runs

    runs = plan_runs(load_grid(grid))
    assert runs and len({run.run_dir for run in runs}) == len(runs)


# ---------------------------------------------------------------------------------------------------
# A sweep, its results, and running it again.


def test_sweep_writes_the_table_json_and_three_figures(reference):
    _, sweep_dir, out = reference
    progress = [line for line in out.splitlines() if line.startswith("[")]
    assert [line.split(":")[0] for line in progress] == ["[1/4] sgd b=32 seed 0", "[2/4] sgd b=64 seed 0",
                                                         "[3/4] noscale b=32 seed 0", "[4/4] noscale b=64 seed 0"]
    for line, name in zip(progress, RUN_NAMES):
        assert f"after 2 epochs, {TOTAL_STEPS[name]} steps" in line
    results = json.loads((sweep_dir / "results.json").read_text())
    assert results["missing"] == []
    assert [(r["series"], r["batch"], r["seeds"]) for r in results["rows"]] == [
        ("sgd", 32, [0]), ("sgd", 64, [0]), ("noscale", 32, [0]), ("noscale", 64, [0])]
    for row, name in zip(results["rows"], RUN_NAMES):
        records = read_metrics(sweep_dir / name)
        final = [r for r in records if r["kind"] == "epoch"][-1]
        assert row["accuracy"] == final["test_accuracy"] and row["accuracy_std"] is None  # one seed
        assert row["steps_to_target"] == steps_to_target(records, 0.5)
        assert row["epochs_to_target"] == next(r["epoch"] for r in records if r["step"] == row["steps_to_target"]
                                               and r["kind"] == "epoch")
        assert row["epochs"] == 2
    assert [s["series"] for s in results["series"]] == ["sgd", "noscale"]
    assert all(s["base_batch"] == 32 and len(s["efficiencies"]) == 1 for s in results["series"])
    table = (sweep_dir / "results.md").read_text()
    assert "| method | batch | seeds | final accuracy (%) | steps to 50% |" in table
    assert "| sgd | 32 | 0 |" in table and "| noscale | 64 | 0 |" in table
    assert table in out  # the same table is printed
    for name in FIGURE_NAMES:
        assert png_size(sweep_dir / name) == (800, 500)


def test_running_again_skips_the_finished_runs(reference, capsys):
    grid, sweep_dir, _ = reference
    before = {name: ((sweep_dir / name / "metrics.jsonl").stat().st_mtime_ns,
                     (sweep_dir / name / "metrics.jsonl").read_bytes()) for name in RUN_NAMES}
    assert sweep(str(grid)) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("[")] == [
        "[1/4] sgd b=32 seed 0: skipped (done)", "[2/4] sgd b=64 seed 0: skipped (done)",
        "[3/4] noscale b=32 seed 0: skipped (done)", "[4/4] noscale b=64 seed 0: skipped (done)"]
    assert not any(line.startswith("epoch ") for line in out.splitlines())  # no epoch was trained
    assert before == {name: ((sweep_dir / name / "metrics.jsonl").stat().st_mtime_ns,
                             (sweep_dir / name / "metrics.jsonl").read_bytes()) for name in RUN_NAMES}


def test_a_grid_changed_under_finished_runs_is_refused(reference, tmp_path):
    grid, sweep_dir, _ = reference
    changed = tmp_path / "grid.toml"
    changed.write_text(grid.read_text().replace('"schedule.epochs" = 2', '"schedule.epochs" = 3'))
    with pytest.raises(ConfigError, match=r"sgd-b32-s0: schedule.epochs: 2.0 -> 3.0"):
        sweep(str(changed))
    assert all(len(read_metrics(sweep_dir / name)) for name in RUN_NAMES)


def test_a_field_added_since_a_run_was_made_counts_as_its_default(tmp_path):
    wanted = config_to_dict(load_config("fmnist_goyal"))
    saved = config_to_dict(load_config("fmnist_goyal"))
    del saved["run"]["stop_at_target"]  # a config.toml written before the field existed
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(saved))
    assert config_changes(path, wanted) == ()
    wanted["run"]["stop_at_target"], wanted["schedule"]["epochs"] = True, 3.0
    assert config_changes(path, wanted) == ("run.stop_at_target: False -> True", "schedule.epochs: 9.0 -> 3.0")


# ---------------------------------------------------------------------------------------------------
# Stopped by Ctrl-C, then killed: the same command continues, and the runs end as if never stopped.


def start_sweep(grid: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", SWEEP_MAIN, "sweep", str(grid)], env=base_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def signal_mid_run(process: subprocess.Popen, run_dir: Path, signum: int, timeout: float = 60) -> None:
    """Send `signum` while `run_dir`'s run is in its first half, past a checkpoint whose step is recorded.

    The process is frozen (SIGSTOP) to look at its directory: a kill between a step's checkpoint and its
    train record (train.py saves first) would leave that step with no record after the resume."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        process.send_signal(signal.SIGSTOP)
        newest = checkpoints_in(run_dir) if run_dir.is_dir() else []
        step = checkpoint_step(newest[0]) if newest else None
        if step and step < TOTAL_STEPS[run_dir.name] // 2 and step in recorded_train_steps(run_dir):
            process.send_signal(signum)
            process.send_signal(signal.SIGCONT)
            return
        process.send_signal(signal.SIGCONT)
        time.sleep(0.002)
    process.kill()
    raise AssertionError(f"no checkpoint in {run_dir} before the sweep ended:\n{process.communicate()[0]}")


def recorded_train_steps(run_dir: Path) -> set[int]:
    """The steps of the train records in metrics.jsonl so far (complete lines only)."""
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().split("\n")[:-1] if path.is_file() else []
    return {record["step"] for record in map(json.loads, lines) if record["kind"] == "train"}


def finished(run_dir: Path) -> bool:
    return any(r["kind"] == "mlperf" and r["key"] == "run_final" for r in read_metrics(run_dir))


def test_a_stopped_and_a_killed_sweep_continue_to_the_same_results(reference, tmp_path, capsys):
    _, reference_dir, _ = reference
    grid = write_grid(tmp_path)
    sweep_dir = tmp_path / "out" / "tiny"

    # Ctrl-C in run 2: it checkpoints, and the sweep ends there.
    process = start_sweep(grid)
    signal_mid_run(process, sweep_dir / RUN_NAMES[1], signal.SIGINT)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == 128 + signal.SIGINT, out
    assert "[2/4] sgd b=64 seed 0: stopped by SIGINT after step" in out
    assert finished(sweep_dir / RUN_NAMES[0]) and not finished(sweep_dir / RUN_NAMES[1])
    assert not (sweep_dir / RUN_NAMES[2]).exists()

    # SIGKILL in run 3, after run 2 was resumed and finished.
    process = start_sweep(grid)
    signal_mid_run(process, sweep_dir / RUN_NAMES[2], signal.SIGKILL)
    out = process.communicate(timeout=60)[0]
    assert process.returncode == -signal.SIGKILL
    assert "[1/4] sgd b=32 seed 0: skipped (done)" in out
    assert "[2/4] sgd b=64 seed 0: " in out and "(resumed from step" in out
    assert not finished(sweep_dir / RUN_NAMES[2]) and checkpoints_in(sweep_dir / RUN_NAMES[2])

    assert sweep(str(grid)) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[")]
    assert lines[:2] == ["[1/4] sgd b=32 seed 0: skipped (done)", "[2/4] sgd b=64 seed 0: skipped (done)"]
    assert lines[2].startswith("[3/4] noscale b=32 seed 0: ") and "(resumed from step" in lines[2]
    assert lines[3].startswith("[4/4] noscale b=64 seed 0: ") and "resumed" not in lines[3]

    for name, sessions in zip(RUN_NAMES, [1, 2, 2, 1]):
        records, expected = read_metrics(sweep_dir / name), read_metrics(reference_dir / name)
        starts = [r["step"] for r in records if r["kind"] == "mlperf" and r["key"] == "run_start"]
        assert len(starts) == sessions and starts[0] == 0 and all(starts[1:]), f"{name}: sessions from {starts}"
        train = [(r["step"], r["loss"], r["lr"]) for r in records if r["kind"] == "train"]
        assert [step for step, _, _ in train] == list(range(1, TOTAL_STEPS[name] + 1))  # each step once
        assert train == [(r["step"], r["loss"], r["lr"]) for r in expected if r["kind"] == "train"]
        assert ([(r["step"], r["test_accuracy"], r["test_loss"]) for r in records if r["kind"] == "epoch"]
                == [(r["step"], r["test_accuracy"], r["test_loss"]) for r in expected if r["kind"] == "epoch"])
        model = load_latest(sweep_dir / name)[1]["model"]
        for key, tensor in load_latest(reference_dir / name)[1]["model"].items():
            assert torch.equal(model[key], tensor), f"{name}: {key} differs from the uninterrupted run"

    def rows(directory: Path) -> list[dict]:
        return [{k: v for k, v in row.items() if k != "wall_s"}
                for row in json.loads((directory / "results.json").read_text())["rows"]]

    assert rows(sweep_dir) == rows(reference_dir)
