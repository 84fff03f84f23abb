"""Merge operators: hand-computed examples, properties, and agreement with mergekit's algorithms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from evoray.errors import ConfigError
from evoray.merge import interpolation
from evoray.merge import operators as ops
from evoray.merge import sparsify as sp
from evoray.merge.interpolation import model_stock, slerp
from evoray.merge.operators import (
    breadcrumbs,
    breadcrumbs_ties,
    dare_linear,
    dare_ties,
    generalized_task_arithmetic,
    linear,
    task_arithmetic,
    ties,
)

T = torch.tensor
F32 = torch.float32
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def close(a: torch.Tensor, b, *, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    b = b if isinstance(b, torch.Tensor) else T(b, dtype=F32)
    assert a.dtype == F32
    assert a.shape == b.shape, (a.shape, b.shape)
    torch.testing.assert_close(a, b.to(F32), atol=atol, rtol=rtol)


@pytest.fixture
def small_chunks(monkeypatch):
    """Force several chunks per tensor so the streaming/tie-ordinal code paths are exercised."""
    monkeypatch.setattr(ops, "chunk_elems", lambda device: 7)
    monkeypatch.setattr(sp, "chunk_elems", lambda device: 7)


def rand(*shape: int, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


# =====================================================================================
# Independent re-statement of mergekit's algorithms (arcee-ai/mergekit: sparsify.py,
# merge_methods/generalized_task_arithmetic.py, slerp.py, model_stock.py, linear.py),
# written plainly (full sorts, torch.stack) in float32. Two pinned-down choices, where
# mergekit leaves the result unspecified or uses global state:
#   * sorts are stable (mergekit's argsort is not; matters only for equal magnitudes);
#   * the bernoulli mask is passed in instead of drawn from the global RNG.
# =====================================================================================


def mk_rescaled_masked(tensor, mask, rescale):
    masked = tensor * mask
    if not rescale:
        return masked
    before, after = tensor.abs().sum(), masked.abs().sum()
    if before < 1e-7 or after < 1e-7:
        return masked
    return masked * (before / after)


def mk_magnitude(tensor, density, rescale=False):
    if density >= 1:
        return tensor
    k = int(density * tensor.numel())
    assert k > 0
    mask = torch.zeros_like(tensor)
    w = tensor.abs().view(-1)
    topk = torch.sort(w, descending=True, stable=True).indices[:k]
    mask.view(-1)[topk] = 1
    return mk_rescaled_masked(tensor, mask, rescale)


def mk_magnitude_outliers(tensor, density, gamma=0.01, rescale=False):
    if density >= 1:
        return tensor
    num_elems = tensor.numel()
    target_n = int(density * num_elems)
    n_top = int(gamma * num_elems)
    n_bot = num_elems - target_n - n_top
    if n_bot < 0:
        n_top += n_bot
        n_bot = 0
    w = tensor.abs().view(-1)
    indices = torch.sort(w, descending=False, stable=True).indices
    mask = torch.zeros_like(tensor)
    mask.view(-1)[indices[n_bot:-n_top]] = 1
    return mk_rescaled_masked(tensor, mask, rescale)


def mk_bernoulli(tensor, density, mask, rescale=False):
    if density >= 1:
        return tensor
    return mk_rescaled_masked(tensor, mask, rescale)


def mk_get_mask(delta, method="sum"):
    sign = delta.sign()
    if method == "sum":
        majority_sign = (delta.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    else:
        majority_sign = (sign.sum(dim=0) >= 0).to(delta.dtype) * 2 - 1
    return sign == majority_sign


def mk_gta(base, deltas, weights, consensus, normalize, lambda_=1.0):
    """GTATask.execute after sparsification: ``deltas`` are the sparsified task vectors."""
    deltas = torch.stack(deltas, dim=0)
    weights = T(weights, dtype=deltas.dtype)
    while len(deltas.shape) > len(weights.shape):
        weights.unsqueeze_(-1)
    weighted_deltas = deltas * weights
    if consensus:
        mask = mk_get_mask(weighted_deltas, consensus)
        mixed_delta = (weighted_deltas * mask).sum(dim=0)
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed_delta = weighted_deltas.sum(dim=0)
        divisor = weights.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed_delta /= divisor
    if lambda_ != 1:
        mixed_delta *= lambda_
    return base + mixed_delta


def mk_linear(tensors, weights, normalize=True):
    tensors = torch.stack(tensors, dim=0)
    weights = T(weights, dtype=tensors.dtype)
    while len(weights.shape) < len(tensors.shape):
        weights.unsqueeze_(-1)
    res = (weights * tensors).sum(dim=0)
    if normalize:
        res = res / weights.sum(dim=0)
    return res


def mk_slerp(t, v0, v1, DOT_THRESHOLD=0.9995, eps=1e-8):  # mergekit's parameter name
    v0 = v0.detach().cpu().float().numpy()
    v1 = v1.detach().cpu().float().numpy()
    v0_copy, v1_copy = np.copy(v0), np.copy(v1)

    def normalize(v):
        norm_v = np.linalg.norm(v)
        return v / norm_v if norm_v > eps else v

    v0, v1 = normalize(v0), normalize(v1)
    dot = np.sum(v0 * v1)
    if np.abs(dot) > DOT_THRESHOLD:
        return torch.from_numpy((1 - t) * v0_copy + t * v1_copy)
    theta_0 = np.arccos(dot)
    sin_theta_0 = np.sin(theta_0)
    theta_t = theta_0 * t
    s0 = np.sin(theta_0 - theta_t) / sin_theta_0
    s1 = np.sin(theta_t) / sin_theta_0
    return torch.from_numpy(s0 * v0_copy + s1 * v1_copy)


def mk_model_stock(w_0, ws, filter_wise=False):
    out_shape = w_0.shape
    if filter_wise:
        if w_0.dim() == 1:
            w_0 = w_0.unsqueeze(0)
            ws = [w.unsqueeze(0) for w in ws]
    else:
        w_0 = w_0.view(-1)
        ws = [w.view(-1) for w in ws]
    offsets = [w - w_0 for w in ws]
    cos_thetas = []
    for i, w_0_offset in enumerate(offsets):
        for j in range(i + 1, len(offsets)):
            w_1_offset = offsets[j]
            norm_product = torch.norm(w_0_offset, dim=-1) * torch.norm(w_1_offset, dim=-1)
            cos_theta = (
                (w_0_offset * w_1_offset).sum(dim=-1) / norm_product.clamp(min=1e-6)
            ).clamp(-1, 1)
            cos_thetas.append(cos_theta)
    cos_theta = torch.stack(cos_thetas).mean(dim=0).unsqueeze(-1)
    n = len(ws)
    t = (n * cos_theta) / (1 + (n - 1) * cos_theta)
    w_avg = sum(ws) / len(ws)
    w_h = t * w_avg + (1 - t) * w_0
    return w_h.reshape(out_shape)


def dare_mask(numel: int, density: float, seed: int) -> torch.Tensor:
    """The mask our DARE draws for a CPU tensor: u < density, u ~ torch.rand(seeded)."""
    return (torch.rand(numel, generator=torch.Generator().manual_seed(seed)) < density).float()


# =====================================================================================
# Hand-computed examples
# =====================================================================================


def test_linear_hand():
    # normalize: (1*[1, 2] + 3*[3, 4]) / (1 + 3) = [10, 14] / 4 = [2.5, 3.5]
    close(linear([T([1.0, 2.0]), T([3.0, 4.0])], [1.0, 3.0]), [2.5, 3.5])
    # no normalize: 1*[1, 2] + 3*[3, 4] = [10, 14]
    close(linear([T([1.0, 2.0]), T([3.0, 4.0])], [1.0, 3.0], normalize=False), [10.0, 14.0])


def test_task_arithmetic_hand():
    base = T([1.0, 1.0, 1.0])
    # deltas: [2,0,1]-base = [1,-1,0]; [1,3,1]-base = [0,2,0]
    # 0.5*[1,-1,0] + 1*[0,2,0] = [0.5, 1.5, 0]; lambda 2 -> [1, 3, 0]; + base = [2, 4, 1]
    out = task_arithmetic(base, [T([2.0, 0.0, 1.0]), T([1.0, 3.0, 1.0])], [0.5, 1.0], lambda_=2.0)
    close(out, [2.0, 4.0, 1.0])
    # normalize: [0.5, 1.5, 0] / (0.5 + 1) = [1/3, 1, 0]; + base
    out = task_arithmetic(
        base, [T([2.0, 0.0, 1.0]), T([1.0, 3.0, 1.0])], [0.5, 1.0], normalize=True
    )
    close(out, [1 + 1 / 3, 2.0, 1.0])


TIES_BASE = T([1.0, 1.0, 1.0, 1.0])
TIES_DELTAS = [T([4.0, -1.0, 2.0, -3.0]), T([-2.0, 5.0, -1.0, 1.0]), T([1.0, 2.0, -6.0, 3.0])]


def test_ties_hand():
    # density 0.5 keeps int(0.5 * 4) = 2 largest |delta| per model:
    #   d1 [ 4, -1,  2, -3] -> [4, 0,  0, -3]
    #   d2 [-2,  5, -1,  1] -> [-2, 5, 0,  0]
    #   d3 [ 1,  2, -6,  3] -> [0, 0, -6,  3]
    # weights [1, 0.5, 2] -> weighted: [4, 0, 0, -3], [-1, 2.5, 0, 0], [0, 0, -12, 6]
    # elected sign = sign of the sum [3, 2.5, -12, 3] -> [+, +, -, +]
    # agreeing entries and their weights (divisor):
    #   e0: 4 (w 1)      -> 4 / 1    = 4
    #   e1: 2.5 (w 0.5)  -> 2.5/0.5  = 5
    #   e2: -12 (w 2)    -> -12 / 2  = -6
    #   e3: 6 (w 2); -3 disagrees -> 6 / 2 = 3
    models = [TIES_BASE + d for d in TIES_DELTAS]
    out = ties(TIES_BASE, models, [1.0, 0.5, 2.0], [0.5, 0.5, 0.5])
    close(out, TIES_BASE + T([4.0, 5.0, -6.0, 3.0]))
    # normalize=False: the agreeing weighted sums [4, 2.5, -12, 6]; lambda 0.5 halves them
    out = ties(TIES_BASE, models, [1.0, 0.5, 2.0], [0.5] * 3, normalize=False, lambda_=0.5)
    close(out, TIES_BASE + T([2.0, 1.25, -6.0, 3.0]))


def test_ties_count_consensus_hand():
    # count: majority of signs of the weighted trimmed deltas (0 counts as nothing)
    #   e0: +, -, 0 -> sum 0 -> +   e1: 0, +, 0 -> +   e2: 0, 0, - -> -   e3: -, 0, + -> 0 -> +
    # same as 'sum' here except nothing changes -> [4, 5, -6, 3]
    models = [TIES_BASE + d for d in TIES_DELTAS]
    out = ties(TIES_BASE, models, [1.0, 0.5, 2.0], [0.5] * 3, consensus="count")
    close(out, TIES_BASE + T([4.0, 5.0, -6.0, 3.0]))
    # weights [1, 3, 1]: weighted d2 = [-6, 15, 0, 0]; sum-consensus e0: 4-6 = -2 -> '-'
    # -> e0 = -6*... /3 = -2, while count-consensus e0: (+1) + (-1) = 0 -> '+' -> 4/1 = 4
    out_sum = ties(TIES_BASE, models, [1.0, 3.0, 1.0], [0.5] * 3)
    out_cnt = ties(TIES_BASE, models, [1.0, 3.0, 1.0], [0.5] * 3, consensus="count")
    assert float(out_sum[0] - 1) == pytest.approx(-2.0)
    assert float(out_cnt[0] - 1) == pytest.approx(4.0)


def test_breadcrumbs_hand():
    # delta magnitudes 1..10 (shuffled, mixed signs); density 0.5, gamma 0.1:
    #   target = int(0.5*10) = 5, n_top = int(0.1*10) = 1, n_bot = 10 - 5 - 1 = 4
    #   ascending |d|: drop the 4 smallest (1..4) and the largest (10): keep 5, 6, 7, 8, 9
    delta = T([3.0, -10.0, 5.0, -1.0, 9.0, -6.0, 2.0, 8.0, -4.0, 7.0])
    kept = T([0.0, 0.0, 5.0, 0.0, 9.0, -6.0, 0.0, 8.0, 0.0, 7.0])
    base = torch.zeros(10)
    close(breadcrumbs(base, [delta], [2.0], [0.5], [0.1]), 2.0 * kept)
    # rescale: L1 before 55, after 35 -> factor 55/35
    out = breadcrumbs(base, [delta], [1.0], [0.5], [0.1], rescale=True)
    close(out, kept * (55.0 / 35.0))


def test_dare_hand():
    base = T([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    delta = T([0.5, -1.0, 2.0, -0.25, 1.0, 3.0])
    seed = 1234
    keep = dare_mask(6, 0.5, seed)
    assert 0 < keep.sum() < 6, "pick a seed that drops some and keeps some"
    # rescale: kept * L1(delta) / L1(kept);  weight 2
    l1, l1_kept = delta.abs().sum(), (delta * keep).abs().sum()
    expected = base + 2.0 * delta * keep * (l1 / l1_kept)
    close(dare_linear(base, [base + delta], [2.0], [0.5], [seed]), expected)
    # without rescale: kept entries unchanged
    out = dare_linear(base, [base + delta], [2.0], [0.5], [seed], rescale=False)
    close(out, base + 2.0 * delta * keep)


def test_slerp_hand():
    # orthogonal unit vectors, t=0.5: theta0 = pi/2, s0 = s1 = sin(pi/4)/sin(pi/2) = 0.7071
    r = math.sqrt(0.5)
    close(slerp(0.5, T([1.0, 0.0]), T([0.0, 1.0])), [r, r])
    # norms 2 and 4: the angle uses normalised copies, the result the originals
    close(slerp(0.5, T([2.0, 0.0]), T([0.0, 4.0])), [2 * r, 4 * r])
    # t = 1/3 of the way: s0 = sin(pi/3) = 0.8660, s1 = sin(pi/6) = 0.5
    close(slerp(1 / 3, T([1.0, 0.0]), T([0.0, 1.0])), [math.sqrt(3) / 2, 0.5])


def test_model_stock_hand():
    # base [0, 0], w1 = [1, 0], w2 = [1, 1]: cos = 1 / (1 * sqrt 2) = 0.70711
    # t = 2 cos / (1 + cos) = 0.82843; avg = [1, 0.5]; t * avg + (1 - t) * base
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    out = model_stock(T([0.0, 0.0]), [T([1.0, 0.0]), T([1.0, 1.0])])
    close(out, [t, 0.5 * t])
    # filter_wise: row 0 as above; row 1 offsets [0,1] and [0,-1] are opposite -> cos -1 ...
    # which makes t undefined for N=2, so use row 1 offsets [0, 2] and [0, 1]: cos 1, t 1
    base = torch.zeros(2, 2)
    w1, w2 = T([[1.0, 0.0], [0.0, 2.0]]), T([[1.0, 1.0], [0.0, 1.0]])
    close(model_stock(base, [w1, w2], filter_wise=True), [[t, 0.5 * t], [0.0, 1.5]])


def test_model_stock_opposed_offsets_keep_the_base(caplog):
    # N=2 offsets [1,0] and [-1,0]: cos = -1 = -1/(N-1), t undefined -> the base, with a warning
    base = T([0.5, 0.25])
    out = model_stock(base, [T([1.5, 0.25]), T([-0.5, 0.25])])
    close(out, [0.5, 0.25])
    assert "opposed" in caplog.text
    # four binary-classifier biases, two moving each way: mean cosine exactly -1/3
    b = T([0.0, 0.0])
    ups, downs = [T([1.0, -1.0])] * 2, [T([-1.0, 1.0])] * 2
    close(model_stock(b, ups + downs), [0.0, 0.0])


# =====================================================================================
# Properties
# =====================================================================================

finite = st.floats(-4, 4, allow_nan=False, width=32)
weights_st = st.floats(0.05, 3.0, allow_nan=False)


@st.composite
def tensors_st(draw, n_models: int | None = None, max_numel: int = 40):
    numel = draw(st.integers(1, max_numel))
    k = n_models if n_models is not None else draw(st.integers(1, 4))
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(numel, generator=g)
    models = [base + torch.randn(numel, generator=g) for _ in range(k)]
    return base, models


@SETTINGS
@given(st.integers(1, 50), st.lists(weights_st, min_size=1, max_size=5), st.integers(0, 1000))
def test_linear_identical_models(numel, weights, seed):
    x = rand(numel, seed=seed)
    close(linear([x] * len(weights), weights), x, atol=1e-6, rtol=1e-5)


@SETTINGS
@given(tensors_st(), st.floats(0.1, 10))
def test_linear_scale_invariant_when_normalized(data, scale):
    _, models = data
    w = [float(i + 1) for i in range(len(models))]
    close(linear(models, w), linear(models, [scale * x for x in w]), atol=1e-5, rtol=1e-5)


@SETTINGS
@given(tensors_st(), st.lists(weights_st, min_size=4, max_size=4), st.booleans())
def test_task_arithmetic_zero_deltas_is_base(data, weights, normalize):
    base, models = data
    out = task_arithmetic(
        base, [base.clone() for _ in models], weights[: len(models)], normalize=normalize
    )
    close(out, base, atol=0, rtol=0)


@SETTINGS
@given(
    st.integers(1, 30),
    st.integers(1, 4),
    st.integers(0, 10_000),
    st.lists(weights_st, min_size=4, max_size=4),
)
def test_density_one_without_conflicts_equals_task_arithmetic(numel, k, seed, weights):
    base = rand(numel, seed=seed)
    # all deltas non-negative: no sign conflict, so the sign election keeps every entry
    deltas = [rand(numel, seed=seed + 1 + i).abs() for i in range(k)]
    models = [base + d for d in deltas]
    w = weights[:k]
    ta = task_arithmetic(base, models, w)
    ta_norm = task_arithmetic(base, models, w, normalize=True)
    seeds = list(range(k))
    close(ties(base, models, w, [1.0] * k, normalize=False), ta, atol=1e-5)
    close(dare_ties(base, models, w, [1.0] * k, seeds), ta, atol=1e-5)
    close(dare_linear(base, models, w, [1.0] * k, seeds), ta, atol=1e-5)
    close(breadcrumbs(base, models, w, [1.0] * k, [0.01] * k), ta, atol=1e-5)
    # with normalize, TIES divides by the sum of the (agreeing, here: nonzero) weights
    if all(bool((d != 0).all()) for d in deltas):
        close(ties(base, models, w, [1.0] * k), ta_norm, atol=1e-5)


@SETTINGS
@given(tensors_st(n_models=1), st.floats(0, 1))
def test_slerp_endpoints(data, t):
    base, (other,) = data
    assert torch.equal(slerp(0.0, base, other), base)
    assert torch.equal(slerp(1.0, base, other), other)
    out = slerp(t, base, other)
    assert torch.isfinite(out).all()


@SETTINGS
@given(st.integers(1, 40), st.floats(0.1, 5), st.floats(0, 1), st.integers(0, 1000))
def test_slerp_parallel_vectors_lerp(numel, scale, t, seed):
    v0 = rand(numel, seed=seed)
    v1 = v0 * scale  # parallel: cos = 1 > 0.9995 -> lerp
    close(slerp(t, v0, v1), (1 - t) * v0 + t * v1, atol=1e-5)
    close(slerp(t, v0, -v1), (1 - t) * v0 - t * v1, atol=1e-5)  # anti-parallel: |cos| = 1


@SETTINGS
@given(st.integers(2, 40), st.integers(0, 1000))
def test_slerp_preserves_norm_of_orthogonal_unit_vectors(numel, seed):
    a = rand(numel, seed=seed)
    b = rand(numel, seed=seed + 1)
    b = b - (b @ a) / (a @ a) * a  # Gram-Schmidt
    a, b = a / a.norm(), b / b.norm()
    assert float(slerp(0.5, a, b).norm()) == pytest.approx(1.0, abs=1e-5)


@SETTINGS
@given(tensors_st(n_models=1), st.integers(2, 5), st.booleans())
def test_model_stock_identical_finetunes(data, n, filter_wise):
    base, (ft,) = data
    # identical offsets: cos = 1 -> t = N / (1 + N - 1) = 1 -> the fine-tune itself; offsets
    # whose norm product is under the 1e-6 clamp (as in mergekit) have cos < 1 by design
    assume(float((ft - base).float().norm()) ** 2 >= 1e-5)
    close(model_stock(base, [ft.clone() for _ in range(n)], filter_wise=filter_wise), ft, atol=1e-5)


@SETTINGS
@given(tensors_st(max_numel=60), st.floats(0.2, 0.9), st.integers(0, 2**40))
def test_dare_seeded(data, density, seed):
    base, models = data
    k = len(models)
    args = (base, models, [1.0] * k, [density] * k)
    seeds = [seed + i for i in range(k)]
    a = dare_ties(*args, seeds)
    assert torch.equal(a, dare_ties(*args, seeds))
    assert torch.equal(dare_linear(*args, seeds), dare_linear(*args, seeds))


def test_dare_different_seed_differs():
    base = torch.zeros(1000)
    models = [rand(1000, seed=1)]
    a = dare_linear(base, models, [1.0], [0.5], [1])
    b = dare_linear(base, models, [1.0], [0.5], [2])
    assert not torch.equal(a, b)


def test_dare_rescale_preserves_expectation():
    n, density = 1 << 20, 0.3
    delta = rand(n, seed=3).abs() + 0.5  # positive: the mean is the L1 norm / n
    out = dare_linear(torch.zeros(n), [delta], [1.0], [density], [99])
    kept = float((out != 0).float().mean())
    assert kept == pytest.approx(density, abs=0.005)
    assert float(out.mean()) == pytest.approx(float(delta.mean()), rel=1e-4)
    # per-element expectation: E[out_i] = delta_i, checked on buckets of similar delta
    order = torch.argsort(delta)
    for idx in order.chunk(8):
        assert float(out[idx].mean()) == pytest.approx(float(delta[idx].mean()), rel=0.02)
    # without rescale the mean shrinks by the density
    out = dare_linear(torch.zeros(n), [delta], [1.0], [density], [99], rescale=False)
    assert float(out.mean()) == pytest.approx(density * float(delta.mean()), rel=0.02)


def test_bfloat16_inputs_computed_in_float32():
    base = rand(300, seed=1).bfloat16()
    models = [(rand(300, seed=2 + i) * 0.01 + base.float()).bfloat16() for i in range(3)]
    up_b, up_m = base.float(), [m.float() for m in models]
    w = [0.3, 0.5, 0.7]
    for f in (
        lambda b, ms: linear(ms, w),
        lambda b, ms: task_arithmetic(b, ms, w),
        lambda b, ms: ties(b, ms, w, [0.4] * 3),
        lambda b, ms: dare_ties(b, ms, w, [0.4] * 3, [1, 2, 3]),
        lambda b, ms: breadcrumbs_ties(b, ms, w, [0.4] * 3, [0.05] * 3),
        lambda b, ms: slerp(0.3, b, ms[0]),
        lambda b, ms: model_stock(b, ms),
    ):
        out = f(base, models)
        assert out.dtype == F32
        assert torch.equal(out, f(up_b, up_m))


def test_shapes_preserved_and_scalars():
    base = rand(3, 4, 5, seed=0)
    models = [rand(3, 4, 5, seed=i) for i in (1, 2)]
    assert ties(base, models, [1, 1], [0.5, 0.5]).shape == (3, 4, 5)
    assert model_stock(base, models, filter_wise=True).shape == (3, 4, 5)
    s = T(2.0)
    # 0-d tensor: int(0.5 * 1) = 0 elements kept -> the task vector vanishes (mergekit asserts)
    assert float(ties(s, [T(5.0)], [1.0], [0.5])) == 2.0
    assert float(ties(s, [T(5.0)], [1.0], [1.0])) == 5.0
    assert float(slerp(0.5, s, T(4.0))) == 3.0  # colinear -> lerp


def test_errors():
    x = rand(4)
    with pytest.raises(ConfigError, match=r"linear.*sum to 0"):
        linear([x, x], [1.0, -1.0])
    with pytest.raises(ConfigError, match=r"ties.*'density'.*\(0, 1\]"):
        ties(x, [x], [1.0], [0.0])
    with pytest.raises(ConfigError, match=r"breadcrumbs.*'gamma'"):
        breadcrumbs(x, [x], [1.0], [0.5], [1.5])
    with pytest.raises(ConfigError, match=r"'weight'.*finite"):
        task_arithmetic(x, [x], [float("nan")])
    with pytest.raises(ValueError, match="shape"):
        task_arithmetic(x, [rand(5)], [1.0])
    with pytest.raises(ValueError, match="2 weights for 1 models"):
        task_arithmetic(x, [x], [1.0, 2.0])
    with pytest.raises(ConfigError, match="consensus must be one of sum, count"):
        generalized_task_arithmetic(x, [x], [1.0], consensus="majority")


# =====================================================================================
# Agreement with the mergekit re-statement on random inputs
# =====================================================================================


def _inputs(seed: int, k: int, numel: int, ties_in_magnitude: bool = False):
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(numel, generator=g) * 1024) / 1024  # model - base is exact
    deltas = []
    for _ in range(k):
        d = torch.randn(numel, generator=g)
        if ties_in_magnitude:  # few distinct magnitudes: every threshold falls inside a tie
            d = torch.round(d * 2) / 2
        deltas.append(d)
    models = [base + d for d in deltas]
    if ties_in_magnitude:
        assert all(torch.equal(m - base, d) for m, d in zip(models, deltas, strict=True))
    deltas = [m - base for m in models]
    w = [float(x) for x in torch.rand(k, generator=g) * 2 - 0.4]
    dens = [float(x) for x in torch.rand(k, generator=g) * 0.8 + 0.15]
    return base, models, deltas, w, dens


CASES = [
    (seed, k, numel, tied)
    for seed, (k, numel) in enumerate([(1, 1), (1, 13), (2, 50), (3, 64), (3, 257), (4, 1000)])
    for tied in (False, True)
]


@pytest.mark.parametrize("seed,k,numel,tied", CASES)
@pytest.mark.parametrize("chunked", [False, True])
def test_ties_matches_mergekit(seed, k, numel, tied, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    base, models, deltas, w, dens = _inputs(seed, k, numel, tied)
    if any(int(d * numel) == 0 for d in dens):
        pytest.skip("mergekit asserts on k == 0")
    for normalize, rescale, consensus in [(True, False, "sum"), (False, True, "count")]:
        sparse = [mk_magnitude(d, de, rescale) for d, de in zip(deltas, dens, strict=True)]
        ref = mk_gta(base, sparse, w, consensus, normalize, lambda_=0.7)
        out = ties(
            base,
            models,
            w,
            dens,
            normalize=normalize,
            consensus=consensus,
            lambda_=0.7,
            rescale=rescale,
        )
        close(out, ref, atol=1e-5)


@pytest.mark.parametrize("seed,k,numel,tied", CASES)
@pytest.mark.parametrize("chunked", [False, True])
def test_breadcrumbs_matches_mergekit(seed, k, numel, tied, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    base, models, deltas, w, dens = _inputs(seed, k, numel, tied)
    gammas = [0.05 + 0.1 * i for i in range(k)]
    if any(int(g * numel) == 0 for g in gammas):
        pytest.skip("mergekit's indices[n_bot:-0] keeps nothing; tested separately")
    for consensus, normalize, rescale in [(None, False, False), ("sum", True, True)]:
        sparse = [
            mk_magnitude_outliers(d, de, g, rescale)
            for d, de, g in zip(deltas, dens, gammas, strict=True)
        ]
        ref = mk_gta(base, sparse, w, consensus, normalize)
        f = breadcrumbs_ties if consensus else breadcrumbs
        out = f(base, models, w, dens, gammas, normalize=normalize, rescale=rescale)
        close(out, ref, atol=1e-5)


@pytest.mark.parametrize("seed,k,numel", [(0, 1, 10), (1, 2, 77), (2, 3, 500), (3, 4, 2048)])
@pytest.mark.parametrize("chunked", [False, True])
def test_dare_matches_mergekit(seed, k, numel, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    base, models, deltas, w, dens = _inputs(seed, k, numel)
    seeds = [1000 * seed + i for i in range(k)]
    for rescale in (True, False):
        sparse = [
            mk_bernoulli(d, de, dare_mask(numel, de, s), rescale)
            for d, de, s in zip(deltas, dens, seeds, strict=True)
        ]
        close(
            dare_linear(base, models, w, dens, seeds, rescale=rescale),
            mk_gta(base, sparse, w, None, False),
            atol=1e-5,
        )
        close(
            dare_ties(base, models, w, dens, seeds, rescale=rescale, normalize=True),
            mk_gta(base, sparse, w, "sum", True),
            atol=1e-5,
        )


@pytest.mark.parametrize("seed,k,numel", [(0, 1, 5), (1, 2, 77), (2, 5, 300)])
@pytest.mark.parametrize("chunked", [False, True])
def test_linear_and_task_arithmetic_match_mergekit(seed, k, numel, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    base, models, deltas, w, _ = _inputs(seed, k, numel)
    w = [abs(x) + 0.1 for x in w]
    close(linear(models, w), mk_linear(models, w), atol=1e-5)
    close(linear(models, w, normalize=False), mk_linear(models, w, False), atol=1e-5)
    for normalize in (False, True):
        close(
            task_arithmetic(base, models, w, normalize=normalize, lambda_=1.3),
            mk_gta(base, deltas, w, None, normalize, 1.3),
            atol=1e-5,
        )


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunked", [False, True])
def test_slerp_matches_mergekit(seed, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    g = torch.Generator().manual_seed(seed)
    v0 = torch.randn(5, 9, generator=g)
    v1 = v0 + torch.randn(5, 9, generator=g) * (0.02 if seed % 2 else 1.0)
    for t in (0.0, 0.25, 0.5, 0.9, 1.0):
        close(slerp(t, v0, v1), mk_slerp(t, v0, v1).view(5, 9), atol=1e-5)
    close(slerp(0.3, v0, v0 * 2), mk_slerp(0.3, v0, v0 * 2).view(5, 9))  # lerp branch
    z = torch.zeros(5, 9)  # a zero vector is not normalised (norm <= eps)
    close(slerp(0.3, z, v1), mk_slerp(0.3, z, v1).view(5, 9), atol=1e-6)


@pytest.mark.parametrize("seed,k,shape", [(0, 2, (7,)), (1, 3, (4, 6)), (2, 4, (3, 2, 5))])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("chunked", [False, True])
def test_model_stock_matches_mergekit(seed, k, shape, filter_wise, chunked, request):
    if chunked:
        request.getfixturevalue("small_chunks")
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(*shape, generator=g)
    common = torch.randn(*shape, generator=g)
    ws = [base + common + 0.5 * torch.randn(*shape, generator=g) for _ in range(k)]
    out = model_stock(base, ws, filter_wise=filter_wise)
    close(out, mk_model_stock(base, ws, filter_wise), atol=1e-5)


# =====================================================================================
# Sparsification details
# =====================================================================================


def test_magnitude_ties_broken_by_index(small_chunks):
    # |x| = [1, 2, 2, 2, 2, 3, 2, 1, 2]; keep int(0.5 * 9) = 4: the 3, then the first three 2s
    x = T([1.0, -2.0, 2.0, 2.0, -2.0, 3.0, 2.0, 1.0, 2.0])
    close(sp.magnitude(x, 0.5), [0.0, -2.0, 2.0, 2.0, 0.0, 3.0, 0.0, 0.0, 0.0])
    # outliers, density 0.5 gamma 0.15: target 4, n_top 1, n_bot 4: ascending stable order
    # 1(i0) 1(i7) 2(i1) 2(i2) | 2(i3) 2(i4) 2(i6) 2(i8) | 3 -> keep i3, i4, i6, i8
    close(sp.magnitude_outliers(x, 0.5, gamma=0.15), [0.0, 0.0, 0.0, 2.0, -2.0, 0.0, 2.0, 0.0, 2.0])


def test_magnitude_outliers_small_gamma_keeps_top():
    # int(0.01 * 10) = 0 large values to remove: we keep the top (mergekit's slice keeps nothing)
    x = T([float(i) for i in range(1, 11)])
    close(sp.magnitude_outliers(x, 0.5, gamma=0.01), [0.0] * 5 + [6.0, 7.0, 8.0, 9.0, 10.0])


def test_density_one_returns_input():
    x = rand(50, seed=4)
    for f in (
        lambda: sp.magnitude(x, 1.0, rescale=True),
        lambda: sp.bernoulli(x, 1.0, seed=3, rescale=True),
        lambda: sp.magnitude_outliers(x, 1.0, gamma=0.3, rescale=True),
        lambda: sp.sparsify(x, 1.0, "magnitude"),
    ):
        assert torch.equal(f(), x)


def test_bernoulli_mask_independent_of_chunking(monkeypatch):
    x = rand(1000, seed=5)
    whole = sp.bernoulli(x, 0.4, seed=17, rescale=True)
    monkeypatch.setattr(sp, "chunk_elems", lambda device: 33)
    assert torch.equal(sp.bernoulli(x, 0.4, seed=17, rescale=True), whole)


@pytest.mark.parametrize("kind", ["normal", "tied", "constant", "skewed"])
def test_kth_smallest_sampled_path(kind):
    n = (1 << 20) + 12345
    g = torch.Generator().manual_seed(0)
    if kind == "normal":
        a = torch.randn(n, generator=g).abs()
    elif kind == "tied":
        a = torch.randint(0, 5, (n,), generator=g).float()
    elif kind == "constant":
        a = torch.ones(n)
    else:
        a = torch.randn(n, generator=g).exp() ** 4
    for k in (1, 7, n // 3, n // 2, n - 100, n):
        assert sp.kth_smallest_abs(a, k) == float(torch.kthvalue(a, k).values)


def test_out_buffer_reused():
    base = rand(4, 6, seed=0)
    models = [rand(4, 6, seed=i) for i in (1, 2)]
    w = [0.4, 0.6]
    calls = [
        lambda **kw: linear(models, w, **kw),
        lambda **kw: task_arithmetic(base, models, w, **kw),
        lambda **kw: ties(base, models, w, [0.5, 0.5], **kw),
        lambda **kw: dare_ties(base, models, w, [0.5, 0.5], [1, 2], **kw),
        lambda **kw: breadcrumbs(base, models, w, [0.5, 0.5], [0.1, 0.1], **kw),
        lambda **kw: slerp(0.3, base, models[0], **kw),
        lambda **kw: model_stock(base, models, filter_wise=True, **kw),
        lambda **kw: interpolation.lerp(0.3, base, models[0], **kw),
    ]
    buf = torch.full((24,), float("nan"))
    for f in calls:
        res = f(out=buf)
        assert res.data_ptr() == buf.data_ptr() and res.shape == (4, 6)
        assert torch.equal(res, f())
    with pytest.raises(ValueError, match="float32"):
        linear(models, w, out=torch.empty(24, dtype=torch.float64))
    with pytest.raises(ValueError, match="24 elements"):
        linear(models, w, out=torch.empty(25))
    with pytest.raises(ValueError, match="share memory"):
        task_arithmetic(base, models, w, out=base.view(-1))


@pytest.mark.parametrize("seed", [0, 1])
def test_large_tied_tensor_matches_mergekit(seed):
    """Sampled selection + default chunking + tie cuts inside chunks, on quantised deltas
    (as bf16 checkpoints give): many magnitudes equal the thresholds."""
    n, k = 300_001, 2
    g = torch.Generator().manual_seed(seed)
    base = torch.round(torch.randn(n, generator=g) * 256) / 256
    deltas = [torch.round(torch.randn(n, generator=g) * 8) / 64 for _ in range(k)]
    models = [base + d for d in deltas]
    w, dens, gammas = [0.7, 1.3], [0.3, 0.55], [0.02, 0.1]
    ref = mk_gta(
        base, [mk_magnitude(d, de) for d, de in zip(deltas, dens, strict=True)], w, "sum", True
    )
    close(ties(base, models, w, dens), ref, atol=1e-5)
    sparse = [
        mk_magnitude_outliers(d, de, ga, True)
        for d, de, ga in zip(deltas, dens, gammas, strict=True)
    ]
    out = breadcrumbs(base, models, w, dens, gammas, rescale=True)
    close(out, mk_gta(base, sparse, w, None, False), atol=1e-5)


def test_order_stats_falls_back_when_the_sample_misleads():
    n = (1 << 18) + 1000
    a = torch.rand(n, generator=torch.Generator().manual_seed(1))
    # The sample positions order_stats draws (fixed seed): make every sampled value an outlier.
    idx = torch.randint(n, (sp._SAMPLE,), generator=torch.Generator().manual_seed(0))
    a[idx] = 1000.0 + torch.arange(sp._SAMPLE, dtype=torch.float32)
    for k in (1, n // 2, n - 5):
        st = sp.order_stats(sp.DeltaSource(a, None, 4096), [k])[0]
        v = float(torch.kthvalue(a, k).values)
        assert (st.value, st.n_less, st.n_equal) == (v, int((a < v).sum()), int((a == v).sum()))
