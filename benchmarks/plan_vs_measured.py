"""The planner against this machine: `largebatch plan --measure` predicts 1 and 2 gloo processes
(one thread each on the 2 cores) from the compute per image and the gloo α and β it measures here;
`largebatch train` then runs the same model, input, layout (contiguous, as measured; the default
recipe's channels_last is faster on CPU) and global batch on synthetic data, once in one
process and once in two under torchrun, alternately `--repeats` times, and its images/s is read from
the `train` records of metrics.jsonl (all windows but the first, the warm-up).

Two models: small_cnn, whose step is almost all compute (60 k parameters), and alexnet_bn, whose
31 MB gradient makes the all-reduce a visible part of the step. Each repeat measures the plan again
before its two runs, and each of the three waits until other jobs leave the CPUs idle (the busy
fraction seen is recorded): the machine is shared, and the 2-process runs need both cores. The table
gives medians over the repeats, the planner's prediction at its default overlap 0.5 and its range
from no overlap to full overlap.

    python benchmarks/plan_vs_measured.py [--repeats 2] [--steps 40] [--models small_cnn alexnet_bn]

Prints a table and writes benchmarks/results/plan_vs_measured.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from largebatch.metrics import read_metrics
from largebatch.scaling.network import Network
from largebatch.scaling.step import Workload, predict

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
SHAPE = (1, 28, 28)
CLASSES = 10
GLOBAL_BATCH = {"small_cnn": 256, "alexnet_bn": 32}
LOG_EVERY = 10


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_busy(seconds: float = 2.0) -> float:
    """Fraction of the machine's CPU time spent busy over the next `seconds` (0 where /proc/stat is missing)."""
    def sample() -> tuple[int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    if not Path("/proc/stat").exists():
        return 0.0
    (total0, idle0), _, (total1, idle1) = sample(), time.sleep(seconds), sample()
    return 1 - (idle1 - idle0) / max(total1 - total0, 1)


def wait_for_idle(limit: float = 0.1, patience_s: float = 900) -> float:
    """Wait (up to `patience_s`) until other jobs leave the CPUs idle: they slow the 2-process runs most, as
    these need both cores. Returns the busy fraction seen last."""
    deadline = time.monotonic() + patience_s
    while (busy := cpu_busy()) > limit and time.monotonic() < deadline:
        time.sleep(10)
    return busy


def planned(model: str, batch: int, json_path: Path) -> dict:
    """`largebatch plan --measure` for 1 and 2 workers; its JSON report."""
    cmd = [sys.executable, "-m", "largebatch", "plan", "--measure", "--model", model, "--input",
           ",".join(map(str, SHAPE)), "--classes", str(CLASSES), "--workers", "1,2", "--global-batch", str(batch),
           "--threads", "1", "--json", str(json_path)]
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=600)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    print(result.stdout)
    return json.loads(json_path.read_text())


