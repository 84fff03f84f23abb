"""Fisher and RegMean statistics against naive reference computations, and their disk cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evoray.errors import ConfigError
from evoray.population.statistics import (
    cached_statistics,
    fisher_diagonal,
    model_fingerprint,
    regmean_grams,
    split_fingerprint,
)
from evoray.tasks.evaluation import EncodedSplit

N_LABELS = 3


@pytest.fixture(scope="module")
def model():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=N_LABELS,
        hidden_dropout_prob=0.1,  # must be switched off while computing statistics
        attention_probs_dropout_prob=0.1,
    )
    return BertForSequenceClassification(config)


@pytest.fixture(scope="module")
def split() -> EncodedSplit:
    """Six rows right-padded to length 9; one row has no padding at all."""
    gen = torch.Generator().manual_seed(1)
    lengths = [9, 4, 6, 3, 7, 5]
    ids = torch.randint(1, 30, (len(lengths), 9), generator=gen)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        mask[b, :n] = 1
    ids = ids * mask  # pad id 0
    labels = torch.randint(0, N_LABELS, (len(lengths),), generator=gen)
    return EncodedSplit(ids, mask, labels)


def _naive_fisher(model, split: EncodedSplit, mode: str, n: int) -> dict[str, torch.Tensor]:
    """One padded row at a time, one backward per label; squares of those gradients."""
    model.eval()
    named = dict(model.named_parameters())
    acc = {k: torch.zeros_like(p) for k, p in named.items()}
    for b in range(n):
        logp = (
            model(
                input_ids=split.input_ids[b : b + 1], attention_mask=split.attention_mask[b : b + 1]
            )
            .logits[0]
            .log_softmax(-1)
        )
        for y in range(N_LABELS):
            p = float(logp[y].detach().exp())
            weight = p if mode == "expected" else float(y == split.labels[b])
            grads = torch.autograd.grad(logp[y], list(named.values()), retain_graph=True)
            for k, g in zip(named, grads, strict=True):
                acc[k] += weight * g**2
    return {k: v / n for k, v in acc.items()}


def _assert_close(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(expected)
    for k, e in expected.items():
        assert got[k].shape == e.shape, k
        scale = float(e.abs().max())
        assert float((got[k] - e).abs().max()) <= 1e-4 * scale + 1e-12, k


@pytest.mark.parametrize("mode", ["expected", "empirical"])
def test_fisher_matches_naive_per_example_loop(model, split: EncodedSplit, mode: str) -> None:
    model.train()
    got = fisher_diagonal(model, split, mode=mode)
    assert model.training  # mode restored
    _assert_close(got, _naive_fisher(model, split, mode, len(split)))
    assert all(v.dtype == torch.float32 and v.device.type == "cpu" for v in got.values())
    assert float(got["classifier.weight"].sum()) > 0


def test_fisher_subset_keys_and_frozen_parameters(model, split: EncodedSplit) -> None:
    frozen = model.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    try:
        got = fisher_diagonal(model, split, n_examples=2)
        assert not frozen.requires_grad
    finally:
        frozen.requires_grad_(True)
    _assert_close(got, _naive_fisher(model, split, "expected", 2))
    state = {k for k, v in model.state_dict().items() if v.is_floating_point()}
    assert set(got) == state
    with pytest.raises(ConfigError, match="mode 'gold' is unknown"):
        fisher_diagonal(model, split, mode="gold")


def test_grams_exclude_padding(model, split: EncodedSplit) -> None:
    got = regmean_grams(model, split, batch_size=4)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert set(got) == {f"{n}.weight" for n in linears}
    # Each row alone, cut to its own tokens, has no padding at all; the padded batches must
    # give the same sum (divided by the number of examples).
    total = {k: torch.zeros_like(v) for k, v in got.items()}
    for b in range(len(split)):
        n = int(split.attention_mask[b].sum())
        row = EncodedSplit(
            split.input_ids[b : b + 1, :n], split.attention_mask[b : b + 1, :n], split.labels[b:b]
        )
        for k, g in regmean_grams(model, row).items():
            total[k] += g
    _assert_close(got, {k: v / len(split) for k, v in total.items()})


def test_grams_match_manual_xtx(model, split: EncodedSplit) -> None:
    got = regmean_grams(model, split, n_examples=5)
    model.eval()
    with torch.no_grad():
        ids, mask = split.input_ids[:5], split.attention_mask[:5]
        x = model.bert.embeddings(input_ids=ids)[mask.bool()]  # query's input, real tokens only
        pooled = model.bert(input_ids=ids, attention_mask=mask).pooler_output
    query = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.allclose(got[query], x.T @ x / 5, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got["classifier.weight"], pooled.T @ pooled / 5, rtol=1e-4, atol=1e-5)


# -- cache ------------------------------------------------------------------------------------


def _model_dir(root: Path, value: float = 1.0, size: int = 4) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.full((size,), value)}, root / "model.safetensors")
    (root / "config.json").write_text("{}")
    return root


class _Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, torch.Tensor]:
        self.calls += 1
        a = torch.full((2, 2), float(self.calls))
        return {"a": a, "b": torch.arange(3.0), "tied": a}  # shared memory, as tied weights


def test_cache_reuses_and_keys_on_split_and_settings(tmp_path: Path) -> None:
    model_dir, cache = _model_dir(tmp_path / "m"), tmp_path / "cache"
    compute = _Counter()
    first = cached_statistics("fisher", model_dir, "books/dev", compute, cache)
    again = cached_statistics("fisher", model_dir, "books/dev", compute, cache)
    assert compute.calls == 1
    assert set(again) == {"a", "b", "tied"}
    assert torch.equal(first["a"], again["a"]) and torch.equal(first["b"], again["b"])
    assert torch.equal(again["tied"], again["a"])
    cached_statistics("regmean", model_dir, "books/dev", compute, cache)
    cached_statistics("fisher", model_dir, "movies/dev", compute, cache)
    cached_statistics("fisher", model_dir, "books/dev", compute, cache, settings={"n": 8})
    assert compute.calls == 4
    assert not [p for p in cache.iterdir() if p.suffix == ".tmp"]  # atomic writes leave no temps


def test_cache_invalidated_by_a_changed_model_file(tmp_path: Path) -> None:
    model_dir, cache = _model_dir(tmp_path / "m"), tmp_path / "cache"
    compute = _Counter()
    cached_statistics("fisher", model_dir, "dev", compute, cache)
    _model_dir(model_dir, value=2.0, size=5)  # different weights and size
    assert cached_statistics("fisher", model_dir, "dev", compute, cache)["a"][0, 0] == 2.0
    # Same size rewritten: the mtime tells (pushed forward explicitly, since some filesystems
    # keep whole-second timestamps and this runs within one second).
    before = model_fingerprint(model_dir)
    file = _model_dir(model_dir, value=3.0, size=5) / "model.safetensors"
    st = file.stat()
    os.utime(file, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000_000))
    assert model_fingerprint(model_dir) != before
    cached_statistics("fisher", model_dir, "dev", compute, cache)
    assert compute.calls == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_cache_file_is_recomputed(tmp_path: Path, caplog, damage: str) -> None:
    model_dir, cache = _model_dir(tmp_path / "m"), tmp_path / "cache"
    compute = _Counter()
    cached_statistics("regmean", model_dir, "dev", compute, cache)
    (file,) = cache.glob("*.safetensors")
    data = file.read_bytes()
    file.write_bytes(b"not a safetensors file" if damage == "garbage" else data[: len(data) - 7])
    with caplog.at_level(logging.WARNING, logger="evoray.population.statistics"):
        out = cached_statistics("regmean", model_dir, "dev", compute, cache)
    assert compute.calls == 2 and out["a"][0, 0] == 2.0
    assert "recomputing" in caplog.text
    cached_statistics("regmean", model_dir, "dev", compute, cache)  # rewritten and valid again
    assert compute.calls == 2


def test_cache_errors_and_split_fingerprint(tmp_path: Path, split: EncodedSplit) -> None:
    with pytest.raises(ConfigError, match="kind 'hessian' is unknown"):
        cached_statistics("hessian", tmp_path, "dev", _Counter(), tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        model_fingerprint(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no weight files"):
        model_fingerprint(tmp_path)
    other = EncodedSplit(split.input_ids, split.attention_mask, (split.labels + 1) % N_LABELS)
    assert split_fingerprint(split) == split_fingerprint(split)
    assert split_fingerprint(split) != split_fingerprint(other)
