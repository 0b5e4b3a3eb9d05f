"""`largebatch bench model`: the table and JSON of the minimal loop against the trainer's step rows."""

from __future__ import annotations

import json

from largebatch.cli import main

SMALL = ["--model", "small_cnn", "--image-size", "16", "--channels", "3", "--classes", "10", "--batch", "8",
         "--steps", "1", "--repeats", "1", "--warmup", "1"]


def test_bench_model_measures_every_row_against_the_minimal_loop(tmp_path, capsys):
    out = tmp_path / "model.json"
    rows = ["baseline", "plain", "channels_last", "loss_sync_log"]
    assert main(["bench", "model", *SMALL, "--rows", ",".join(rows), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "small_cnn, 3x16x16, 10 classes, batch 8, fp32 on cpu" in printed
    record = json.loads(out.read_text())
    assert record["benchmark"] == "bench_model" and record["machine"]["torch"]
    assert [r["name"] for r in record["rows"]] == rows
    assert record["rows"][0]["ratio_to_baseline"] == 1.0
    assert all(r["images_per_s"] > 0 and f"\n{r['name']:<18}" in printed for r in record["rows"])


def test_bench_model_refuses_an_unknown_row(capsys):
    assert main(["bench", "model", *SMALL, "--rows", "baseline,turbo"]) == 2
    assert "--rows: unknown row(s) turbo; rows are baseline, plain, channels_last" in capsys.readouterr().err


def test_each_trainer_row_switches_on_its_fields_and_all_of_them_together():
    from largebatch.bench.model import Workload, trainer_overrides

    cpu = Workload("small_cnn", 16, 3, 10, 8, "fp32", "cpu")
    fast = {"model.channels_last", "model.compile", "run.loss_sync", "run.cudnn_benchmark"}
    on = lambda overrides: {k for k in fast if overrides.get(k) not in (None, False)}  # noqa: E731
    assert on(trainer_overrides(cpu, "plain")) == set()
    assert on(trainer_overrides(cpu, "compile")) == {"model.compile"}
    assert on(trainer_overrides(cpu, "all")) == fast - {"run.cudnn_benchmark"}
    assert on(trainer_overrides(Workload("resnet50", 224, 3, 1000, 8, "bf16", "cuda"), "all")) == fast