def overlap_range(report: dict) -> dict[str, float]:
    """Predicted 2-process images/s at overlap 0 and 1, from the report's measured inputs."""
    i = report["inputs"]
    net = Network(**i["network"])
    per_worker = str(i["global_batch"] // 2)
    base = Workload(parameters=i["parameters"], image_seconds=i["image_seconds"][per_worker],
                    wire_bytes=i["wire_bytes"], buckets=i["buckets"],
                    backward_fraction=i["backward_fraction"][per_worker])
    return {f"overlap_{o:g}": predict(replace(base, overlap=o), net, i["algorithm"], 2, i["global_batch"]).images_per_s
            for o in (0.0, 1.0)}


def trained(model: str, batch: int, processes: int, steps: int, out: Path) -> float:
    """Images/s of `largebatch train` in `processes` processes (harmonic mean of the train windows after the first)."""
    args = ["--data.source", "synthetic", "--data.synthetic_shape", ",".join(map(str, SHAPE)),
            "--data.synthetic_classes", str(CLASSES), "--data.synthetic_train", str(steps * batch),
            "--data.synthetic_test", "64", "--data.augment", "none", "--data.global_batch", str(batch),
            "--data.micro_batch", "0", "--data.bn_batch", "0", "--model.name", model, "--model.channels_last", "false",
            "--schedule.epochs", "1",
            "--schedule.warmup_epochs", "0", "--schedule.decay", "none", "--run.threads", "1",
            "--run.log_every", str(LOG_EVERY), "--run.checkpoint", "false", "--run.progress", "false",
            "--run.out_dir", str(out), "--run.name", f"{model}-{processes}"]
    if processes == 1:
        cmd = [sys.executable, "-m", "largebatch", "train", *args]
    else:
        launcher = [shutil.which("torchrun")] if shutil.which("torchrun") else [sys.executable, "-m",
                                                                               "torch.distributed.run"]
        cmd = [*launcher, "--nproc-per-node", str(processes), "--master-port", str(free_port()), "-m", "largebatch",
               "train", *args]
    result = subprocess.run(cmd, env=environment(), capture_output=True, text=True, timeout=900)
    if result.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}")
    windows = [r["images_per_s"] for r in read_metrics(out / f"{model}-{processes}") if r["kind"] == "train"][1:]
    shutil.rmtree(out / f"{model}-{processes}")
    return statistics.harmonic_mean(windows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(GLOBAL_BATCH), choices=list(GLOBAL_BATCH))
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (a multiple of 10)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model in args.models:
            batch = GLOBAL_BATCH[model]
            repeats = []
            for _ in range(args.repeats):  # plan, 1 and 2 processes in turn, each started on idle CPUs
                busy = [wait_for_idle()]
                report = planned(model, batch, Path(tmp) / f"{model}.json")
                p1, p2 = report["rows"]
                busy.append(wait_for_idle())
                one = trained(model, batch, 1, args.steps, Path(tmp))
                busy.append(wait_for_idle())
                two = trained(model, batch, 2, args.steps, Path(tmp))
                repeats.append({"cpu_busy_before": busy, "plan": report,
                                "predicted": {"images_per_s_1": p1["images_per_s"],
                                              "images_per_s_2": p2["images_per_s"], "efficiency_2": p2["efficiency"],
                                              **overlap_range(report)},
                                "measured": {"images_per_s_1": one, "images_per_s_2": two}})
            predicted = {k: statistics.median(r["predicted"][k] for r in repeats) for k in repeats[0]["predicted"]}
            measured = {k: statistics.median(r["measured"][k] for r in repeats) for k in repeats[0]["measured"]}
            measured["efficiency_2"] = measured["images_per_s_2"] / (2 * measured["images_per_s_1"])
            results.append({"model": model, "global_batch": batch, "input": SHAPE, "classes": CLASSES,
                            "predicted": predicted, "measured": measured,
                            "ratio_measured_over_predicted": {k: measured[k] / predicted[k] for k in measured},
                            "repeats": repeats})

    print(f"{'model':<12}{'batch':>6}  {'':<11}{'1 proc img/s':>14}{'2 procs img/s':>15}{'2-proc efficiency':>19}"
          f"{'2 procs, overlap 0..1':>24}")
    for r in results:
        p, m, q = r["predicted"], r["measured"], r["ratio_measured_over_predicted"]
        print(f"{r['model']:<12}{r['global_batch']:>6}  {'predicted':<11}{p['images_per_s_1']:>14.0f}"
              f"{p['images_per_s_2']:>15.0f}{100 * p['efficiency_2']:>18.1f}%"
              f"{p['overlap_0']:>14.0f} .. {p['overlap_1']:.0f}")
        print(f"{'':<20}{'measured':<11}{m['images_per_s_1']:>14.0f}{m['images_per_s_2']:>15.0f}"
              f"{100 * m['efficiency_2']:>18.1f}%")
        print(f"{'':<20}{'ratio m/p':<11}{q['images_per_s_1']:>14.3f}{q['images_per_s_2']:>15.3f}"
              f"{q['efficiency_2']:>19.3f}")
    RESULTS.mkdir(exist_ok=True)
    out = {"benchmark": "plan_vs_measured", "torch": torch.__version__, "steps": args.steps,
           "repeats": args.repeats, "cores": os.cpu_count(), "results": results}
    (RESULTS / "plan_vs_measured.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
