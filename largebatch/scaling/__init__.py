"""Scaling planner: an α–β model of the gradient all-reduce (ring, tree, hierarchical) plus compute
per image, giving the step time, images/s, scaling efficiency and time to train of N synchronous
data-parallel workers at a global batch (`largebatch plan`).

- `network`: `Network` (α, β inside and across nodes) and the all-reduce cost of each algorithm.
- `step`: `Workload` (parameters, compute per image, wire bytes, buckets, overlap) and `predict`.
- `published`: the four published runs of `published.toml`, each value with its source.
- `measure`: compute per image and gloo α, β measured on this machine (the only module that imports torch).
- `cli`: the `plan` subcommand.
"""

from largebatch.scaling.network import ALGORITHMS, Network, allreduce_seconds
from largebatch.scaling.published import PublishedRun, load_published
from largebatch.scaling.step import Prediction, Workload, predict

__all__ = ["ALGORITHMS", "Network", "Prediction", "PublishedRun", "Workload", "allreduce_seconds", "load_published",
           "predict"]
