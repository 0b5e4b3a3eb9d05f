"""`largebatch report`: figures and summary of real run directories.

Two tiny synthetic runs are trained once per module (LARS at batch 64 with trust ratios, a target
accuracy and gradient clipping; SGD at batch 128 with the gradient noise scale), so that the report
overlays runs of different batch sizes and has quantities that only one run records. The figures are
checked twice: as data (`plan_figures`: every run's series, with the values of its records) and as
files (valid PNGs of 800 x 500). Hand-edited copies of the runs cover what training does not make
here: a gradient noise scale, an unfinished run, damaged input.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import struct
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib import image

import largebatch
from largebatch import report
from largebatch.errors import ConfigError, UserError
from largebatch.metrics import METRICS_NAME, read_metrics
from largebatch.plots import line_figure
from largebatch.report import (SUMMARY_NAME, TRUST_FILE, FigurePlan, Run, add_report_command, format_summary, load_runs,
                               plan_figures, summarize, write_report)

# As tests/test_wiring.py's SMALL: 256 synthetic 1x16x16 images, micro-batches of 32, BN over 16; 2 epochs.
SMALL = {"data.source": "synthetic", "data.synthetic_shape": [1, 16, 16], "data.synthetic_train": 256,
         "data.synthetic_test": 64, "data.micro_batch": 32, "data.bn_batch": 16, "data.augment": "none",
         "data.eval_batch": 64, "schedule.epochs": 2, "schedule.warmup_epochs": 0.5, "run.progress": False,
         "run.checkpoint": False, "run.log_every": 1}
LARS = {"run.name": "lars-b64", "data.global_batch": 64, "optim.name": "lars", "run.trust_log_every": 1,
        "run.target_accuracy": 0.01, "optim.clip_grad_norm": 1.0}
SGD = {"run.name": "sgd-b128", "data.global_batch": 128, "run.noise_scale": True}
# Both runs record these; lars-b64 alone the gradient norm (clipping) and trust ratios, sgd-b128 the noise scale.
COMMON = {"lr.png", "train_loss.png", "test_accuracy.png", "images_per_s.png"}
ALL = COMMON | {"grad_norm.png", TRUST_FILE, "gns_b_simple.png"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread) -> tuple[Path, Path]:
    out_dir = tmp_path_factory.mktemp("runs")
    dirs = []
    for overrides in (LARS, SGD):
        cfg = largebatch.load_config("fmnist_goyal", SMALL | overrides | {"run.out_dir": str(out_dir)})
        dirs.append(largebatch.run(cfg).run_dir)
    return dirs[0], dirs[1]


def report_main(argv: list[str]) -> int:
    """`largebatch report ...` as cli.main runs it: a parser with the sub-command added by the module."""
    parser = argparse.ArgumentParser(prog="largebatch")
    add_report_command(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["report", *argv])
    return args.func(args, extra)


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from the IHDR chunk, which the PNG format puts first, after the signature."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR", path
    return struct.unpack(">II", data[16:24])


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("tensorboard"))
    return dst


def rewrite_records(run_dir: Path, edit) -> None:
    """Replace the run's records by `edit(records)`."""
    records = edit(read_metrics(run_dir))
    (run_dir / METRICS_NAME).write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def of_kind(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(run_dir) if r["kind"] == kind]


