"""The scaling planner: closed forms against hand-computed numbers, the four published runs within
±10 points (and a perturbed run outside), the `largebatch plan` command line, and `--measure`."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest

from largebatch.cli import main
from largebatch.scaling import measure
from largebatch.scaling.network import Network, allreduce_seconds, hierarchical_seconds, ring_seconds, tree_seconds
from largebatch.scaling.published import TOLERANCE, Sourced, load_published, parse_run
from largebatch.scaling.step import Workload, predict
from multiproc import run_python

NET = Network(alpha_intra=1e-5, beta_intra=1e-9, alpha_inter=5e-5, beta_inter=4e-9, gpus_per_node=8)
MB = 1e6


def test_ring_closed_form_at_2_and_8_workers():
    assert ring_seconds(MB, 2, NET) == pytest.approx(2 * 1e-5 + 1 * MB * 1e-9)          # 2α + n·β
    assert ring_seconds(MB, 8, NET) == pytest.approx(14 * 1e-5 + 2 * 7 / 8 * MB * 1e-9)  # one node
    four_per_node = replace(NET, gpus_per_node=4)                                     # two nodes: the network's α, β
    assert ring_seconds(MB, 8, four_per_node) == pytest.approx(14 * 5e-5 + 2 * 7 / 8 * MB * 4e-9)


def test_tree_is_recursive_halving_doubling():
    assert tree_seconds(MB, 8, NET) == pytest.approx(2 * 3 * 1e-5 + 2 * 7 / 8 * MB * 1e-9)
    # 16 workers on 2 nodes: 3 steps inside, 1 across; n(1-1/8) inside, n/8 per worker x 8 across.
    assert tree_seconds(MB, 16, NET) == pytest.approx(2 * (3 * 1e-5 + 5e-5) + 2 * 7 / 8 * MB * 1e-9
                                                      + 2 * 1 / 2 * MB * 4e-9)


def test_hierarchical_limits_are_the_two_rings():
    one_node = hierarchical_seconds(MB, 8, NET)
    assert one_node == pytest.approx(ring_seconds(MB, 8, NET))
    one_gpu_per_node = replace(NET, gpus_per_node=1)
    assert hierarchical_seconds(MB, 16, one_gpu_per_node) == pytest.approx(
        2 * 15 * 5e-5 + 2 * 15 / 16 * MB * 4e-9)
    assert ring_seconds(MB, 16, one_gpu_per_node) == pytest.approx(hierarchical_seconds(MB, 16, one_gpu_per_node))


def test_hierarchical_across_nodes_and_as_a_2d_torus():
    # 32 workers, 8 per node: ring of 8 inside + ring of 4 nodes on n/8, the 8 rings sharing the node's link.
    expected = 2 * 7 * 1e-5 + 2 * 7 / 8 * MB * 1e-9 + 2 * 3 * 5e-5 + 2 * 3 / 4 * MB * 4e-9
    assert hierarchical_seconds(MB, 32, NET) == pytest.approx(expected)
    # groups of 16 span 2 nodes: their ring pays the network; 2 groups, 8 rings per node on n/16.
    torus = 2 * 15 * 5e-5 + 2 * 15 / 16 * MB * 4e-9 + 2 * 1 * 5e-5 + 2 * 1 / 2 * MB / 16 * 8 * 4e-9
    assert hierarchical_seconds(MB, 32, NET, group=16) == pytest.approx(torus)
    with pytest.raises(ValueError, match="group 12"):
        hierarchical_seconds(MB, 32, NET, group=12)


def test_one_worker_has_no_communication_and_efficiency_one():
    work = Workload(parameters=25_000_000, image_seconds=1e-3, buckets=10, overlap=0.0)
    for algorithm in ("ring", "tree", "hierarchical"):
        p = predict(work, NET, algorithm, 1, 256)
        assert (p.comm_s, p.step_s, p.efficiency) == (0.0, pytest.approx(0.256), pytest.approx(1.0))
    assert p.images_per_s == pytest.approx(1000)
    assert p.time_to_train(90, 1_000_000) == pytest.approx(90_000)


def test_more_buckets_pay_more_latency_only():
    one, four = (allreduce_seconds("ring", MB, 8, NET, buckets=b) for b in (1, 4))
    assert four - one == pytest.approx(3 * 14 * 1e-5)


def test_overlap_hides_communication_up_to_the_backward_pass():
    work = Workload(parameters=250_000, image_seconds=1e-3, overlap=1.0)  # 1 MB: comm 1.89 ms
    short = predict(work, NET, "ring", 8, 64)                             # compute 8 ms, backward 5.3 ms
    assert short.exposed_comm_s == 0 and short.step_s == pytest.approx(short.compute_s)
    long = predict(replace(work, image_seconds=1e-4), NET, "ring", 8, 64)  # backward 0.53 ms < comm
    assert long.step_s == pytest.approx(long.compute_s + long.comm_s - 2 / 3 * long.compute_s)
    none = predict(replace(work, overlap=0.0), NET, "ring", 8, 64)
    assert none.step_s == pytest.approx(none.compute_s + none.comm_s)
    assert none.efficiency == pytest.approx(none.compute_s / none.step_s)


RUNS = {run.key: run for run in load_published()}


def test_the_four_published_runs_are_there_with_a_source_for_every_value():
    assert set(RUNS) == {"goyal2017", "sergeev2018", "yamazaki2019", "mikami2018"}
    assert {k: RUNS[k]["workers"] for k in RUNS} == {"goyal2017": 256, "sergeev2018": 512, "yamazaki2019": 2048,
                                                      "mikami2018": 1088}
    for run in RUNS.values():
        assert all(isinstance(v, Sourced) and len(v.source) > 5 for v in run.values.values())


@pytest.mark.parametrize("key", ["goyal2017", "sergeev2018", "yamazaki2019", "mikami2018"])
def test_published_efficiency_is_reproduced_within_ten_points(key):
    run = RUNS[key]
    assert abs(run.error()) <= TOLERANCE, f"{key}: predicted {run.predict().efficiency:.3f}, published " \
                                          f"{run['efficiency']}"


@pytest.mark.parametrize("key", ["goyal2017", "sergeev2018", "yamazaki2019", "mikami2018"])
def test_the_published_check_fails_when_a_parameter_is_wrong(key):
    """The check can fail: the same run on a network 10x slower is predicted far below its figure."""
    run = RUNS[key]
    slow = replace(run, values=run.values | {"inter_gbps": Sourced(run["inter_gbps"] / 10, "perturbed")})
    assert slow.error() < -TOLERANCE


def test_a_published_value_without_source_is_refused():
    table = {"title": "t", **{k: {"value": v.value, "source": v.source} for k, v in RUNS["goyal2017"].values.items()}}
    table["overlap"] = {"value": 0.5}
    with pytest.raises(ValueError, match=r"\[x\]: overlap must be"):
        parse_run("x", table)
    del table["overlap"]
    with pytest.raises(ValueError, match="missing \\['overlap'\\]"):
        parse_run("x", table)


def test_plan_prints_a_row_per_worker_count(capsys, tmp_path):
    out_json = tmp_path / "plan.json"
    assert main(["plan", "--image-ms", "1", "--workers", "1,8,64", "--global-batch", "4096", "--json",
                 str(out_json)]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0] in ("1", "8", "64")]
    assert [r[0] for r in rows] == ["1", "8", "64"] and rows[0][-3:] == ["100.0%", "32.0", "h"]  # 90 x 1,281,167 / 1000
    assert "25.56 M parameters" in out and "ring" in out
    assert out_json.read_text().count('"workers"') == 3


def test_plan_published_prints_predicted_next_to_published(capsys):
    assert main(["plan", "--published"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    for key in RUNS:  # its row, and its parameter listing
        assert sum(line.startswith(f"{key} ") for line in lines) == 1
        assert sum(line.startswith(f"{key}: ") for line in lines) == 1
    assert "90.0%" in out and "77.0%" in out and "NCCL cost model" in out


@pytest.mark.parametrize("argv, message", [
    (["--image-ms", "1", "--workers", "3"], "--global-batch 8192 does not divide over --workers 3"),
    (["--image-ms", "1", "--workers", "24", "--global-batch", "48", "--gpus-per-node", "16"],
     "24 workers do not fill nodes of 16 (--workers 24, --gpus-per-node 16)"),
    (["--workers", "8"], "--image-ms is needed"),
    (["--image-ms", "1", "--model", "gpt2"], "--model gpt2: its size is known for resnet18"),
    (["--image-ms", "1", "--group", "16"], "--group applies to --algorithm hierarchical"),
])
def test_bad_input_names_the_option(capsys, argv, message):
    assert main(["plan", *argv]) == 2
    assert f"largebatch plan: error: {message}" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--overlap", "1.5"], "argument --overlap: expected a number [0, 1], got '1.5'"),
    (["--algorithm", "star"], "argument --algorithm: invalid choice: 'star'"),
    (["--wire-bytes", "3"], "argument --wire-bytes: invalid choice: 3"),
    (["--workers", "8,x"], "argument --workers: expected integers >= 1 separated by commas"),
])
def test_bad_values_are_refused_by_the_parser(capsys, argv, message):
    with pytest.raises(SystemExit) as stop:
        main(["plan", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


TORCH_BLOCKED = "import sys; sys.modules['torch'] = None; from largebatch.cli import main; sys.exit(main(sys.argv[1:]))"


def test_plan_help_and_published_need_no_torch():
    assert "--beta-inter" in run_python(["-c", TORCH_BLOCKED, "plan", "--help"]).stdout
    assert "mikami2018" in run_python(["-c", TORCH_BLOCKED, "plan", "--published"]).stdout


def test_fit_ring_recovers_alpha_and_beta():
    alpha, beta = 50e-6, 1 / 2e9
    points = [(n, 2 * alpha + n * beta) for n in (4096, 65536, 1 << 20, 1 << 24)]
    fit = measure.fit_ring(points, 2)
    assert fit.alpha == pytest.approx(alpha) and fit.beta == pytest.approx(beta)
    four = measure.fit_ring([(n, 6 * alpha + 1.5 * n * beta) for n, _ in points], 4)
    assert four.alpha == pytest.approx(alpha) and four.beta == pytest.approx(beta)


def test_measure_times_two_gloo_processes():
    fit = measure.measure_link(sizes=(256, 1 << 22), repeats=2)  # 1 KiB and 16 MiB: a slope even on a busy machine
    assert [n for n, _ in fit.points] == [1024, 1 << 24] and all(t > 0 for _, t in fit.points)
    assert math.isfinite(fit.alpha) and fit.alpha >= 0 and fit.beta > 0


def test_plan_measure_uses_the_measured_figures(capsys, monkeypatch):
    link = measure.LinkFit(alpha=100e-6, beta=1e-9, workers=2, points=((4096, 2e-4), (1 << 20, 1.2e-3)))
    monkeypatch.setattr(measure, "measure_link", lambda: link)
    assert main(["plan", "--measure", "--model", "small_cnn", "--input", "1,16,16", "--classes", "10",
                 "--workers", "1,2", "--global-batch", "16", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert "measured compute:" in out and "at batch 8 (1 thread(s)" in out and "at batch 16 " in out
    assert "alpha 100.0 us, 1.00 GB/s" in out
    two = next(line.split() for line in out.splitlines() if line.split()[:2] == ["2", "1"])
    parameters = measure.count_parameters("small_cnn", (1, 16, 16), 10)
    assert float(two[4]) == pytest.approx(1e3 * (2 * 100e-6 + 4 * parameters * 1e-9), abs=0.01)  # all-reduce ms
