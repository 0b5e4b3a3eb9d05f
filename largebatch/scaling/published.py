"""The published runs of `published.toml`, and the planner's prediction for each.

A run is a flat table of values, each with the source it came from, so that printing a prediction
can print every assumed parameter with its origin next to it. Torch-free.
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass
from importlib import resources
from typing import Any

from largebatch.scaling.network import Network
from largebatch.scaling.step import Prediction, Workload, predict

REQUIRED = ("gpu", "gpus_per_node", "intra_link", "alpha_intra_us", "intra_gbps", "inter_link", "alpha_inter_us",
            "inter_gbps", "model", "parameters", "image_ms", "per_gpu_batch", "wire_bytes", "algorithm", "buckets",
            "overlap", "workers", "baseline_workers", "efficiency")
OPTIONAL = ("group", "images_per_s")
TOLERANCE = 0.10
"""How close (in efficiency, absolute) a prediction must come to the published figure: ±10 points."""


@dataclass(frozen=True)
class Sourced:
    """A value and where it comes from (paper section, spec sheet, or 'assumption: why')."""

    value: Any
    source: str


@dataclass(frozen=True)
class PublishedRun:
    """One published run: its title and its sourced values (the keys of REQUIRED and OPTIONAL)."""

    key: str
    title: str
    values: dict[str, Sourced]

    def __getitem__(self, name: str) -> Any:
        return self.values[name].value

    def get(self, name: str, default: Any = None) -> Any:
        return self.values[name].value if name in self.values else default

    def network(self) -> Network:
        return Network(alpha_intra=self["alpha_intra_us"] * 1e-6, beta_intra=1 / (self["intra_gbps"] * 1e9),
                       alpha_inter=self["alpha_inter_us"] * 1e-6, beta_inter=1 / (self["inter_gbps"] * 1e9),
                       gpus_per_node=self["gpus_per_node"])

    def workload(self) -> Workload:
        return Workload(parameters=self["parameters"], image_seconds=self["image_ms"] * 1e-3,
                        wire_bytes=self["wire_bytes"], buckets=self["buckets"], overlap=self["overlap"])

    def predict(self, workers: int | None = None) -> Prediction:
        """The run at `workers` GPUs (default: the published count) and the published per-GPU batch,
        efficiency relative to the published baseline (e.g. Goyal et al.'s 8 GPUs)."""
        workers = workers or self["workers"]
        batch, group, net, work = self["per_gpu_batch"], self.get("group", 0), self.network(), self.workload()
        base = self["baseline_workers"]
        baseline = predict(work, net, self["algorithm"], base, base * batch, group)
        return predict(work, net, self["algorithm"], workers, workers * batch, group, baseline=baseline)

    def error(self) -> float:
        """Predicted minus published efficiency (0.05 = the prediction is 5 points high)."""
        return self.predict().efficiency - self["efficiency"]


def parse_run(key: str, table: dict[str, Any]) -> PublishedRun:
    """One run from its TOML table; raises ValueError naming the run and the key that is missing or
    not a {value, source} pair."""
    body = {k: v for k, v in table.items() if k != "title"}
    missing = [k for k in REQUIRED if k not in body]
    unknown = [k for k in body if k not in REQUIRED + OPTIONAL]
    if missing or unknown or "title" not in table:
        raise ValueError(f"published run [{key}]: missing {missing + ([] if 'title' in table else ['title'])}, "
                         f"unknown {unknown}")
    values = {}
    for name, entry in body.items():
        if not (isinstance(entry, dict) and set(entry) == {"value", "source"} and entry["source"].strip()):
            raise ValueError(f"published run [{key}]: {name} must be {{ value = ..., source = \"...\" }}")
        values[name] = Sourced(entry["value"], entry["source"])
    return PublishedRun(key, table["title"], values)


def load_published(text: str | None = None) -> list[PublishedRun]:
    """The runs of `text` (TOML), by default the shipped published.toml, in file order."""
    if text is None:
        text = resources.files("largebatch.scaling").joinpath("published.toml").read_text(encoding="utf-8")
    return [parse_run(key, table) for key, table in tomllib.loads(text).items()]
