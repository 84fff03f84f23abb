"""Driver memory of building the Fisher merger: every member's statistics fetched at once (as
the driver did before) against reading them tensor by tensor from the object store.

    python benchmarks/fisher_driver_memory.py              # 4 members x 33.6M bf16 parameters
    python benchmarks/fisher_driver_memory.py --quick      # 4 x 8.4M, seconds

Two workers (Ray actors) make each member's Fisher (random positive float32 per tensor, seeded
by member and tensor, so both ways see the same numbers) and return it either as tensors
(``ray.get`` of them all on the driver, then the whole-tensor float64 construction FisherMerger
had: the "before") or as one object ref per tensor (``store_statistics``, read by
``StoredStatistics`` while ``FisherMerger`` is built: the "after"). The driver's private memory
(``RssAnon``: apart from the object store's shared pages it maps) is sampled while each builds;
printed against the coefficients' bytes (``N P 2`` for a 16-bit model) and ``4 N P`` (every
member's statistics in float32). Targets: after <= coefficients + 8 N x largest tensor x 4
bytes; before >= 4 N P. Both builds' coefficients must be bit-identical.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import ray
import torch

from evoray.execution.memory import AnonPeak
from evoray.execution.population import StoredStatistics, store_statistics
from evoray.population.mergers import FisherMerger
from evoray.weights.layout import Layout
from evoray.weights.tensor_files import TensorInfo

MIB = 1 << 20


class StatsWorker:
    """Makes one member's synthetic Fisher, as tensors or as refs (like ``statistics``)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]]) -> None:
        self.shapes = shapes

    def fisher(self, member: int, as_refs: bool):
        out = {}
        for k, (name, shape) in enumerate(self.shapes.items()):
            g = torch.Generator().manual_seed(member * 100_003 + k)
            out[name] = torch.rand(shape, generator=g)
        return store_statistics(out) if as_refs else out


def whole_tensor_coef(layout: Layout, fishers, smoothing: float = 1e-10) -> np.ndarray:
    """FisherMerger's construction before it streamed (whole tensors stacked in float64)."""
    n = len(fishers)
    coef = np.empty((n, layout.numel), dtype=np.float16)
    for slot in layout.slots:
        cols = [f[slot.name].reshape(-1).to(torch.float64) for f in fishers]
        w = torch.stack(cols).add_(smoothing)
        total = w.sum(0)
        c = torch.where(total > 0, w / total, torch.full_like(w, 1.0 / n))
        coef[:, slot.offset : slot.offset + slot.numel] = c.numpy()
    return coef


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=4)
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--width", type=int, default=1 << 20, help="elements per tensor")
    ap.add_argument("--quick", action="store_true", help="8 tensors of --width")
    args = ap.parse_args()
    tensors = 8 if args.quick else args.tensors
    n, width = args.members, args.width
    infos = [TensorInfo(f"layers.{k}.weight", (width,), torch.bfloat16) for k in range(tensors)]
    layout = Layout.from_infos(infos, source="synthetic")
    p = layout.numel
    stats_bytes = 4 * n * p
    ray.init(
        num_cpus=2,
        object_store_memory=2 * stats_bytes + 256 * MIB,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        shapes = {s.name: s.shape for s in layout.slots}
        workers = [ray.remote(StatsWorker).options(num_cpus=0).remote(shapes) for _ in range(2)]

        def submit(as_refs: bool):
            return [workers[i % 2].fisher.remote(i, as_refs) for i in range(n)]

        ray.get(submit(True))  # warm the workers (imports, first allocations)
        refs = ray.get(submit(True))  # made before the sampling: only the build is measured
        t0 = time.perf_counter()
        with AnonPeak() as after:
            coef_after = FisherMerger(layout, [StoredStatistics(r) for r in refs]).coef
        t_after = time.perf_counter() - t0
        del refs
        pending = submit(False)
        ray.wait(pending, num_returns=n)
        t0 = time.perf_counter()
        with AnonPeak() as before:
            coef_before = whole_tensor_coef(layout, ray.get(pending))
        t_before = time.perf_counter() - t0
        del pending
    finally:
        ray.shutdown()
    same = bool(np.array_equal(coef_after.view(np.uint16), coef_before.view(np.uint16)))
    coef_bytes = coef_after.nbytes
    bound = coef_bytes + 8 * n * width * 4
    figures = {
        "members": n,
        "parameters": p,
        "coef_mib": round(coef_bytes / MIB, 1),
        "stats_mib": round(stats_bytes / MIB, 1),
        "driver_before_mib": round(before.increase() / MIB, 1),
        "driver_after_mib": round(after.increase() / MIB, 1),
        "after_over_before": round(after.increase() / before.increase(), 3),
        "after_over_coef": round(after.increase() / coef_bytes, 3),
        "after_within_bound": after.increase() <= bound,
        "before_at_least_stats": before.increase() >= stats_bytes,
        "seconds_before": round(t_before, 2),
        "seconds_after": round(t_after, 2),
        "coef_bit_identical": same,
    }
    print(
        f"{n} members x {p / 1e6:.1f}M parameters (bf16): coefficients {figures['coef_mib']} "
        f"MiB, every member's statistics {figures['stats_mib']} MiB"
    )
    print(
        f"driver peak above idle: before {figures['driver_before_mib']} MiB "
        f"({t_before:.2f} s), after {figures['driver_after_mib']} MiB ({t_after:.2f} s); "
        f"after/before {figures['after_over_before']}, after/coefficients "
        f"{figures['after_over_coef']}; coefficients bit-identical: {same}"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
