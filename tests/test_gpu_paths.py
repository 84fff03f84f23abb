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


def test_method_merges_on_the_gpu_equal_the_cpu():
    """Greedy / recipe-search merges run tensor by tensor on the worker's device; DARE's mask
    is drawn on the CPU, so a GPU merge keeps the same elements as ``evoray merge``."""
    from evoray.merge.walker import merge_flat, merge_slots
    from evoray.weights.layout import Layout

    class Info:
        def __init__(self, name, shape):
            self.name, self.shape, self.dtype = name, shape, torch.bfloat16

    layout = Layout.from_infos([Info("a", (300, 70)), Info("b", (11,))], source="t")
    g = torch.Generator().manual_seed(3)
    members = [torch.randn(layout.numel, generator=g).to(torch.bfloat16) for _ in range(3)]
    base = torch.randn(layout.numel, generator=g).to(torch.bfloat16)
    for method in ("dare_ties", "ties", "linear"):
        per = [{"weight": 1.0} if method == "linear" else {"weight": 1.0, "density": 0.5}] * 3
        cpu = merge_flat(method, layout, members, base, per, {}, n_layers=1)
        gpu = torch.empty(layout.numel, dtype=torch.bfloat16, device="cuda")
        for s, merged in merge_slots(
            method, layout, members, base, per, {}, n_layers=1, device="cuda"
        ):
            gpu[s.offset : s.offset + s.numel] = merged.reshape(-1)
        assert ((gpu.cpu() == 0) == (cpu == 0)).all(), method  # the same elements kept
        torch.testing.assert_close(gpu.cpu().float(), cpu.float(), atol=1e-2, rtol=1e-2)


# -- workers spanning GPUs, and workers sharing one --------------------------------------------

needs_two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
_RECIPES = [(0, (1,), 0.7, 0.8, 3, "evolver"), (2, (0, 1, 3), 0.5, 0.4, 2**61 + 9, "rand1")]


@pytest.fixture(scope="module")
def lm_members(tmp_path_factory):
    """Four tiny Llamas (6 blocks) and their base, as paths, layout and flat vectors."""
    from tests.lm_fixtures import make_members

    return make_members(tmp_path_factory.mktemp("gpu-lms"), "llama", num_hidden_layers=6)


def _spec(lm_members, device: str, n: int = 1):
    from evoray.execution.worker import WorkerSpec
    from tests.lm_fixtures import TextLogLik

    paths, layout, _, _ = lm_members
    return WorkerSpec(paths[0], layout, TextLogLik(), device=device, metric="loglik", num_devices=n)


@needs_two_gpus
def test_a_two_gpu_worker_equals_a_one_gpu_worker(lm_members):
    """Layers on cuda:0 and cuda:1 (accelerate's hooks move activations): the offspring is
    bit-identical to the CPU build and scores as on one GPU, in individual and merger mode."""
    import numpy as np

    from evoray.execution.worker import OffspringWorker
    from evoray.population.mergers import AverageMerger
    from evoray.strategies.de import Recipe, build_offspring
    from evoray.weights.flat import from_numpy, to_numpy
    from evoray.weights.placement import read_flat

    _, layout, pop_np, base = lm_members
    pop = [from_numpy(a) for a in pop_np]
    merger = AverageMerger(layout, len(pop))
    one, two = (OffspringWorker(_spec(lm_members, "cuda", n)) for n in (1, 2))
    assert {p.device for p in two.model.parameters()} == {
        torch.device("cuda", 0),
        torch.device("cuda", 1),
    }
    assert {s.device for s in two.segments} == {torch.device("cuda", 0), torch.device("cuda", 1)}
    for w in (one, two):
        w.set_population(*pop_np)
        w.base, w.merged, w.merger = from_numpy(base), merger.merge(pop), merger
    for t in _RECIPES:
        r = Recipe(*t)
        a, b = one.evaluate_recipe(r), two.evaluate_recipe(r)
        np.testing.assert_array_equal(read_flat(two.segments), to_numpy(build_offspring(r, pop)))
        assert b["fitness"] == pytest.approx(a["fitness"], rel=1e-5)
        assert b["kinship_to_parent"] == pytest.approx(a["kinship_to_parent"], rel=1e-6)
        a, b = one.evaluate_recipe(r, merged=True), two.evaluate_recipe(r, merged=True)
        np.testing.assert_array_equal(read_flat(two.segments), read_flat(one.segments))
        assert b["fitness"] == pytest.approx(a["fitness"], rel=1e-5)


@needs_two_gpus
def test_a_ray_worker_with_two_gpus_spans_both(lm_members, ray_local):
    """``gpus_per_worker: 2``: Ray gives the actor two GPUs, visible to it as cuda:0 and 1."""
    import ray

    from evoray.execution.pool import WorkerPool
    from tests import lm_fixtures

    ray.cloudpickle.register_pickle_by_value(lm_fixtures)
    pool = WorkerPool(_spec(lm_members, "cuda", 2), 1, num_cpus=0.5, num_gpus=2)
    try:
        (actor,) = pool.actors
        devices = ray.get(actor.__ray_call__.remote(lambda w: sorted(map(str, w.devices))))
        assert devices == ["cuda:0", "cuda:1"]
    finally:
        pool.shutdown()


def test_four_workers_share_one_gpu_at_a_quarter_each(lm_members, ray_local):
    """``gpus_per_worker: 0.25``: Ray packs four workers on one GPU; all run and score."""
    import ray

    from evoray.execution.pool import WorkerPool
    from evoray.strategies.de import Recipe
    from tests import lm_fixtures

    ray.cloudpickle.register_pickle_by_value(lm_fixtures)
    _, _, pop_np, _ = lm_members
    pool = WorkerPool(_spec(lm_members, "cuda"), 4, num_cpus=0.25, num_gpus=0.25)
    try:
        refs = [ray.put(a) for a in pop_np]
        recipes = [Recipe(*_RECIPES[i % 2]) for i in range(4)]
        results = pool.evaluate_recipes(recipes, refs, merged=False)
        assert [r["device"] for r in results] == ["cuda"] * 4
        assert len({r["pid"] for r in results}) == 4
        gpu_ids = ray.get([a.__ray_call__.remote(lambda w: ray.get_gpu_ids()) for a in pool.actors])
        assert all(len(g) == 1 for g in gpu_ids), gpu_ids  # a share of one GPU each
        if torch.cuda.device_count() == 1:  # Ray may spread shares over several GPUs
            assert len({tuple(g) for g in gpu_ids}) == 1, gpu_ids
        assert results[0]["fitness"] == pytest.approx(results[2]["fitness"], rel=1e-6)
    finally:
        pool.shutdown()
