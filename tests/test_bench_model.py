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


def test_bench_bn_times_ghost_bn_and_micro_batches_of_n_against_plain_bn(tmp_path, capsys):
    out = tmp_path / "bn.json"
    assert main(["bench", "bn", "--model", "small_cnn", "--image-size", "16", "--micro-batch", "16", "--bn-batch",
                 "4", "--steps", "1", "--repeats", "1", "--warmup", "1", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert [r["name"] for r in record["rows"]] == ["plain BN over 16", "ghost BN 4 in 16", "micro-batches of 4"]
    assert record["rows"][0]["ratio_to_plain_bn"] == 1.0 and "x plain BN" in capsys.readouterr().out
    assert main(["bench", "bn", "--micro-batch", "16", "--bn-batch", "5"]) == 2


def test_bench_bn_rows_train_with_their_bn_groups():
    """Each row's step really normalises over its groups: the model's ghost layers and the plan say so."""
    from largebatch.api import load_config
    from largebatch.bench.model import Workload, trainer_overrides
    from largebatch.plan import RunPlan

    w = Workload("small_cnn", 16, 1, 10, 16, "fp32", "cpu")
    for fields, (micro, bn) in (({"data.bn_batch": 0}, (16, 16)), ({"data.bn_batch": 4}, (16, 4)),
                                ({"data.bn_batch": 0, "data.micro_batch": 4}, (4, 4))):
        plan = RunPlan.build(load_config("fmnist_goyal", trainer_overrides(w, "plain") | fields), 1, 16)
        assert (plan.batches.micro_batch, plan.batches.bn_batch) == (micro, bn)