def test_command_writes_a_png_of_800x500_per_recorded_quantity_and_the_summary(runs, tmp_path, capsys,
                                                                                 monkeypatch):
    out = tmp_path / "report"
    assert report_main([*map(str, runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert {p.name for p in out.glob("*.png")} == ALL
    for name in ALL:
        assert png_size(out / name) == (800, 500)
        assert image.imread(out / name).shape[:2] == (500, 800)  # decodes, not only a valid header
    assert (out / SUMMARY_NAME).read_text(encoding="utf-8") == printed
    assert "skipped (" not in printed and max(map(len, printed.splitlines())) <= 100

    alone, xlabels = tmp_path / "sgd-alone", []
    monkeypatch.setattr(report, "line_figure", lambda *a, **kw: xlabels.append(kw["xlabel"]) or line_figure(*a, **kw))
    assert report_main([str(runs[1]), "--out", str(alone), "--x", "epoch"]) == 0
    assert xlabels == ["epoch"] * 5
    assert {p.name for p in alone.glob("*.png")} == ALL - {"grad_norm.png", TRUST_FILE}
    assert ("skipped (no run records it): grad_norm (train records), per-layer trust ratios (trust records)"
            in capsys.readouterr().out)


def test_every_run_is_overlaid_with_the_values_of_its_records(runs):
    lars, sgd = runs
    for x in ("step", "epoch"):
        figures = {f.file: f for f in plan_figures(load_runs(runs), x).figures}
        assert set(figures) == ALL
        for run_dir in runs:
            train, evals = of_kind(run_dir, "train"), of_kind(run_dir, "epoch")
            series = {f: {s.label: s for s in figures[f].series} for f in COMMON}
            for file, key in (("lr.png", "lr"), ("train_loss.png", "loss"), ("images_per_s.png", "images_per_s")):
                line = series[file][run_dir.name]
                assert list(line.y) == [r[key] for r in train]
                assert list(line.x) == [r[x] for r in train]  # the trainer's own epoch, not the report's
            accuracy = series["test_accuracy.png"][run_dir.name]
            assert list(accuracy.x) == [r["epoch"] for r in evals] == [1, 2]  # always against epochs
            assert list(accuracy.y) == [100 * r["test_accuracy"] for r in evals]
        for file, key, only in (("grad_norm.png", "grad_norm", lars), ("gns_b_simple.png", "gns_b_simple", sgd)):
            [line] = figures[file].series  # only the run that records it
            values = [r[key] for r in of_kind(only, "train") if key in r]
            assert line.label == only.name and figures[file].logy and figures[file].xlabel == x
            assert [y for y in line.y if not math.isnan(y)] == [v for v in values if v > 0] != []


def test_trust_ratios_are_the_median_min_and_max_over_layers_of_each_run_that_has_them(runs):
    lars, _ = runs
    figure = next(f for f in plan_figures(load_runs(runs)).figures if f.file == TRUST_FILE)
    trust = of_kind(lars, "trust")
    layers = [[v for k, v in r.items() if k not in ("kind", "step", "time")] for r in trust]
    assert len(layers[0]) >= 3  # several layers, so median, min and max differ
    assert {s.label: list(s.y) for s in figure.series} == {
        f"{lars.name} median": [statistics.median(v) for v in layers],
        f"{lars.name} min": [min(v) for v in layers], f"{lars.name} max": [max(v) for v in layers]}
    assert all(list(s.x) == [r["step"] for r in trust] for s in figure.series) and figure.logy
    by_epoch = next(f for f in plan_figures(load_runs(runs), "epoch").figures if f.file == TRUST_FILE)
    epoch_of = {r["step"]: r["epoch"] for r in of_kind(lars, "train")}  # run.log_every = 1: every step
    assert all(list(s.x) == [epoch_of[r["step"]] for r in trust] for s in by_epoch.series)


def test_summary_numbers_are_those_of_the_records(runs, tmp_path):
    for run_dir, overrides in zip(runs, (LARS, SGD)):
        records = read_metrics(run_dir)
        plan = next(r for r in records if r["kind"] == "plan")
        accuracies = [r["test_accuracy"] for r in records if r["kind"] == "epoch"]
        final = next(r for r in records if r.get("key") == "run_final")
        s = summarize(load_runs([run_dir])[0])
        assert (s.label, s.recipe, s.optimizer, s.global_batches, s.world_size) == (
            run_dir.name, "fmnist_goyal", overrides.get("optim.name", "sgd"), (overrides["data.global_batch"],), 1)
        assert s.steps == s.total_steps == plan["total_steps"] == 2 * plan["steps_per_epoch"] and s.epochs == 2
        assert (s.final_accuracy, s.best_accuracy) == (accuracies[-1], max(accuracies))
        assert s.time_to_accuracy_s == final["time_to_accuracy_s"]  # None for the run without a target
        assert s.wall_s == final["wall_s"] and s.status == "finished" and s.skipped_steps == 0
        assert s.median_images_per_s == statistics.median(r["images_per_s"] for r in records if r["kind"] == "train")
    text = write_report(runs, tmp_path)
    for run_dir in runs:
        s = summarize(load_runs([run_dir])[0])
        setup_row, results_row = [line.split() for line in text.splitlines() if line.startswith(run_dir.name)]
        assert setup_row[2] == str(s.global_batches[0]) and setup_row[-1] == "finished"
        assert results_row[2:5] == [f"{s.steps}/{s.total_steps}", f"{100 * s.final_accuracy:.2f}%",
                                    f"{100 * s.best_accuracy:.2f}%"]


@pytest.mark.parametrize("accuracies, final, best, reached_at", [
    ((0.5, 0.4), 0.4, 0.5, 0), ((0.005, 0.4), 0.4, 0.4, 1), ((0.005, 0.006), 0.006, 0.006, None)])
def test_final_best_and_time_to_target_follow_the_evaluations(runs, tmp_path, accuracies, final, best, reached_at):
    run_dir = copy_run(runs[0], tmp_path / "edited")  # run.target_accuracy = 0.01
    values = iter(accuracies)
    rewrite_records(run_dir, lambda records: [r | {"test_accuracy": next(values)} if r["kind"] == "epoch" else r
                                              for r in records])
    s = summarize(load_runs([run_dir])[0])
    elapsed = [r["elapsed_s"] for r in of_kind(run_dir, "epoch")]
    assert (s.final_accuracy, s.best_accuracy) == (final, best)
    assert s.time_to_accuracy_s == (None if reached_at is None else elapsed[reached_at])
    text = format_summary([s], FigurePlan([], [], []), tmp_path)
    results_row = [line for line in text.splitlines() if line.startswith("edited")][1]
    assert ("not reached" in results_row) == (reached_at is None)


def test_steps_without_an_epoch_are_placed_by_the_epochs_the_trainer_recorded():
    """Trust records carry no epoch: they are placed between the train and epoch records around them,
    which is exact within a batch phase (here the steps per epoch drop from 4 to 2 after step 4, as a
    batch ramp does) and follows the last phase's slope beyond the last record."""
    records = [{"kind": "plan", "step": 0, "steps_per_epoch": 4}, {"kind": "train", "step": 2, "epoch": 0.5},
               {"kind": "epoch", "step": 4, "epoch": 1}, {"kind": "train", "step": 6, "epoch": 2.0}]
    ramp = Run(Path("ramp"), "ramp", {}, records)
    assert ramp.epochs_at([0, 1, 4, 5, 6, 8]) == [0.0, 0.25, 1.0, 1.5, 2.0, 3.0]
    assert summarize(ramp).epochs == 2.0  # not 6 steps / 4 per epoch of the first plan
    assert Run(Path("one"), "one", {}, records[:2]).epochs_at([1, 2, 3]) == [0.25, 0.5, 0.75]  # from step 0
    just_started = Run(Path("new"), "new", {}, records[:1]).epochs_at([0, 3])
    assert just_started[0] == 0.0 and math.isnan(just_started[1])


def test_noise_scale_points_a_log_axis_cannot_show_are_gaps_named_in_a_note(runs, tmp_path):
    lars, sgd = runs
    gns_run = copy_run(sgd, tmp_path / "sgd-gns")
    values = iter([-3.0, "nan", 40.0, 55.0])  # early estimates can be negative, or nan before the first update
    rewrite_records(gns_run, lambda records: [r | {"gns_b_simple": next(values)} if r["kind"] == "train" else r
                                              for r in records])
    plan = plan_figures(load_runs([lars, gns_run]))
    gns = next(f for f in plan.figures if f.file == "gns_b_simple.png")
    assert gns.logy and [s.label for s in gns.series] == ["sgd-gns"]
    y = list(gns.series[0].y)
    assert math.isnan(y[0]) and math.isnan(y[1]) and y[2:] == [40.0, 55.0]
    assert "gns_b_simple.png, sgd-gns: 2 of 4 points not drawn" in "\n".join(plan.notes)
    assert not any("gns" in s for s in plan.skipped)

    out = tmp_path / "report"
    write_report([lars, gns_run], out)
    assert png_size(out / "gns_b_simple.png") == (800, 500)
    text = write_report([lars], out)  # the same folder, a run without it: no stale figure is left
    assert not (out / "gns_b_simple.png").exists() and "gns_b_simple (train records)" in text


@pytest.mark.parametrize("ending, status", [
    ({"key": "run_final", "stopped_at_target": True}, "at target"),  # run.stop_at_target ended it early
    ({"key": "session_stop", "signal": "SIGTERM"}, "stopped"), (None, "not finished")])  # None: crashed or running
def test_status_wall_time_and_skipped_steps_of_a_run_that_did_not_run_to_its_end(runs, tmp_path, ending, status):
    run_dir = copy_run(runs[0], tmp_path / "cut")

    def cut(records):
        kept = [r for r in records if r.get("key") != "run_final"]
        skip = {"kind": "skip", "step": 3, "time": 0.0, "loss": "nan", "lr": 0.1}
        ends = [{"kind": "mlperf", "step": 8, "wall_s": 99.0} | ending] if ending else []
        return [*kept, skip, *ends]

    rewrite_records(run_dir, cut)
    s = summarize(load_runs([run_dir])[0])
    assert s.status == status and s.skipped_steps == 1
    latest_elapsed = max(r["elapsed_s"] for r in read_metrics(run_dir) if "elapsed_s" in r)
    assert s.wall_s == (99.0 if ending else latest_elapsed)


def test_runs_of_the_same_name_are_told_apart_by_their_paths(runs, tmp_path):
    a, b = copy_run(runs[0], tmp_path / "a" / "run"), copy_run(runs[1], tmp_path / "b" / "run")
    assert [run.label for run in load_runs([a, b])] == [str(a), str(b)]


def test_a_path_that_is_not_a_run_directory_is_named(runs, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    config_only = copy_run(runs[0], tmp_path / "config-only")
    (config_only / METRICS_NAME).unlink()
    for path in (empty, tmp_path / "absent", config_only):
        with pytest.raises(ConfigError, match=f"{path} is not a run directory: it holds no {METRICS_NAME}"):
            report_main([str(runs[0]), str(path), "--out", str(tmp_path / "out")])
    with pytest.raises(UserError, match="unexpected arguments --bogus"):
        report_main([str(runs[0]), "--bogus", "--out", str(tmp_path / "out")])


@pytest.mark.parametrize("line", ['{"kind": "train", "step": 3, "lr": 0.1', '[1, 2]', '\xff'])
def test_a_damaged_metrics_line_is_named_by_file_and_number(runs, tmp_path, line):
    run_dir = copy_run(runs[1], tmp_path / "damaged")
    metrics = run_dir / METRICS_NAME
    lines = metrics.read_bytes().splitlines(keepends=True)
    lines[2] = line.encode("latin-1") + b"\n"
    metrics.write_bytes(b"".join(lines))
    with pytest.raises(ConfigError, match=f"{metrics}, line 3: "):
        report_main([str(run_dir), "--out", str(tmp_path / "out")])


def test_report_runs_without_torch(runs, tmp_path):
    """`largebatch report` reads JSON and TOML only: it must start (and finish) with torch unimportable."""
    script = ("import argparse, sys; sys.modules['torch'] = None\n"
              "from largebatch.report import add_report_command\n"
              "parser = argparse.ArgumentParser(); add_report_command(parser.add_subparsers(dest='command'))\n"
              "args, extra = parser.parse_known_args(sys.argv[1:]); sys.exit(args.func(args, extra))")
    out = tmp_path / "report"
    result = subprocess.run([sys.executable, "-c", script, "report", *map(str, runs), "--out", str(out)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "lars-b64" in result.stdout and (out / "lr.png").is_file()
