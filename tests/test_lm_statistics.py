"""Fisher and RegMean statistics of causal LMs equal a plain per-example reference.

The data is an ``EncodedSplit`` with 2-D labels (-100 = no loss), padded left or right, with
prompt tokens masked out of the loss; the reference runs each text alone, unpadded.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from torch import nn

from evoray.errors import ConfigError
from evoray.models.pool import load_model
from evoray.population.statistics import fisher_diagonal, regmean_grams
from evoray.tasks.evaluation import EncodedSplit
from tests.lm_fixtures import make_model

ROWS = [[2, 10, 11, 12, 13, 14, 3], [2, 20, 21, 3], [2, 30, 31, 32, 33, 3], [2, 40, 3], [2, 50, 51]]
PROMPT = 2  # the first tokens of every row are a prompt: no loss on them


def _split(side: str) -> EncodedSplit:
    width = max(map(len, ROWS))
    ids = torch.zeros(len(ROWS), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, row in enumerate(ROWS):
        sl = slice(width - len(row), width) if side == "left" else slice(0, len(row))
        ids[i, sl] = torch.tensor(row)
        mask[i, sl] = 1
        lab = torch.tensor(row)
        lab[:PROMPT] = -100
        labels[i, sl] = lab
    return EncodedSplit(ids, mask, labels)


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> nn.Module:
    path = make_model(tmp_path_factory.mktemp("lm") / "llama", "llama", seed=0)
    model, _ = load_model(str(path))
    return model.eval()


def _reference_fisher(model: nn.Module) -> dict[str, torch.Tensor]:
    acc = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    for row in ROWS:
        ids = torch.tensor([row])
        logp = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        ll = sum(logp[t - 1, row[t]] for t in range(PROMPT, len(row)))
        model.zero_grad()
        ll.backward()
        for n, p in model.named_parameters():
            acc[n] += p.grad.square()
    model.zero_grad()
    return {n: a / len(ROWS) for n, a in acc.items()}


@pytest.mark.parametrize("side", ["right", "left"])
def test_causal_lm_fisher_matches_per_example_reference(llama, side: str) -> None:
    want = _reference_fisher(llama)
    t0 = time.perf_counter()
    got = fisher_diagonal(llama, _split(side), batch_size=2)
    print(f"Fisher ({side} padding, 5 texts): {time.perf_counter() - t0:.3f}s")
    assert set(want) <= set(got)
    assert "lm_head.weight" in got
    for name, w in want.items():
        torch.testing.assert_close(got[name], w, rtol=1e-4, atol=1e-9, msg=name)
    assert float(got["lm_head.weight"].sum()) > 0
    # Batch size does not change the result.
    again = fisher_diagonal(llama, _split(side), batch_size=5)
    for name in want:
        torch.testing.assert_close(again[name], got[name], rtol=1e-4, atol=1e-10)


def test_causal_lm_fisher_per_row_fallback_is_the_same(llama, monkeypatch) -> None:
    """Ops without a vmap rule fall back to one backward per row: same numbers."""
    want = fisher_diagonal(llama, _split("right"), batch_size=3)
    real = torch.autograd.grad

    def no_batched(*args, **kwargs):
        if kwargs.get("is_grads_batched"):
            raise RuntimeError("no batching rule")
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", no_batched)
    got = fisher_diagonal(llama, _split("right"), batch_size=3)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-10)


def test_causal_lm_fisher_refuses_expected_mode(llama) -> None:
    with pytest.raises(ConfigError, match="'expected' is not available for causal LMs"):
        fisher_diagonal(llama, _split("right"), mode="expected")


def test_causal_lm_regmean_matches_per_example_reference(llama) -> None:
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in llama.named_modules():
        if isinstance(mod, nn.Linear):

            def hook(_m, args, key=f"{name}.weight"):
                inputs.setdefault(key, []).append(args[0].detach().reshape(-1, args[0].shape[-1]))

            hooks.append(mod.register_forward_pre_hook(hook))
    with torch.no_grad():
        for row in ROWS:
            llama(input_ids=torch.tensor([row]))
    for h in hooks:
        h.remove()
    want = {k: sum(x.T @ x for x in xs) / len(ROWS) for k, xs in inputs.items()}
    assert "lm_head.weight" in want and "model.layers.0.self_attn.q_proj.weight" in want
    for side in ("right", "left"):
        t0 = time.perf_counter()
        got = regmean_grams(llama, _split(side), batch_size=2)
        print(f"RegMean ({side} padding, 5 texts): {time.perf_counter() - t0:.3f}s")
        assert set(got) == set(want)
        for k, w in want.items():
            torch.testing.assert_close(got[k], w, rtol=1e-4, atol=1e-5, msg=k)


def test_tied_lm_fisher_names_both(tmp_path: Path) -> None:
    path = make_model(tmp_path / "gpt2", "gpt2", seed=0)
    model, _ = load_model(str(path))
    got = fisher_diagonal(model, _split("right"), batch_size=4)
    torch.testing.assert_close(got["lm_head.weight"], got["transformer.wte.weight"])
    assert float(got["transformer.wpe.weight"].sum()) > 0


@pytest.mark.parametrize("rows_at_once", [1, 2])
def test_causal_lm_fisher_gradient_budget(llama, monkeypatch, rows_at_once: int) -> None:
    """Large models hold fewer per-example gradients at once (down to one row): same numbers."""
    import evoray.population.statistics as stats

    want = fisher_diagonal(llama, _split("left"), batch_size=5)
    numel = sum(p.numel() for p in llama.parameters())
    monkeypatch.setattr(stats, "GRAD_BUDGET_BYTES", 4 * numel * rows_at_once)
    calls = []
    real = torch.autograd.grad

    def counting(*args, **kwargs):
        calls.append(kwargs.get("is_grads_batched", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    got = fisher_diagonal(llama, _split("left"), batch_size=5)
    assert len(calls) == (5 if rows_at_once == 1 else 3)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-10)


def test_gpt2_conv1d_grams_and_regmean_merge(tmp_path: Path) -> None:
    """GPT-2's Conv1D layers (weight stored (in, out)) get Grams too, and RegMean solves
    ``W = (sum G_i)^-1 sum G_i W_i`` for them (from the left), not an average."""
    from evoray.population.mergers import TRANSPOSED_GRAM, make_merger
    from evoray.weights.checkpoint import open_checkpoint
    from evoray.weights.flat import flatten
    from evoray.weights.layout import Layout

    paths = [make_model(tmp_path / f"g{i}", "gpt2", seed=0, noise=0.05 * i) for i in (1, 2)]
    grams, flats = [], []
    for p in paths:
        model, _ = load_model(str(p))
        grams.append(regmean_grams(model, _split("left"), batch_size=2))
        with open_checkpoint(p) as c:
            layout = Layout.for_model(c)
            flats.append(flatten(c, layout))
    key = "transformer.h.0.attn.c_attn.weight"
    assert grams[0][key + TRANSPOSED_GRAM].shape == (32, 32)
    # The Gram is of the module's inputs over non-padding tokens (reference: rows alone).
    model, _ = load_model(str(paths[0]))
    xs = []
    h = model.transformer.h[0].attn.c_attn.register_forward_pre_hook(
        lambda _m, a: xs.append(a[0].detach().reshape(-1, 32))
    )
    with torch.no_grad():
        for row in ROWS:
            model(input_ids=torch.tensor([row]))
    h.remove()
    want = sum(x.T @ x for x in xs) / len(ROWS)
    torch.testing.assert_close(grams[0][key + TRANSPOSED_GRAM], want, rtol=1e-4, atol=1e-5)

    merger = make_merger("regmean", layout, 2, grams=grams, alpha=1.0, ridge=1e-3)
    assert any(s.name == key for s, _ in merger.transposed)
    merged = merger.merge([f.as_tensor() for f in flats])
    g = [gr[key + TRANSPOSED_GRAM].double() for gr in grams]
    scale = float(sum(torch.diagonal(x).sum() for x in g) / 32)
    g = [x + torch.eye(32, dtype=x.dtype) * 1e-3 * scale / 2 for x in g]
    w = [f.tensor(key).double() for f in flats]
    closed = torch.linalg.solve(g[0] + g[1], g[0] @ w[0] + g[1] @ w[1])
    slot = layout.slot(key)
    got = merged[slot.offset : slot.offset + slot.numel].view(slot.shape)
    torch.testing.assert_close(got.double(), closed, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(got, (flats[0].tensor(key) + flats[1].tensor(key)) / 2, atol=1e-4)
    # The incremental update agrees with the full merge.
    inc = merged.clone()
    diff = flats[1].as_tensor() - flats[0].as_tensor()
    merger.apply_delta(inc, 0, diff)
    torch.testing.assert_close(inc, merger.merge([flats[1].as_tensor()] * 2), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["fisher", "regmean"])
@pytest.mark.parametrize("arch", ["llama-tied", "gpt2"])
def test_a_worker_computes_a_members_statistics_on_its_own_model(tmp_path: Path, kind, arch):
    """Given the member's vector, the worker writes it into its own model and computes the
    statistics there (no second model on its device): the same as loading the member."""
    from evoray.execution.population import member_statistics
    from evoray.execution.worker import OffspringWorker, WorkerSpec
    from evoray.models.pool import ModelPool
    from tests.lm_fixtures import TextLogLik

    a = str(make_model(tmp_path / "a", arch, seed=0))
    b = str(make_model(tmp_path / "b", arch, seed=0, noise=0.05))
    models = ModelPool((a, b))
    tasks = TextLogLik()
    worker = OffspringWorker(WorkerSpec(a, models.layout(), tasks, metric="loglik"))
    own = worker.statistics(kind, models, b, None, 4, None, worker.load(b))
    fresh = member_statistics(kind, models, b, tasks, None, 4, None)
    assert own.keys() == fresh.keys()
    for name in fresh:
        torch.testing.assert_close(own[name], fresh[name], rtol=1e-5, atol=1e-7, msg=name)
