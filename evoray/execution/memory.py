"""The memory model of an Evolver run: what a node's object store and each worker hold.

Written down so the README's formula, the run's own estimate, the tests and
``benchmarks/scale_memory.py`` all use one set of terms. With ``P`` the model's elements,
``s`` its stored bytes per element (2 for bf16/fp16, 4 for fp32), ``N`` members and a chunk of
``C`` elements (``evoray.strategies.de.default_chunk``: 2^18 on a CPU, 2^22 on a GPU):

Per node (Ray's object store, shared zero-copy by that node's workers; no worker copies it):
    population  N * P * s        the members, in their stored dtype
    base        P * s            when the run has a base (kinship, task-vector merges)
    merged      4 * P            merger mode: the merge of the population, float32
    statistics  Fisher: N * P * c (c = 2 for 16-bit models, else 4); RegMean: 4 * N * sum d^2
                over linear weights of input width d
    keeps       up to N * P * s  while a generation's accepted offspring are written, before
                their parents' vectors are freed (transient)

Per worker (on its device): its model, ``P * s``, plus build scratch of about 32 float32
values per element of one range (one chunk; for RegMean a linear weight is never cut, so
``max(C, largest linear weight)``, and one ``d x d`` float32 coefficient matrix; for greedy
merging and recipe search, whose method merges go tensor by tensor straight into the model,
about 4 float32 per input model per element of the largest tensor, if that is larger), plus the
evaluation's activations (batch-dependent, not modelled) and the process's runtime (Python,
torch, transformers: measured, not modelled). In merger mode the worker that updates the merge
(once per generation) also holds the float32 merged vector, ``4 * P``, while returning it; in
individual mode, for models up to 1 GiB (``execution.population.KEEP_SCORED_MAX_BYTES``), a
worker returns the offspring that beat their parents as scored (instead of a rebuild call),
holding up to ``ceil(N / W) * P * s`` of host copies (``W`` workers) while its call returns;
larger offspring are rebuilt into the worker's own model, which the store copies from (a
GPU worker: through one host copy, ``P * s``, while the call returns).
These two are host memory; on a GPU worker the device holds model + scratch. A GPU worker
also reads the checkpoint into host memory once at start, one tensor at a time into the device.

Before the search (not a term here): each worker leaves its member's Fisher / RegMean
statistics in its node's store, one object per tensor (``4 * P`` per member for Fisher), and
the driver builds the merger from them tensor by tensor
(``execution.population.StoredStatistics``): it holds the coefficients above plus one tensor
of every member and float64 sums over ``mergers.STAT_CHUNK`` elements, never ``4 * N * P``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from evoray.weights.layout import Layout

#: float32-sized temporaries per element of a build range (target, reference, mutant, parent,
#: trial, base, the kinship deltas and their float64 sums, the mask's two int32 hash words, a
#: bool, allocator slack): measured up to 25 in merger mode with a base on a CPU
#: (tests/test_memory_model.py), rounded up.
SCRATCH_FLOATS = 32

#: float32-sized temporaries per element of the largest tensor and per input model of a method
#: merge (greedy merging, recipe search; ``merge.walker.merge_slots``): the inputs on the
#: worker's device, the method's stacks, masks and signs: measured up to 2.4 (DARE-TIES, 4
#: models and a base, tests/test_memory_model.py), rounded up.
MERGE_SCRATCH_FLOATS = 4

GIB = 1024**3


@dataclass(frozen=True)
class MemoryModel:
    """Bytes of each term of the formula above, for one run."""

    elements: int
    storage_bytes: int
    members: int
    largest_tensor: int  # RegMean: the largest linear weight (never cut into ranges)
    chunk: int
    merger: str = "none"  # none | average | fisher | regmean
    has_base: bool = False
    regmean_elements: int = 0  # sum over linear weights of d^2 (RegMean only)
    largest_gram: int = 0  # max d^2 over linear weights (RegMean only)
    merge_inputs: int = 0  # models one method merge reads (greedy / recipe search), else 0
    largest_slot: int = 0  # the largest tensor of the layout (a method merge's unit)

    @classmethod
    def for_run(
        cls,
        layout: Layout,
        members: int,
        *,
        merger: str = "none",
        has_base: bool = False,
        device: str = "cpu",
        merge_inputs: int = 0,
    ) -> MemoryModel:
        from evoray.strategies.de import default_chunk

        linear = [s for s in layout.slots if len(s.shape) == 2]
        return cls(
            elements=layout.numel,
            storage_bytes=layout.storage_dtype.itemsize,
            members=members,
            largest_tensor=max(s.numel for s in (linear if merger == "regmean" else layout.slots)),
            chunk=default_chunk(device),
            merger=merger,
            has_base=has_base,
            regmean_elements=sum(s.shape[1] ** 2 for s in linear) if merger == "regmean" else 0,
            largest_gram=max((s.shape[1] ** 2 for s in linear), default=0)
            if merger == "regmean"
            else 0,
            merge_inputs=merge_inputs,
            largest_slot=max(s.numel for s in layout.slots),
        )

    # -- per node ---------------------------------------------------------------------------

    @property
    def model_bytes(self) -> int:
        return self.elements * self.storage_bytes

    @property
    def population_bytes(self) -> int:
        return self.members * self.model_bytes

    @property
    def base_bytes(self) -> int:
        return self.model_bytes if self.has_base else 0

    @property
    def merged_bytes(self) -> int:
        return 4 * self.elements if self.merger != "none" else 0

    @property
    def statistics_bytes(self) -> int:
        if self.merger == "fisher":
            return self.members * self.elements * (2 if self.storage_bytes <= 2 else 4)
        if self.merger == "regmean":
            return 4 * self.members * self.regmean_elements
        return 0

    @property
    def store_bytes(self) -> int:
        """What the object store of every node holding workers keeps for the whole run."""
        return self.population_bytes + self.base_bytes + self.merged_bytes + self.statistics_bytes

    @property
    def store_peak_bytes(self) -> int:
        """``store_bytes`` plus the keeps of one generation (all members replaced)."""
        return self.store_bytes + self.population_bytes

    # -- per worker -------------------------------------------------------------------------

    @property
    def range_elements(self) -> int:
        if self.merger == "regmean":
            return max(self.chunk, self.largest_tensor)
        return min(self.chunk, self.elements)

    @property
    def scratch_bytes(self) -> int:
        """The larger of a build's scratch and a method merge's (only where the run merges)."""
        build = SCRATCH_FLOATS * 4 * self.range_elements + 4 * self.largest_gram
        return max(build, MERGE_SCRATCH_FLOATS * 4 * self.merge_inputs * self.largest_slot)

    @property
    def merge_output_bytes(self) -> int:
        """Merger mode: the float32 merged vector a worker computes (once per generation,
        on one worker) and returns to the store: the size of ``merged_bytes``."""
        return self.merged_bytes

    @property
    def device_bytes(self) -> int:
        """What a GPU worker's device holds: its model and the build scratch."""
        return self.model_bytes + self.scratch_bytes

    def kept_bytes(self, workers: int) -> int:
        """Individual mode: offspring that beat their parent go back to the store as scored
        (no rebuild call), so a worker holds host copies of its call's kept offspring, at
        most ``ceil(N / workers)``, while the call returns."""
        from evoray.execution.population import KEEP_SCORED_MAX_BYTES

        if self.merger != "none" or self.model_bytes > KEEP_SCORED_MAX_BYTES:
            return 0
        return -(-self.members // workers) * self.model_bytes

    def worker_bytes(self, workers: int = 1) -> int:
        """One worker's peak when ``workers`` share a generation: model, build scratch, its
        kept offspring (individual mode) or the merged vector it may compute (merger mode);
        activations and the runtime not included."""
        return (
            self.model_bytes
            + self.scratch_bytes
            + self.merge_output_bytes
            + self.kept_bytes(workers)
        )

    def node_bytes(self, workers: int) -> int:
        """A node with ``workers`` workers: its store (with keeps) and their models; in merger
        mode one worker at a time (the one updating the merge) holds the merged output."""
        per_worker = self.worker_bytes(workers) - self.merge_output_bytes
        return self.store_peak_bytes + workers * per_worker + self.merge_output_bytes

    def summary(self, workers: int, workers_per_node: int) -> str:
        """One line for the run's start: the estimate in GiB."""

        g = human_bytes
        return (
            f"memory estimate: object store {g(self.store_bytes)} per node "
            f"(+{g(self.population_bytes)} while a generation's keeps are written), "
            f"{g(self.worker_bytes(workers))} per worker "
            f"(model {g(self.model_bytes)} on its device + scratch {g(self.scratch_bytes)}"
            f" + kept/merged {g(self.worker_bytes(workers) - self.device_bytes)} on the host), "
            f"{workers_per_node} worker(s) per node"
        )


def human_bytes(b: float) -> str:
    """``1.50 GiB``, ``12.0 MiB``, ``0 B``: the unit that keeps the number readable."""
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b:.0f} B"


def rss_anon(pid: int | str = "self") -> int:
    """Private (anonymous) resident bytes of a process (Linux ``/proc``): what a worker holds
    itself, apart from the object store's shared pages it maps."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise OSError(f"no RssAnon in /proc/{pid}/status")


class AnonPeak:
    """Peak of ``rss_anon`` of some processes, sampled by a thread while a block runs (torch
    releases the GIL in its kernels, so the sampler sees their allocations)."""

    def __init__(self, pids: list[int | str] | None = None, interval_s: float = 0.001) -> None:
        self.pids = pids or ["self"]
        self.interval_s = interval_s
        self.start = {p: 0 for p in self.pids}
        self.peak = {p: 0 for p in self.pids}

    def __enter__(self) -> AnonPeak:
        import threading

        self.start = {p: rss_anon(p) for p in self.pids}
        self.peak = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval_s)

    def _sample(self) -> None:
        for p in self.pids:
            with contextlib.suppress(OSError):  # the process ended
                self.peak[p] = max(self.peak[p], rss_anon(p))

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def increase(self, pid: int | str = "self") -> int:
        """Peak minus the value at the start."""
        return self.peak[pid] - self.start[pid]
