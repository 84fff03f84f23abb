"""The memory model (evoray.execution.memory) against what the code really holds: the object
store's terms byte for byte, a worker's build scratch by its measured peak."""

from __future__ import annotations

import ctypes
import gc
import types

import pytest
import torch

from evoray.execution.memory import AnonPeak, MemoryModel
from evoray.execution.worker import OffspringWorker
from evoray.population.mergers import FisherMerger, RegMeanMerger
from evoray.strategies.de import Recipe, build_offspring
from evoray.weights.flat import to_numpy
from evoray.weights.layout import Layout
from evoray.weights.placement import single_segment

pytestmark = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc (malloc_trim) and /proc"
)


class _Info:
    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.name, self.shape, self.dtype = name, shape, dtype


def _layout(dtype: torch.dtype, layers: int = 24, d: int = 1024) -> Layout:
    infos = [_Info("norm.weight", (d,), dtype)]
    infos += [_Info(f"l{i}.weight", (d, d), dtype) for i in range(layers)]
    return Layout.from_infos(infos, source="test")


def _merger(kind: str, layout: Layout, n: int):
    lin = [s for s in layout.slots if len(s.shape) == 2]
    if kind == "fisher":
        return FisherMerger(layout, [{s.name: torch.rand(s.shape) for s in layout.slots}] * n)
    return RegMeanMerger(
        layout, [{s.name: torch.eye(s.shape[1]) * (i + 1) for s in lin} for i in range(n)]
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["fisher", "regmean"])
def test_store_terms_are_the_bytes_the_run_puts_in_the_store(dtype, kind):
    layout = _layout(dtype, layers=3, d=64)
    pop = [torch.randn(layout.numel).to(dtype) for _ in range(3)]
    m = _merger(kind, layout, 3)
    model = MemoryModel.for_run(layout, 3, merger=kind, has_base=True)
    assert model.population_bytes == sum(to_numpy(p).nbytes for p in pop)
    stats = m.coef.nbytes if kind == "fisher" else sum(a.nbytes for _, a in m.linear)
    assert model.statistics_bytes == stats
    assert model.merged_bytes == to_numpy(m.merge(pop)).nbytes
    assert model.store_bytes == model.population_bytes * 4 // 3 + model.merged_bytes + stats


def _trim() -> None:
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)  # free heap back to the OS, so a new peak shows


@pytest.mark.parametrize("kind", ["fisher", "regmean"])
def test_an_offspring_in_the_merge_needs_scratch_not_model_copies(kind):
    """Merger mode writes merged + A_t (u - theta_t) into the worker's model range by range:
    its peak extra memory is the formula's scratch, far below one model (the code before
    built u whole and made three float32 copies: ~7 models of bf16)."""
    layout = _layout(torch.bfloat16, layers=96, d=512)
    pop = [torch.randn(layout.numel).to(torch.bfloat16) for _ in range(4)]
    m = _merger(kind, layout, 4)
    worker = types.SimpleNamespace(
        population=pop,
        merger=m,
        merged=m.merge(pop),
        base=pop[3],
        device=torch.device("cpu"),
        segments=single_segment(layout.numel, torch.bfloat16, "cpu"),
    )
    worker.segments[0].buffer.zero_()
    model = MemoryModel.for_run(layout, 4, merger=kind, has_base=True)
    _trim()
    with AnonPeak() as peak:
        kin = OffspringWorker._build_in_merge(worker, Recipe(0, (2,), 0.5, 0.5, 3))
    assert kin is not None and -1 <= kin <= 1
    assert peak.increase() <= model.scratch_bytes, (peak.increase(), model.scratch_bytes)
    assert model.scratch_bytes < model.model_bytes
    expected = m.merge([build_offspring(Recipe(0, (2,), 0.5, 0.5, 3), pop), *pop[1:]])
    torch.testing.assert_close(worker.segments[0].buffer.float(), expected, atol=0.02, rtol=0.01)


def test_an_offspring_built_into_the_model_needs_only_scratch():
    layout = _layout(torch.bfloat16)
    pop = [torch.randn(layout.numel).to(torch.bfloat16) for _ in range(2)]
    out = torch.zeros(layout.numel, dtype=torch.bfloat16)
    model = MemoryModel.for_run(layout, 2)
    _trim()
    with AnonPeak() as peak:
        build_offspring(Recipe(0, (1,), 0.5, 0.5, 3), pop, out)
    assert peak.increase() <= model.scratch_bytes, (peak.increase(), model.scratch_bytes)


@pytest.mark.parametrize(
    "method, models, per_model, has_base",
    [
        ("linear", 4, {"weight": 1.0}, False),
        ("dare_ties", 4, {"weight": 1.0, "density": 0.5}, True),
        ("slerp", 1, {}, True),
    ],
)
def test_a_method_merge_goes_into_the_model_tensor_by_tensor(method, models, per_model, has_base):
    """Greedy / recipe-search merges write each merged tensor into the worker's model: the
    peak is the formula's merge scratch (inputs x largest tensor), not a second model (the
    code before built the whole merge as a host vector first: measured ~1.0-1.1 models),
    and the model equals ``merge_flat``'s vector bit for bit."""
    from evoray.merge.walker import merge_flat
    from evoray.weights.flat import from_numpy

    layout = _layout(torch.bfloat16, layers=96, d=512)
    flats = [to_numpy(torch.randn(layout.numel).to(torch.bfloat16)) for _ in range(models + 1)]
    members, base = flats[:models], flats[models] if has_base else None
    settings = {"t": 0.3} if method == "slerp" else {}
    worker = types.SimpleNamespace(
        spec=types.SimpleNamespace(layout=layout),
        model=types.SimpleNamespace(config=types.SimpleNamespace(to_dict=dict)),
        device=torch.device("cpu"),
        segments=single_segment(layout.numel, torch.bfloat16, "cpu"),
    )
    worker.segments[0].buffer.zero_()  # its pages resident, as a loaded model's are
    inputs = models + has_base
    model = MemoryModel.for_run(layout, models, has_base=has_base, merge_inputs=inputs)
    _trim()
    with AnonPeak() as peak:
        OffspringWorker._merge_into_buffer(
            worker, method, [per_model] * models, settings, base, members
        )
    merge_scratch = 16 * inputs * max(s.numel for s in layout.slots)
    assert peak.increase() <= min(merge_scratch, model.scratch_bytes), peak.increase()
    assert merge_scratch < model.model_bytes / 2  # so the old path could not pass
    expected = merge_flat(
        method,
        layout,
        [from_numpy(m) for m in members],
        None if base is None else from_numpy(base),
        [per_model] * models,
        settings,
        n_layers=96,
    )
    assert torch.equal(worker.segments[0].buffer, expected)


def test_the_run_start_line_reads_in_sensible_units():
    from evoray.execution.memory import human_bytes

    assert human_bytes(0) == "0 B" and human_bytes(1536) == "1.5 KiB"
    assert human_bytes(3 * 1024**3) == "3 GiB"
    layout = _layout(torch.bfloat16, layers=2, d=64)
    line = MemoryModel.for_run(layout, 4, merger="fisher").summary(2, 1)
    assert (
        "object store 161 KiB per node (+64.5 KiB while" in line and "1 worker(s) per node" in line
    )
