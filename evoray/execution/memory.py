"""The memory a search run needs, per worker and per node, as a formula of its layout.

Written out so users can size a cluster before starting (README "Memory"), the run can warn
before Tune starts when a node cannot hold it, and tests and ``benchmarks/scale_memory.py`` can
hold the code to it. With ``P`` elements per model, ``b_s`` bytes per stored element (bf16: 2),
``b_c`` per compute element, ``n`` members:

- per node (Ray's object store, shared zero-copy by that node's workers):
  population ``(n + base) * P * b_s``; merged model ``4 P`` (merger mode); merger statistics
  (Fisher: ``2 n P``, float16 coefficients; RegMean: at most ``4 n * sum(in^2)`` over linear
  weights, once per distinct input); greedy's kept candidates ``(k + new) * P * b_s``.
- per worker (on its device): the model ``P * b_c`` plus float32 scratch of a few chunks of
  ``min(chunk, largest tensor)`` elements (the offspring is built range by range), plus the
  evaluation's activations (depend on ``batch_size`` and text length; not modelled).

Process overhead (Python, torch, Ray: a few hundred MB per process) is not in the formula; the
benchmark measures it apart.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from evoray.weights.layout import Layout

SCRATCH_CHUNK = 1 << 22  # elements per build range (evoray.strategies.de's chunk)
SCRATCH_BUFFERS = 4  # float32 chunks alive at once while building a range (x, v, diff, trial)


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of each term; ``per_worker`` on the worker's device, ``per_node`` on the host."""

    population: int
    merged: int
    statistics: int
    candidates: int
    model: int
    scratch: int
    workers_per_node: int
    worker_on_host: bool = True  # CPU workers hold their model in host memory

    @property
    def per_worker(self) -> int:
        return self.model + self.scratch

    @property
    def object_store(self) -> int:
        """What the node's object store holds (once, whatever the number of workers)."""
        return self.population + self.merged + self.statistics + self.candidates

    @property
    def per_node(self) -> int:
        """Host memory of one node: the object store plus its CPU workers' models."""
        workers = self.workers_per_node * self.per_worker if self.worker_on_host else 0
        return self.object_store + workers

    def lines(self) -> list[str]:
        """The terms in GiB, for messages and the benchmark."""
        g = 1 << 30
        return [
            f"population {self.population / g:.2f} GiB, merged {self.merged / g:.2f} GiB, "
            f"statistics {self.statistics / g:.2f} GiB, candidates {self.candidates / g:.2f} GiB"
            f" (object store {self.object_store / g:.2f} GiB per node)",
            f"per worker: model {self.model / g:.2f} GiB + scratch {self.scratch / g:.2f} GiB"
            f" x {self.workers_per_node} worker(s) per node",
        ]


def regmean_bytes(layout: Layout, n: int) -> int:
    """Upper bound of RegMean's coefficients: one float32 (in, in) matrix per model and 2-D
    weight (weights sharing an input share one, so real runs store less)."""
    return sum(4 * n * s.shape[1] ** 2 for s in layout.slots if len(s.shape) == 2)


def memory_plan(
    layout: Layout,
    *,
    members: int,
    has_base: bool,
    merger: str | None = None,
    kept_candidates: int = 0,
    workers_per_node: int = 1,
    compute_dtype: torch.dtype | None = None,
    worker_on_host: bool = True,
) -> MemoryPlan:
    """The formula above for one run; ``merger`` is None (individual), average, fisher or
    regmean; ``kept_candidates`` the vectors a greedy search holds besides the members."""
    p = layout.numel
    stored = layout.storage_dtype.itemsize
    compute = (compute_dtype or layout.storage_dtype).itemsize
    largest = max((s.numel for s in layout.slots), default=0)
    stats = 0
    if merger == "fisher":
        stats = 2 * members * p
    elif merger == "regmean":
        stats = regmean_bytes(layout, members)
    return MemoryPlan(
        population=(members + int(has_base)) * p * stored,
        merged=4 * p if merger else 0,
        statistics=stats,
        candidates=kept_candidates * p * stored,
        model=p * compute,
        scratch=SCRATCH_BUFFERS * 4 * min(SCRATCH_CHUNK, max(largest, 1)),
        workers_per_node=workers_per_node,
        worker_on_host=worker_on_host,
    )
