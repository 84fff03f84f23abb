"""Workers spanning several devices: the layer plan, and the multi-segment worker on CPU.

``plan_devices`` cuts a layout into per-device runs of whole layers balanced by bytes; a worker
with ``num_devices=2`` on the CPU builds, binds and scores through two segments exactly as a
one-segment worker does (the GPU run of the same path is in test_gpu_paths.py).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.kinship.metrics import kinship_flat
from evoray.models.pool import ModelPool, load_model
from evoray.population.mergers import AverageMerger, FisherMerger
from evoray.strategies.de import Recipe, build_offspring
from evoray.weights.device_plan import (
    layout_units,
    make_segments,
    model_device_map,
    plan_devices,
    worker_devices,
)
from evoray.weights.flat import from_numpy, to_numpy
from evoray.weights.layers import layer_index
from evoray.weights.layout import Layout
from evoray.weights.placement import read_flat
from tests.lm_fixtures import TextLogLik, make_members, make_model

LAYERS = {"llama": "num_hidden_layers", "llama-tied": "num_hidden_layers", "gpt2": "n_layer"}
ARCHS = [*LAYERS, "gpt2-untied"]


def _model(tmp_path: Path, arch: str, n_layers: int = 5, **kw) -> str:
    key = LAYERS.get(arch, "n_layer")
    return str(make_model(tmp_path / arch, arch, **{key: n_layers}, **kw))


def check_plan(layout: Layout, plan) -> None:
    """The invariants every plan keeps."""
    # Ranges are sorted, contiguous and cover the layout.
    assert plan.ranges[0][0] == 0 and plan.ranges[-1][1] == layout.numel
    for (_, stop, _), (start, _, _) in zip(plan.ranges, plan.ranges[1:], strict=False):
        assert stop == start
    # No tensor is cut: each lies inside one range, on its unit's device.
    for s in layout.slots:
        (dev,) = {d for a, b, d in plan.ranges if a < s.offset + s.numel and s.offset < b}
        assert dev == plan.tensor_devices[s.name]
    # Units are whole and cover every tensor once; devices follow the forward order.
    names = [n for u in plan.units for n in u.names]
    assert sorted(names) == sorted(layout.names)
    assert list(plan.unit_devices) == sorted(plan.unit_devices)
    assert set(plan.unit_devices) == set(range(plan.n_devices))
    for u, d in zip(plan.units, plan.unit_devices, strict=True):
        assert {plan.tensor_devices[n] for n in u.names} == {d}
    # Balance: each device within one unit's bytes of an equal share (when no unit is larger).
    share = sum(u.nbytes for u in plan.units) / plan.n_devices
    biggest = max(u.nbytes for u in plan.units)
    if biggest <= share:
        for b in plan.device_bytes():
            assert abs(b - share) <= biggest, (plan.device_bytes(), share, biggest)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("n", [2, 3])
def test_plan_of_tiny_lms_keeps_layers_whole_and_balanced(tmp_path: Path, arch: str, n: int):
    path = _model(tmp_path, arch, 6, vocab_size=64)
    layout = ModelPool((path,)).layout()
    model, _ = load_model(path)
    order = [name for name, _ in model.named_parameters()]
    plan = plan_devices(layout, n, order)
    check_plan(layout, plan)
    first, last = plan.units[0], plan.units[-1]
    assert not first.block and not last.block
    assert plan.unit_devices[0] == 0 and plan.unit_devices[-1] == n - 1
    assert all(layer_index(x) is None for x in first.names + last.names)
    assert any("emb" in x or "wte" in x for x in first.names)
    # Blocks appear in index order (the layout itself lists block 10 before block 2).
    blocks = [layer_index(u.names[0]) for u in plan.units if u.block]
    assert blocks == list(range(6))
    # The model map puts every module somewhere; a tied head goes with its embedding.
    dmap = model_device_map(model, plan)
    emb_dev = plan.tensor_devices[next(x for x in first.names if "emb" in x or "wte" in x)]
    head = "lm_head"
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert dmap[head] == (emb_dev if tied else n - 1)
    assert tied == (arch in ("llama-tied", "gpt2"))
    from accelerate.utils import check_device_map

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an unknown key is a warning there
        check_device_map(model, dmap)


def test_plan_without_model_order_sorts_blocks_by_index(tmp_path: Path):
    layout = ModelPool((_model(tmp_path, "llama", 12),)).layout()
    assert layout.names[0] == "lm_head.weight"  # alphabetical: head first, layers.10 < layers.2
    units = layout_units(layout)
    assert [layer_index(u.names[0]) for u in units if u.block] == list(range(12))
    assert units[0].names == ("model.embed_tokens.weight",)
    assert set(units[-1].names) == {"lm_head.weight", "model.norm.weight"}
    plan = plan_devices(layout, 4)
    check_plan(layout, plan)
    assert plan.tensor_devices["lm_head.weight"] == 3
    assert len(plan.ranges) > 4  # device 3's head sits before device 0's embedding


class _Info:
    def __init__(self, name: str, numel: int) -> None:
        self.name, self.shape, self.dtype = name, (numel,), torch.bfloat16


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 50), min_size=1, max_size=20),
    pre=st.integers(1, 400),
    post=st.integers(1, 400),
    n=st.integers(1, 6),
)
def test_plan_invariants_on_random_layouts(sizes: list[int], pre: int, post: int, n: int):
    infos = [_Info("embed.weight", pre)]
    for i, s in enumerate(sizes):
        infos += [_Info(f"layers.{i}.a.weight", s), _Info(f"layers.{i}.b.weight", 1)]
    infos.append(_Info("norm.weight", post))
    layout = Layout.from_infos(infos, source="t")
    if n > len(sizes) + 2:
        with pytest.raises(ValueError, match="cannot spread"):
            plan_devices(layout, n)
        return
    plan = plan_devices(layout, n)
    check_plan(layout, plan)
    assert plan.tensor_devices["embed.weight"] == 0
    assert plan.tensor_devices["norm.weight"] == n - 1
    segments = make_segments(plan, torch.float32, ["cpu"] * n)
    assert [(s.start, s.stop) for s in segments] == [(a, b) for a, b, _ in plan.ranges]


def test_worker_devices():
    assert worker_devices("cpu", 2) == [torch.device("cpu")] * 2
    assert worker_devices("cuda", 1) == [torch.device("cuda")]
    if torch.cuda.device_count() < 2:
        with pytest.raises(RuntimeError, match=r"execution\.gpus_per_worker is 2"):
            worker_devices("cuda", 2)


# -- the worker on two CPU segments --------------------------------------------------------------

RECIPES = [
    Recipe(0, (1,), 0.7, 0.8, 3),
    Recipe(2, (0, 1, 3), 0.5, 0.4, 2**61 + 9, "rand1"),
    Recipe(1, (2,), 1.2, 0.2, 11),
]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def members(request, tmp_path_factory):
    key = LAYERS[request.param]
    return make_members(tmp_path_factory.mktemp(request.param), request.param, **{key: 4})


def _worker(members, n: int) -> OffspringWorker:
    paths, layout, pop, base = members
    spec = WorkerSpec(paths[0], layout, TextLogLik(), metric="loglik", num_devices=n)
    w = OffspringWorker(spec)
    w.set_population(*pop)
    w.base = from_numpy(base)
    return w


def test_two_segment_worker_equals_one_segment_worker(members):
    one, two = _worker(members, 1), _worker(members, 2)
    assert len(one.segments) == 1 and len(two.segments) >= 2
    assert two.buffer is None and two.plan is not None
    pop = [from_numpy(a) for a in members[2]]
    for r in RECIPES:
        a, b = one.evaluate_recipe(r), two.evaluate_recipe(r)
        assert b["fitness"] == a["fitness"] and b["scores"] == a["scores"]
        want = to_numpy(build_offspring(r, pop))
        kin = kinship_flat(from_numpy(want), pop[r.target], two.base).pearson
        # float32 dot products per chunk: equal up to rounding, whatever the segments
        assert b["kinship_to_parent"] == pytest.approx(kin, rel=1e-6)
        assert a["kinship_to_parent"] == pytest.approx(kin, rel=1e-6)
        np.testing.assert_array_equal(read_flat(two.segments), want)
        np.testing.assert_array_equal(read_flat(one.segments), want)
    # The same vector written whole scores the same in both.
    flat = members[2][3]
    assert two.evaluate_vector(flat)["fitness"] == one.evaluate_vector(flat)["fitness"]


@pytest.mark.parametrize("kind", ["average", "fisher"])
def test_two_segment_worker_equals_one_segment_worker_in_merger_mode(members, kind):
    _, layout, pop_np, _ = members
    pop = [from_numpy(a) for a in pop_np]
    if kind == "average":
        merger = AverageMerger(layout, len(pop))
    else:
        g = torch.Generator().manual_seed(4)
        stats = [
            {s.name: torch.rand(s.shape, generator=g) + 0.1 for s in layout.slots} for _ in pop
        ]
        merger = FisherMerger(layout, stats)
    merged = merger.merge(pop).numpy()
    one, two = _worker(members, 1), _worker(members, 2)
    for w in (one, two):
        w.merged, w.merger = from_numpy(merged), merger
    for r in RECIPES:
        a, b = one.evaluate_recipe(r, merged=True), two.evaluate_recipe(r, merged=True)
        assert b["fitness"] == a["fitness"]
        assert b["kinship_to_parent"] == pytest.approx(a["kinship_to_parent"], rel=1e-6)
        np.testing.assert_array_equal(read_flat(two.segments), read_flat(one.segments))


def test_dispatched_model_keeps_its_binding_and_outputs(members):
    """accelerate's hooks (what spreads the model over GPUs) on CPU: the map covers the model,
    the hooks move nothing that is bound, and the outputs do not change."""
    from accelerate import dispatch_model

    w = _worker(members, 2)
    ids = torch.tensor([[7, 12, 30, 41, 9, 22], [8, 19, 33, 60, 2, 17]])
    with torch.no_grad():
        before = w.model(input_ids=ids).logits
    dmap = model_device_map(w.model, w.plan)
    assert set(dmap.values()) == {0, 1}
    dispatch_model(w.model, {k: "cpu" for k in dmap}, main_device="cpu", force_hooks=True)
    with torch.no_grad():
        after = w.model(input_ids=ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    # Still bound: a build into the segments changes the model's outputs.
    w.evaluate_recipe(RECIPES[0])
    with torch.no_grad():
        rebuilt = w.model(input_ids=ids).logits
    assert not torch.equal(rebuilt, before)


@pytest.mark.parametrize(
    ("gpus", "devices"), [(0, 1), (0.25, 1), (0.5, 1), (1, 1), (2, 2), (4.0, 4)]
)
def test_gpus_per_worker_sets_the_devices_a_worker_spans(gpus, devices):
    from evoray.config.run_config import ExecutionSpec

    assert ExecutionSpec(gpus_per_worker=gpus).devices_per_worker == devices


@pytest.mark.parametrize("gpus", [1.5, 2.5])
def test_gpus_per_worker_above_one_must_be_whole(gpus):
    from evoray.config.run_config import ExecutionSpec

    with pytest.raises(ValueError, match=r"execution\.gpus_per_worker: .*whole number"):
        ExecutionSpec(gpus_per_worker=gpus)
