"""Population mergers: closed forms on hand-sized examples, the incremental update Evolver relies
on, input validation, and Fisher/RegMean merges of the zoo's experts end to end."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from evoray.errors import ConfigError
from evoray.population.mergers import (
    AverageMerger,
    FisherMerger,
    Merger,
    RegMeanMerger,
    make_merger,
)
from evoray.weights.layout import Layout


@dataclass
class _Info:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype = torch.float32


def _layout(*specs: tuple[str, tuple[int, ...]]) -> Layout:
    return Layout.from_infos([_Info(n, s) for n, s in specs], source="test")


# Linear weights between other tensors, so averaged runs and matmul slots interleave.
LAYOUT = _layout(
    ("emb.weight", (5, 4)),
    ("lin1.weight", (3, 4)),
    ("lin1.bias", (3,)),
    ("norm.weight", (3,)),
    ("lin2.weight", (2, 3)),
    ("head.weight", (2, 2)),  # a 2-D tensor without a Gram: averaged by RegMean
)
N = 4


def _psd(d: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(7, d, generator=gen)
    return x.T @ x


def _fishers(layout: Layout, n: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [{s.name: torch.rand(s.shape, generator=gen) for s in layout.slots} for _ in range(n)]


def _grams(n: int, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    return [{"lin1.weight": _psd(4, gen), "lin2.weight": _psd(3, gen)} for _ in range(n)]


def _mergers(gen: torch.Generator) -> list[Merger]:
    return [
        AverageMerger(LAYOUT, N),
        FisherMerger(LAYOUT, _fishers(LAYOUT, N, gen)),
        RegMeanMerger(LAYOUT, _grams(N, gen)),
        RegMeanMerger(LAYOUT, _grams(N, gen), alpha=1.0),
    ]


# -- closed forms -----------------------------------------------------------------------------


def test_fisher_merge_of_two_vectors_by_hand() -> None:
    layout = _layout(("w", (3,)))
    a, b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3.0, 6.0, -1.0])
    fa, fb = torch.tensor([1.0, 0.0, 3.0]), torch.tensor([1.0, 2.0, 1.0])
    merged = FisherMerger(layout, [{"w": fa}, {"w": fb}], smoothing=0.0).merge([a, b])
    assert torch.allclose(merged, torch.tensor([2.0, 6.0, 2.0]))
    # Where no model has Fisher mass, smoothing falls back to the plain average.
    zero = {"w": torch.zeros(3)}
    merged = FisherMerger(layout, [zero, zero]).merge([a, b])
    assert torch.allclose(merged, (a + b) / 2)


def _regmean_layout() -> Layout:
    return _layout(("lin.weight", (2, 2)), ("lin.bias", (2,)))


def test_regmean_single_linear_matches_numpy_solve() -> None:
    layout = _regmean_layout()
    w1, w2 = np.array([[1.0, 2.0], [3.0, 4.0]]), np.array([[0.0, -1.0], [2.0, 5.0]])
    g1, g2 = np.array([[2.0, 1.0], [1.0, 3.0]]), np.array([[4.0, -1.0], [-1.0, 1.0]])
    pop = [
        torch.tensor(np.concatenate([w1.ravel(), [1.0, 1.0]]), dtype=torch.float32),
        torch.tensor(np.concatenate([w2.ravel(), [3.0, -1.0]]), dtype=torch.float32),
    ]
    grams = [{"lin.weight": torch.tensor(g)} for g in (g1, g2)]
    for alpha in (1.0, 0.1):
        gt1, gt2 = (alpha * g + (1 - alpha) * np.diag(np.diag(g)) for g in (g1, g2))
        # W* = (W1 G1 + W2 G2) S^-1  <=>  S W*^T = (W1 G1 + W2 G2)^T  (S symmetric)
        expected = np.linalg.solve(gt1 + gt2, (w1 @ gt1 + w2 @ gt2).T).T
        merged = RegMeanMerger(layout, grams, alpha=alpha, ridge=0.0).merge(pop)
        np.testing.assert_allclose(merged[:4].numpy().reshape(2, 2), expected, rtol=1e-5)
        np.testing.assert_allclose(merged[4:].numpy(), [2.0, 0.0])  # the bias is averaged


def test_regmean_alpha_zero_weights_columns_by_input_norm() -> None:
    layout = _regmean_layout()
    gen = torch.Generator().manual_seed(1)
    pop = [torch.randn(6, generator=gen) for _ in range(3)]
    grams = [{"lin.weight": _psd(2, gen)} for _ in range(3)]
    merged = RegMeanMerger(layout, grams, alpha=0.0, ridge=0.0).merge(pop)
    norms = torch.stack([g["lin.weight"].diagonal() for g in grams])  # (N, in)
    weights = torch.stack([p[:4].view(2, 2) for p in pop])  # (N, out, in)
    expected = (weights * norms[:, None, :]).sum(0) / norms.sum(0)
    assert torch.allclose(merged[:4].view(2, 2), expected, atol=1e-6)


def test_regmean_with_identical_grams_is_the_average() -> None:
    gen = torch.Generator().manual_seed(2)
    g = _grams(1, gen)[0]
    pop = [torch.randn(LAYOUT.numel, generator=gen) for _ in range(N)]
    merged = RegMeanMerger(LAYOUT, [g] * N).merge(pop)
    assert torch.allclose(merged, torch.stack(pop).mean(0), atol=1e-5)


def test_regmean_dead_input_dimension_is_averaged_not_nan(caplog) -> None:
    layout = _regmean_layout()
    gen = torch.Generator().manual_seed(3)
    pop = [torch.randn(6, generator=gen) for _ in range(2)]
    dead = [{"lin.weight": torch.tensor([[2.0, 0.0], [0.0, 0.0]])}, {"lin.weight": torch.eye(2)}]
    dead[1]["lin.weight"][1, 1] = 0.0
    merged = RegMeanMerger(layout, dead, alpha=1.0).merge(pop)
    assert torch.isfinite(merged).all()
    # column 1 saw no input in any model: ridge makes it the plain average
    avg = (pop[0][:4] + pop[1][:4]).view(2, 2) / 2
    assert torch.allclose(merged[:4].view(2, 2)[:, 1], avg[:, 1], atol=1e-5)
    zero = [{"lin.weight": torch.zeros(2, 2)}] * 2
    with caplog.at_level(logging.WARNING, logger="evoray.population.mergers"):
        merged = RegMeanMerger(layout, zero).merge(pop)
    assert torch.allclose(merged, (pop[0] + pop[1]) / 2)
    assert "averaging" in caplog.text


def test_merge_of_one_model_is_that_model() -> None:
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(LAYOUT.numel, generator=gen)
    for m in (
        FisherMerger(LAYOUT, _fishers(LAYOUT, 1, gen)),
        RegMeanMerger(LAYOUT, _grams(1, gen)),
        AverageMerger(LAYOUT, 1),
    ):
        assert torch.allclose(m.merge([theta]), theta, atol=1e-5), m.name


# -- the incremental property -----------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_delta_equals_remerge_with_replacement(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(5)
    for merger in _mergers(gen):
        pop = [torch.randn(LAYOUT.numel, generator=gen).to(dtype) for _ in range(N)]
        merged = merger.merge(pop)
        assert merged.dtype == torch.float32
        for i in range(N):
            u = torch.randn(LAYOUT.numel, generator=gen).to(dtype)
            diff = u.float() - pop[i].float()
            pop[i] = u
            merger.apply_delta(merged, i, diff)  # chained updates stay exact
            expected = merger.merge(pop)
            assert torch.allclose(merged, expected, atol=1e-5), (merger.name, i)


def test_mergers_are_linear_with_coefficients_summing_to_one() -> None:
    gen = torch.Generator().manual_seed(6)
    ones = torch.ones(LAYOUT.numel)
    for merger in _mergers(gen):
        # merging N copies of one vector returns it: sum_i A_i = identity
        theta = torch.randn(LAYOUT.numel, generator=gen)
        assert torch.allclose(merger.merge([theta] * N), theta, atol=1e-5), merger.name
        assert torch.allclose(merger.merge([ones] * N), ones, atol=1e-5), merger.name


# -- validation -------------------------------------------------------------------------------


def test_fisher_missing_or_misshapen_tensor_is_named() -> None:
    gen = torch.Generator().manual_seed(7)
    fishers = _fishers(LAYOUT, 2, gen)
    del fishers[1]["norm.weight"]
    with pytest.raises(ConfigError, match=r"model 1.*'norm.weight'"):
        FisherMerger(LAYOUT, fishers)
    fishers = _fishers(LAYOUT, 2, gen)
    fishers[0]["lin2.weight"] = torch.rand(3, 2)
    with pytest.raises(ConfigError, match=r"'lin2.weight' has shape \[3, 2\]"):
        FisherMerger(LAYOUT, fishers)
    fishers = _fishers(LAYOUT, 2, gen)
    fishers[0]["emb.weight"][0, 0] = float("nan")
    with pytest.raises(ConfigError, match=r"'emb\.weight'"):
        FisherMerger(LAYOUT, fishers)


def test_regmean_bad_grams_are_named() -> None:
    gen = torch.Generator().manual_seed(8)
    grams = _grams(2, gen)
    del grams[1]["lin2.weight"]
    with pytest.raises(ConfigError, match=r"'lin2.weight' is missing for model 1"):
        RegMeanMerger(LAYOUT, grams)
    grams = _grams(2, gen)
    grams[0]["lin1.weight"] = torch.eye(3)
    with pytest.raises(ConfigError, match=r"model 0 for tensor 'lin1.weight'.*\(4, 4\)"):
        RegMeanMerger(LAYOUT, grams)
    with pytest.raises(ConfigError, match=r"'lin1\.bias'.*2-D"):
        RegMeanMerger(LAYOUT, [{"lin1.bias": torch.eye(3)}])
    with pytest.raises(ConfigError, match="no Gram names a tensor"):
        RegMeanMerger(LAYOUT, [{"model.lin1.weight": torch.eye(4)}])
    with pytest.raises(ConfigError, match="alpha"):
        RegMeanMerger(LAYOUT, _grams(1, gen), alpha=1.5)


def test_population_and_delta_are_checked() -> None:
    merger = AverageMerger(LAYOUT, 2)
    good = torch.zeros(LAYOUT.numel)
    with pytest.raises(ConfigError, match="built for 2 models but got a population of 3"):
        merger.merge([good] * 3)
    with pytest.raises(ConfigError, match=f"individual 1 has shape \\[5\\].*{LAYOUT.numel}"):
        merger.merge([good, torch.zeros(5)])
    merged = merger.merge([good, good])
    with pytest.raises(ConfigError, match="out of range"):
        merger.apply_delta(merged, 2, good)
    with pytest.raises(ConfigError, match="float32"):
        merger.apply_delta(merged.double(), 0, good)


def test_make_merger() -> None:
    gen = torch.Generator().manual_seed(9)
    assert isinstance(make_merger("average", LAYOUT, 3), AverageMerger)
    f = make_merger("fisher", LAYOUT, 2, fishers=_fishers(LAYOUT, 2, gen), smoothing=1e-8)
    assert isinstance(f, FisherMerger) and f.smoothing == 1e-8
    r = make_merger("regmean", LAYOUT, 2, grams=_grams(2, gen), alpha=0.5)
    assert isinstance(r, RegMeanMerger) and r.alpha == 0.5
    assert isinstance(r, Merger)
    with pytest.raises(ConfigError, match="unknown; use one of"):
        make_merger("ties", LAYOUT, 2)
    with pytest.raises(ConfigError, match="pass fishers="):
        make_merger("fisher", LAYOUT, 2)
    with pytest.raises(ConfigError, match="for 2 models but n=3"):
        make_merger("regmean", LAYOUT, 3, grams=_grams(2, gen))
    with pytest.raises(ConfigError, match="no parameter 'alpha'"):
        make_merger("fisher", LAYOUT, 2, fishers=_fishers(LAYOUT, 2, gen), alpha=0.1)


# -- end to end on the zoo --------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_zoo(tmp_path_factory: pytest.TempPathFactory):
    from evoray.models.zoo import ZooSpec, build_zoo

    spec = ZooSpec(
        hidden_size=32, pretrain_steps=30, finetune_epochs=2, general_epochs=1, n_domains=2
    )
    return build_zoo(tmp_path_factory.mktemp("zoo"), spec, report=lambda _: None)


def test_zoo_experts_merge_load_and_score(small_zoo, tmp_path: Path) -> None:
    from transformers import AutoTokenizer, BertForSequenceClassification

    from evoray.population.statistics import cached_statistics, fisher_diagonal, regmean_grams
    from evoray.tasks.evaluation import classification_scores, encode
    from evoray.weights.checkpoint import open_checkpoint
    from evoray.weights.flat import flatten

    names = list(small_zoo.experts)
    tokenizer = AutoTokenizer.from_pretrained(small_zoo.tokenizer_path)
    splits = {d: encode(tokenizer, small_zoo.suite.dataset(d)["dev"]) for d in names}
    models = {d: BertForSequenceClassification.from_pretrained(small_zoo.experts[d]) for d in names}
    ckpts = [open_checkpoint(small_zoo.experts[d]) for d in names]
    layout = Layout.from_checkpoint(ckpts[0])
    pop = [flatten(c, layout).as_tensor() for c in ckpts]

    def stats(kind: str, d: str) -> dict[str, torch.Tensor]:
        fn = fisher_diagonal if kind == "fisher" else regmean_grams
        return cached_statistics(
            kind,
            small_zoo.experts[d],
            f"{d}/dev",
            lambda: fn(models[d], splits[d], n_examples=32),
            tmp_path,
            settings={"n_examples": 32},
        )

    fishers = [stats("fisher", d) for d in names]
    grams = [stats("regmean", d) for d in names]
    assert len(list(tmp_path.glob("*.safetensors"))) == 2 * len(names)
    target = BertForSequenceClassification.from_pretrained(small_zoo.base)
    for merger in (
        make_merger("fisher", layout, len(names), fishers=fishers),
        make_merger("regmean", layout, len(names), grams=grams),
    ):
        merged = merger.merge(pop)
        assert torch.isfinite(merged).all()
        views = {s.name: merged[s.offset : s.offset + s.numel].view(s.shape) for s in layout.slots}
        target.load_state_dict(views, strict=False)
        for d in names:
            scores = classification_scores(target, splits[d])
            assert 0.0 <= scores["accuracy"] <= 1.0, (merger.name, d)
    # A data-aware merge of one model is that model.
    for merger in (FisherMerger(layout, fishers[:1]), RegMeanMerger(layout, grams[:1])):
        assert torch.allclose(merger.merge(pop[:1]), pop[0].float(), atol=1e-5, rtol=1e-4)


# -- range by range, compact, shared ---------------------------------------------------------


def test_ranges_cover_whole_tensors_and_range_updates_equal_the_whole() -> None:
    """Workers apply A_i range by range (a few tensors at a time on their device): the sum
    over ranges equals the whole-vector update, and no range cuts a tensor."""
    gen = torch.Generator().manual_seed(11)
    for merger in _mergers(gen):
        t = torch.randn(LAYOUT.numel, generator=gen)
        whole = torch.zeros(LAYOUT.numel)
        merger.apply_delta(whole, 2, t)
        for chunk in (1, 7, 1 << 20):
            ranges = merger.ranges(chunk)
            assert ranges[0][0] == 0 and ranges[-1][1] == LAYOUT.numel
            assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
            if merger.name == "regmean":  # a linear weight (a matmul) is never cut
                for s, _ in merger.linear:
                    assert any(lo <= s.offset and s.offset + s.numel <= hi for lo, hi in ranges)
            else:
                assert max(hi - lo for lo, hi in ranges) <= chunk
            out = torch.zeros(LAYOUT.numel)
            for lo, hi in ranges:
                merger.add_range(out[lo:hi], 2, t[lo:hi], lo, hi)
            assert torch.allclose(out, whole, atol=1e-6), (merger.name, chunk)


def test_fisher_coefficients_are_float16_for_16_bit_models_and_still_sum_to_one() -> None:
    gen = torch.Generator().manual_seed(12)
    bf16 = Layout.from_infos(
        [_Info(s.name, s.shape, torch.bfloat16) for s in LAYOUT.slots], source="bf16"
    )
    assert FisherMerger(LAYOUT, _fishers(LAYOUT, N, gen)).coef.dtype == np.float32
    m = FisherMerger(bf16, _fishers(bf16, N, gen))
    assert m.coef.dtype == np.float16 and m.coef.nbytes == N * bf16.numel * 2
    theta = torch.randn(bf16.numel, generator=gen).to(torch.bfloat16)
    merged = m.merge([theta] * N)  # identical models merge to themselves, to float16 rounding
    assert torch.allclose(merged, theta.float(), rtol=2e-3, atol=1e-6)


def test_merger_coefficients_are_shared_zero_copy_through_the_object_store(ray_local) -> None:
    """The merger goes to the object store once; every worker of a node maps its arrays
    read-only instead of unpickling a private copy (torch tensors would be copied)."""
    import ray

    gen = torch.Generator().manual_seed(13)
    for merger in _mergers(gen)[1:3]:
        got = ray.get(ray.put(merger))
        arrays = [got.coef] if merger.name == "fisher" else [a for _, a in got.linear]
        assert arrays and all(not a.flags.writeable for a in arrays), merger.name


# -- the Fisher build streams: one tensor of every model at a time ------------------------------


def _whole_tensor_fisher_coef(layout: Layout, fishers, smoothing: float = 1e-10) -> np.ndarray:
    """The construction FisherMerger had before it streamed: every model's whole tensor
    stacked in float64, ``sum(0)``, ``where``; kept here as the reference."""
    n = len(fishers)
    half = layout.storage_dtype.itemsize <= 2
    coef = np.empty((n, layout.numel), dtype=np.float16 if half else np.float32)
    for slot in layout.slots:
        w = torch.stack([f[slot.name].reshape(-1).double() for f in fishers]).add_(smoothing)
        total = w.sum(0)
        c = torch.where(total > 0, w / total, torch.full_like(w, 1.0 / n))
        coef[:, slot.offset : slot.offset + slot.numel] = c.numpy()
    return coef


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_streamed_fisher_coefficients_equal_the_whole_tensor_construction(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    from evoray.population import mergers

    monkeypatch.setattr(mergers, "STAT_CHUNK", 7)  # chunks cut tensors, with ragged tails
    shapes = (("a", (1,)), ("b", (30, 7)), ("c", (5,)), ("d", (1, 1)), ("e", (100,)))
    layout = Layout.from_infos([_Info(n, s, dtype) for n, s in shapes], source="test")
    gen = torch.Generator().manual_seed(21)
    for n, smoothing in itertools.product((1, 3, 9), (1e-10, 0.0)):
        # Spread over many orders of magnitude, with exact zeros (0/0 at smoothing 0).
        fishers = [
            {
                s.name: torch.rand(s.shape, generator=gen)
                * torch.exp(10 * torch.randn(s.shape, generator=gen))
                * (torch.rand(s.shape, generator=gen) > 0.3)
                for s in layout.slots
            }
            for _ in range(n)
        ]
        got = FisherMerger(layout, fishers, smoothing=smoothing).coef
        want = _whole_tensor_fisher_coef(layout, fishers, smoothing)
        assert got.dtype == want.dtype
        assert np.array_equal(got.view(np.uint8), want.view(np.uint8)), (n, smoothing)


class _SyntheticFisher(Mapping):
    """A model's Fisher made when read (numpy-backed, so tracemalloc sees it), counting reads."""

    def __init__(self, layout: Layout, i: int) -> None:
        self.shapes = {s.name: s.shape for s in layout.slots}
        self.i = i
        self.reads = 0

    def __getitem__(self, name: str) -> torch.Tensor:
        self.reads += 1
        rng = np.random.default_rng([self.i, list(self.shapes).index(name)])
        return torch.from_numpy(rng.random(self.shapes[name], dtype=np.float32))

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def test_fisher_build_holds_coefficients_plus_one_tensor_of_every_model() -> None:
    """Driver-side peak of building the merger (numpy allocations, traced): coefficients plus
    a few float32 copies of one tensor of every model, where reading every model's statistics
    first (as the driver did, ``ray.get`` of them all) holds ``4 N P`` more."""
    import tracemalloc

    n, tensors, width = 4, 32, 10_000
    layout = Layout.from_infos(
        [_Info(f"t{k}", (width,), torch.bfloat16) for k in range(tensors)], source="bf16"
    )
    coef_bytes = n * layout.numel * 2  # float16 for a 16-bit model
    bound = coef_bytes + 5 * (n * width * 4)

    def peak(build) -> tuple[int, np.ndarray]:
        tracemalloc.start()
        try:
            coef = build().coef
            return tracemalloc.get_traced_memory()[1], coef
        finally:
            tracemalloc.stop()

    lazy = [_SyntheticFisher(layout, i) for i in range(n)]
    FisherMerger(layout, lazy)  # first calls allocate numpy's and torch's caches: not counted
    for f in lazy:
        f.reads = 0
    streamed, coef = peak(lambda: FisherMerger(layout, lazy))
    assert [f.reads for f in lazy] == [tensors] * n  # every tensor read once
    held, coef_held = peak(lambda: FisherMerger(layout, [dict(f) for f in lazy]))
    assert np.array_equal(coef, coef_held)
    print(f"driver build peak: streamed {streamed} B, bound {bound} B, all read first {held} B")
    assert coef_bytes <= streamed <= bound < held, (streamed, bound, held)
    assert held >= coef_bytes + 4 * n * layout.numel


