"""`largebatch bench trainer` and `largebatch bench kfac`: each runs with tiny settings, prints its ratio
line and writes the machine header with both measurements, whose medians give the ratio; a wrong
option value is refused before anything is measured."""

from __future__ import annotations

import json
import statistics

import pytest

from largebatch.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def check_record(record: dict, benchmark: str, runs: tuple[str, str], medians: tuple[str, str], repeats: int) -> None:
    """The header, both measurements' runs (positive, `repeats` of each), their medians and ratio = quotient."""
    assert record["benchmark"] == benchmark
    assert record["machine"]["torch"] and record["machine"]["torch_threads"] >= 1
    assert "torch" not in record and "threads" not in record  # the machine header carries them
    for run_key, median_key in zip(runs, medians):
        assert len(record[run_key]) == repeats and all(v > 0 for v in record[run_key])
        assert record[median_key] == statistics.median(record[run_key])
    assert record["ratio"] == record[medians[1]] / record[medians[0]]


def test_bench_trainer_measures_largebatch_train_against_the_hand_loop(tmp_path, capsys):
    out = tmp_path / "trainer.json"
    assert main(["bench", "trainer", "--global-batch", "64", "--steps", "2", "--warmup", "1", "--repeats", "1",
                 "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record) == {"benchmark", "machine", "model", "global_batch", "steps", "repeats",
                           "hand_loop_images_per_s", "largebatch_images_per_s", "hand_loop_median",
                           "largebatch_median", "ratio"}
    assert (record["model"], record["global_batch"], record["steps"]) == ("small_cnn", 64, 2)
    check_record(record, "trainer_overhead", ("hand_loop_images_per_s", "largebatch_images_per_s"),
                 ("hand_loop_median", "largebatch_median"), 1)
    assert f"ratio largebatch / hand-written: {record['ratio']:.3f} (target >= 0.95)" in capsys.readouterr().out


def test_bench_kfac_measures_kfac_against_sgd_and_both_updates(tmp_path, capsys):
    out = tmp_path / "kfac.json"
    assert main(["bench", "kfac", "--batch", "8", "--factor-every", "1", "--inverse-every", "2", "--intervals", "1",
                 "--repeats", "2", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert set(record) == {"benchmark", "machine", "model", "input", "batch", "factor_every", "inverse_every",
                           "steps", "repeats", "sgd_s_per_step", "kfac_s_per_step", "sgd_median", "kfac_median",
                           "factor_update_s", "inverse_update_s", "ratio"}
    assert (record["batch"], record["factor_every"], record["inverse_every"], record["steps"]) == (8, 1, 2, 2)
    check_record(record, "kfac_overhead", ("sgd_s_per_step", "kfac_s_per_step"), ("sgd_median", "kfac_median"), 2)
    assert record["factor_update_s"] > 0 and record["inverse_update_s"] > 0
    printed = capsys.readouterr().out
    assert f"ratio K-FAC / SGD: {record['ratio']:.3f} (target <= 1.30)" in printed
    assert "K-FAC + SGD (factors /1, inverses /2)" in printed


@pytest.mark.parametrize("argv, message", [
    (["trainer", "--steps", "3", "--warmup", "2"], "--steps 3: give a multiple of --warmup 2"),
    (["trainer", "--global-batch", "0", "--repeats", "0"], "--global-batch 0, --repeats 0: give at least 1"),
    (["trainer", "--global-batch", "60000"], "--global-batch 60000: give fewer than the training set's 60000"),
    (["kfac", "--factor-every", "0", "--batch", "-1"], "--batch -1, --factor-every 0: give at least 1"),
    (["kfac", "--intervals", "0"], "--intervals 0: give at least 1"),
])
def test_a_wrong_option_value_is_refused_before_measuring(tmp_path, capsys, argv, message):
    out = tmp_path / "refused.json"
    assert main(["bench", *argv, "--json", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
