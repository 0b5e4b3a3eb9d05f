"""Time of one synchronous data-parallel step, and what follows from it: images/s, scaling
efficiency and time to train.

A step is the compute of the per-worker batch (global batch / N images, forward and backward)
plus the part of the gradient all-reduce that the backward pass does not hide. Weak points, on
purpose: compute is linear in the batch (a per-image time measured or given at the per-worker
batch), and stragglers, data loading and the optimizer step are not modelled. Torch-free.
"""

from __future__ import annotations

from dataclasses import dataclass

from largebatch.scaling.network import Network, allreduce_seconds

BACKWARD_FRACTION = 2 / 3
"""Backward share of forward+backward time: backward costs about twice the forward's
multiply-adds (one product for the input gradient, one for the weight gradient; e.g. Kaplan et
al. 2020, §2.1)."""


@dataclass(frozen=True)
class Workload:
    """What one worker computes and sends per step, whatever the number of workers.

    The model enters only through its parameter count (the gradient sent) and its compute time
    per image; `buckets` and `overlap` say how the framework schedules the all-reduce.
    """

    parameters: int
    """Gradient elements all-reduced per step."""
    image_seconds: float
    """Forward and backward time for one image on one worker, at the per-worker batch."""
    wire_bytes: int = 4
    """Bytes per gradient element on the wire: 4 (fp32), 2 (fp16/bf16 compression or fp16 training)."""
    buckets: int = 1
    """All-reduces per step (DDP buckets, Horovod fusion buffers, per-layer); each pays the latency."""
    overlap: float = 0.0
    """Fraction of the all-reduce time that runs under the backward pass (0: none; 1: all, as long
    as the backward pass lasts). Frameworks start a bucket as soon as its gradients are ready, but
    the last bucket and contention leave part of it exposed."""
    backward_fraction: float = BACKWARD_FRACTION
    """Share of `image_seconds` spent in the backward pass, the window communication can hide in."""

    @property
    def gradient_bytes(self) -> int:
        return self.parameters * self.wire_bytes


@dataclass(frozen=True)
class Prediction:
    """One row of a plan: the predicted step of `workers` workers at one global batch."""

    workers: int
    nodes: int
    per_worker_batch: float
    compute_s: float
    """Forward and backward of the per-worker batch."""
    comm_s: float
    """The whole gradient all-reduce."""
    exposed_comm_s: float
    """The part of comm_s the backward pass does not hide."""
    step_s: float
    images_per_s: float
    efficiency: float
    """Images/s per worker relative to the baseline's (1 worker unless stated)."""

    def time_to_train(self, epochs: float, dataset_size: int) -> float:
        """Seconds for `epochs` passes over `dataset_size` images at this rate."""
        return epochs * dataset_size / self.images_per_s


def predict(workload: Workload, net: Network, algorithm: str, workers: int, global_batch: float, group: int = 0,
            baseline: Prediction | None = None) -> Prediction:
    """The step of `workers` workers sharing `global_batch` images.

    Efficiency is throughput per worker relative to `baseline`'s; without one, relative to one
    worker of the same workload, which has no communication: compute time / step time.
    """
    per_worker = global_batch / workers
    compute = workload.image_seconds * per_worker
    comm = allreduce_seconds(algorithm, workload.gradient_bytes, workers, net, workload.buckets, group)
    hidden = min(workload.overlap * comm, workload.backward_fraction * compute)
    step = compute + comm - hidden
    images_per_s = global_batch / step
    per_worker_rate = images_per_s / workers
    base_rate = baseline.images_per_s / baseline.workers if baseline else 1 / workload.image_seconds
    return Prediction(workers=workers, nodes=net.nodes(workers), per_worker_batch=per_worker, compute_s=compute,
                      comm_s=comm, exposed_comm_s=comm - hidden, step_s=step, images_per_s=images_per_s,
                      efficiency=per_worker_rate / base_rate)