def test_fisher_rejects_negative_entries_naming_model_and_tensor() -> None:
    gen = torch.Generator().manual_seed(8)
    fishers = _fishers(LAYOUT, 3, gen)
    fishers[2]["lin1.bias"][1] = -1e-3
    with pytest.raises(ConfigError, match=r"model 2 for tensor 'lin1\.bias' has negative"):
        FisherMerger(LAYOUT, fishers)
    fishers = _fishers(LAYOUT, 3, gen)
    fishers[1]["head.weight"][0, 1] = float("inf")
    with pytest.raises(ConfigError, match=r"model 1 for tensor 'head\.weight'.*non-finite"):
        FisherMerger(LAYOUT, fishers)


def test_mergers_from_stored_statistics_equal_those_from_tensors(ray_local) -> None:
    """Statistics as a worker returns them (one object ref per tensor) build the same mergers
    as the tensors themselves, read tensor by tensor from the store."""
    from evoray.execution.population import StoredStatistics, store_statistics

    gen = torch.Generator().manual_seed(14)
    fishers, grams = _fishers(LAYOUT, N, gen), _grams(N, gen)
    copies = [dict(f) for f in fishers]
    stored = [StoredStatistics(store_statistics(c)) for c in copies]
    assert all(not c for c in copies)  # the host copies were handed to the store
    assert list(stored[0]) == list(fishers[0]) and len(stored[0]) == len(fishers[0])
    assert "lin1.weight" in stored[0] and "nope" not in stored[0]
    want = FisherMerger(LAYOUT, fishers).coef
    assert np.array_equal(FisherMerger(LAYOUT, stored).coef, want)
    stored_grams = [StoredStatistics(store_statistics(dict(g))) for g in grams]
    for (s, a), (_, b) in zip(
        RegMeanMerger(LAYOUT, stored_grams).linear, RegMeanMerger(LAYOUT, grams).linear, strict=True
    ):
        assert np.array_equal(a, b), s.name
    bf16 = {"w": torch.randn(3, 2, generator=gen).to(torch.bfloat16)}
    back = StoredStatistics(store_statistics(dict(bf16)))["w"]
    assert back.dtype == torch.bfloat16 and torch.equal(back, bf16["w"])
