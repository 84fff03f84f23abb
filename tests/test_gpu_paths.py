"""GPU paths: skipped without CUDA (CI has none); run them on a GPU machine with
`pytest -m gpu` or `pytest tests/test_gpu_paths.py`."""

from __future__ import annotations

import pytest
import torch

from evoray.kinship.metrics import kinship_flat

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def test_kinship_of_a_gpu_offspring_against_cpu_parents():
    """A GPU worker scores kinship of its on-device offspring against CPU population vectors."""
    g = torch.Generator().manual_seed(0)
    base, parent, child = (torch.randn(10_000, generator=g) for _ in range(3))
    on_cpu = kinship_flat(child, parent, base, chunk=4096).as_dict()
    mixed = kinship_flat(child.cuda(), parent, base, chunk=4096).as_dict()
    assert mixed == pytest.approx(on_cpu, rel=1e-5)


def test_offspring_built_on_the_gpu_equal_the_cpu_build():
    """Masks are integer hashes computed on the worker's device: a GPU worker builds, from
    host population vectors, exactly the offspring a CPU worker builds for the same recipe."""
    from evoray.strategies.de import BLOCK, Recipe, build_offspring

    g = torch.Generator().manual_seed(1)
    for dtype in (torch.float32, torch.bfloat16):
        pop = [torch.randn(3 * BLOCK + 123, generator=g).to(dtype) for _ in range(4)]
        for r in (
            Recipe(0, (2,), 0.5, 0.3, 2**62 + 5),
            Recipe(1, (0, 2, 3), 0.8, 0.9, 7, "rand1"),
        ):
            cpu = build_offspring(r, pop)
            gpu = build_offspring(r, pop, torch.empty_like(pop[0], device="cuda"))
            assert gpu.device.type == "cuda" and torch.equal(gpu.cpu(), cpu), (dtype, r)


def test_merger_ranges_on_the_gpu_equal_the_cpu():
    from evoray.population.mergers import FisherMerger
    from evoray.weights.layout import Layout

    class Info:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, torch.bfloat16

    layout = Layout.from_infos([Info("a", (300, 7)), Info("b", (11,))], source="t")
    g = torch.Generator().manual_seed(2)
    m = FisherMerger(layout, [{"a": torch.rand(300, 7), "b": torch.rand(11)} for _ in range(3)])
    t = torch.randn(layout.numel, generator=g)
    cpu, gpu = torch.zeros(layout.numel), torch.zeros(layout.numel, device="cuda")
    for lo, hi in m.ranges(1000):
        m.add_range(cpu[lo:hi], 1, t[lo:hi], lo, hi)
        m.add_range(gpu[lo:hi], 1, t[lo:hi].cuda(), lo, hi)
    torch.testing.assert_close(gpu.cpu(), cpu)
