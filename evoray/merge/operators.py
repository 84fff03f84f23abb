"""Pure tensor merge operators with mergekit's semantics.

No I/O, no Ray, no config parsing: same-shape tensors in (any float dtype, one device), a float32
tensor of that shape out. Parameter names and defaults follow mergekit
(``mergekit/merge_methods/{linear,slerp,model_stock,generalized_task_arithmetic,registry}.py``);
``evoray.merge.registry`` maps config parameters onto these functions.

All task-vector methods share :func:`generalized_task_arithmetic`, as in mergekit's ``GTATask``:
``delta_i = model_i - base``; sparsify each ``delta_i`` (with its own density); weight it;
for the TIES family elect a sign per element (``sum``: sign of the summed weighted deltas, 0
counts as +; ``count``: majority of signs) and keep only agreeing entries, with divisor
``sum_i weight_i * agree_i`` (0 -> 1); otherwise divisor ``sum_i weight_i`` (``|.| < 1e-8`` -> 1);
divide by the divisor if ``normalize``; multiply by ``lambda``; add to the base.

Deliberate differences from mergekit:

* Arithmetic is float32 whatever the input dtype (mergekit computes in the configured ``dtype``,
  often bfloat16); the caller casts the result to the output dtype.
* DARE masks come from ``torch.Generator().manual_seed(seed)`` per model (``seeds``), not the
  global RNG, so a merge is reproducible; see ``evoray.merge.sparsify`` for this and for the tie
  and edge-case rules of the magnitude-based sparsifiers.
* ``linear`` with ``normalize`` and weights summing to 0 raises ``ConfigError`` (mergekit divides
  by zero and writes inf/nan).
* Sums are formed in a different order (the base is folded into the first model's term;
  slerp/model_stock scalars are reduced chunk-wise and combined in Python floats), so results
  agree with mergekit to float32 rounding, not bit for bit. Zero deltas still give the base
  exactly, and slerp's ``t = 0`` / ``t = 1`` give the endpoints exactly.
* Every operator accepts ``out=``: a contiguous float32 buffer of the same numel, not shared
  with an input, that receives the result (returned as a view of the input shape). Reusing one
  avoids a fresh allocation's page faults, a large part of the cost of the elementwise methods.

Performance: every method streams the flattened tensors through cache-sized chunks with in-place
float32 accumulation (no ``torch.stack`` of N full tensors, no float64 tensors). Methods that
need a global statistic (TIES/breadcrumbs thresholds, DARE rescale norms, slerp angle,
model_stock cosine) make one extra streaming pass per model first.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evoray.errors import ConfigError
from evoray.merge.sparsify import (
    DeltaSource,
    Plan,
    SparsificationMethod,
    Sparsifier,
    chunk_elems,
)

__all__ = [
    "DOT_THRESHOLD",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "generalized_task_arithmetic",
    "lerp",
    "linear",
    "model_stock",
    "slerp",
    "task_arithmetic",
    "ties",
]

DOT_THRESHOLD = 0.9995
"""mergekit's slerp colinearity threshold: above it, slerp falls back to lerp."""

CONSENSUS_METHODS = ("sum", "count")

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- validation helpers


def _check_tensors(method: str, tensors: Sequence[Tensor], base: Tensor | None) -> None:
    if len(tensors) == 0:
        raise ValueError(f"{method}: needs at least one tensor to merge")
    ref = base if base is not None else tensors[0]
    for i, t in enumerate(tensors):
        if t.shape != ref.shape:
            raise ValueError(
                f"{method}: tensor #{i} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        if t.device != ref.device:
            raise ValueError(f"{method}: tensor #{i} is on {t.device}, expected {ref.device}")
    for i, t in enumerate([*tensors, *([] if base is None else [base])]):
        if not t.is_floating_point():
            raise ValueError(f"{method}: tensor #{i} has non-float dtype {t.dtype}")


def _check_len(method: str, name: str, values: Sequence, n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{method}: got {len(values)} {name} for {n} models")


def _check_finite(method: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{method}: parameter '{name}' must be a finite number, got {value!r}")


def _check_unit(method: str, name: str, value: float, *, open_low: bool) -> None:
    _check_finite(method, name, value)
    ok = (0 < value <= 1) if open_low else (0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ConfigError(f"{method}: parameter '{name}' must be in {interval}, got {value!r}")


def _output(out: Tensor | None, ref: Tensor, inputs: Sequence[Tensor], method: str) -> Tensor:
    """The flat float32 result buffer: ``out`` when given (a scratch buffer the caller reuses,
    which saves the page faults of a fresh allocation on every call), else a new tensor."""
    n = ref.numel()
    if out is None:
        return torch.empty(n, dtype=torch.float32, device=ref.device)
    if (
        out.dtype != torch.float32
        or out.device != ref.device
        or out.numel() != n
        or not out.is_contiguous()
    ):
        raise ValueError(
            f"{method}: out must be a contiguous float32 tensor of {n} elements on {ref.device}, "
            f"got {out.dtype} {tuple(out.shape)} on {out.device}"
        )
    st = out.untyped_storage()
    o_lo, o_hi = st.data_ptr(), st.data_ptr() + st.nbytes()
    for t in inputs:
        ts = t.untyped_storage()
        if ts.data_ptr() < o_hi and o_lo < ts.data_ptr() + ts.nbytes():
            raise ValueError(f"{method}: out must not share memory with an input")
    return out.view(-1)


def _flat(t: Tensor) -> Tensor:
    return t.reshape(-1)


def _f32_chunk(src: Tensor, buf: Tensor) -> Tensor:
    """``src`` as float32: a view when it already is, else converted into ``buf``."""
    if src.dtype == torch.float32:
        return src
    return buf[: src.numel()].copy_(src)


def _scaled_into(out: Tensor, src: Tensor, alpha: float) -> None:
    """``out = alpha * src`` computed in float32 (``torch.mul(bf16, s, out=f32)`` would round the
    product in bfloat16 first)."""
    if src.dtype == torch.float32:
        torch.mul(src, alpha, out=out)
    else:
        out.copy_(src)
        if alpha != 1.0:
            out.mul_(alpha)


# --------------------------------------------------------------------------------------- linear


def linear(
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    normalize: bool = True,
    out: Tensor | None = None,
) -> Tensor:
    """Weighted sum of the tensors, divided by ``sum(weights)`` if ``normalize`` (mergekit
    ``linear``; ``normalize`` defaults to True there too)."""
    method = "linear"
    _check_tensors(method, tensors, None)
    _check_len(method, "weights", weights, len(tensors))
    for w in weights:
        _check_finite(method, "weight", w)
    ws = [float(w) for w in weights]
    if normalize:
        total = math.fsum(ws)
        if total == 0.0:
            raise ConfigError(
                f"{method}: the weights {ws} sum to 0, so normalize=true would divide by zero; "
                "use weights with a non-zero sum or set normalize: false"
            )
        ws = [w / total for w in ws]
    shape = tensors[0].shape
    flats = [_flat(t) for t in tensors]
    n = flats[0].numel()
    out = _output(out, flats[0], tensors, method)
    chunk = chunk_elems(out.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        acc = out[s:e]
        _scaled_into(acc, flats[0][s:e], ws[0])
        for f, w in zip(flats[1:], ws[1:], strict=True):
            acc.add_(f[s:e], alpha=w)
    return out.view(shape)


# ------------------------------------------------------------------ generalized task arithmetic


def generalized_task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    sparsifiers: Sequence[Sparsifier | None] | None = None,
    *,
    consensus: str | None = None,
    normalize: bool = False,
    lambda_: float = 1.0,
    method: str = "generalized_task_arithmetic",
    out: Tensor | None = None,
) -> Tensor:
    """mergekit's ``GTATask`` for one tensor: sparsify, weight, (sign-elect), normalize, scale.

    ``sparsifiers[i]`` sparsifies model ``i``'s task vector (None: keep it whole); ``consensus``
    is None (plain sum), ``"sum"`` (TIES) or ``"count"``. ``method`` only labels errors.
    """
    _check_tensors(method, tensors, base)
    k = len(tensors)
    _check_len(method, "weights", weights, k)
    if sparsifiers is None:
        sparsifiers = [None] * k
    _check_len(method, "sparsifiers", sparsifiers, k)
    if consensus is not None and consensus not in CONSENSUS_METHODS:
        raise ConfigError(
            f"{method}: consensus must be one of {', '.join(CONSENSUS_METHODS)} or None, "
            f"got {consensus!r}"
        )
    for w in weights:
        _check_finite(method, "weight", w)
    _check_finite(method, "lambda", lambda_)
    ws = [float(w) for w in weights]

    shape = base.shape
    device = base.device
    base_f = _flat(base)
    flats = [_flat(t) for t in tensors]
    n = base_f.numel()
    chunk = chunk_elems(device)
    out = _output(out, base, [base, *tensors], method)
    if n == 0:
        return out.view(shape)

    # Pass 1 (only for sparsifiers that need a global statistic): build the chunk maskers.
    plans = [
        Plan() if sp is None else sp.plan(DeltaSource(f, base_f, chunk))
        for f, sp in zip(flats, sparsifiers, strict=True)
    ]
    coefs = [w * p.factor for w, p in zip(ws, plans, strict=True)]
    for p in plans:
        p.begin()

    m = min(chunk, n)
    base_buf = (
        torch.empty(m, dtype=torch.float32, device=device) if base.dtype != torch.float32 else None
    )
    if consensus is None:
        divisor = math.fsum(ws)
        if abs(divisor) < 1e-8:
            divisor = 1.0
        post = (lambda_ / divisor) if normalize else lambda_
        dbuf = torch.empty(m, dtype=torch.float32, device=device)
        alphas = [c * post for c in coefs]
        # The base is folded into the first model's term (acc = base + a0 * d0, by lerp when
        # no cast is needed), saving a pass per chunk; zero deltas still give the base exactly.
        fused_first = plans[0].identity and flats[0].dtype == torch.float32 == base.dtype
        for s in range(0, n, chunk):
            e = min(s + chunk, n)
            b = base_f[s:e] if base_buf is None else base_buf[: e - s].copy_(base_f[s:e])
            acc = out[s:e]
            d = dbuf[: e - s]
            for i, (f, p) in enumerate(zip(flats, plans, strict=True)):
                if i == 0 and fused_first:
                    torch.lerp(b, f[s:e], alphas[0], out=acc)
                    continue
                torch.sub(f[s:e], b, out=d)
                if not p.identity:
                    p.mask_(d)
                if i == 0:
                    torch.add(b, d, alpha=alphas[0], out=acc)
                else:
                    acc.add_(d, alpha=alphas[i])
        return out.view(shape)

    # TIES family: all masked deltas of a chunk are needed to elect the sign.
    bufs = [torch.empty(m, dtype=torch.float32, device=device) for _ in range(k)]
    sbuf = torch.empty(m, dtype=torch.float32, device=device)
    divbuf = torch.empty(m, dtype=torch.float32, device=device) if normalize else None
    one = torch.ones((), dtype=torch.float32, device=device)
    tmp = torch.empty(m, dtype=torch.float32, device=device) if normalize else None
    # A non-empty sum of positive weights is >= the smallest one, so with positive weights
    # clamping to it only touches divisor == 0, where the mixed delta is 0 as well: the same
    # result as mergekit's divisor[divisor == 0] = 1, in one cheap op.
    div_floor = min(ws) if all(w > 0 for w in ws) else None
    factors = [p.factor for p in plans]
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        b = base_f[s:e] if base_buf is None else base_buf[: e - s].copy_(base_f[s:e])
        # Weighted deltas rounded as mergekit rounds them, (delta * rescale) * weight, because
        # the sign election below is discontinuous: a fused multiply-add would break exact
        # cancellations (common with quantised deltas) differently.
        wds = []
        for f, p, fac, w, buf in zip(flats, plans, factors, ws, bufs, strict=True):
            wd = buf[: e - s]
            torch.sub(f[s:e], b, out=wd)
            if not p.identity:
                p.mask_(wd)
            if fac != 1.0:
                wd.mul_(fac)
            wds.append(wd.mul_(w))
        # Elected sign ms = +-1 of the weighted deltas' sum ("sum") or of their signs' sum
        # ("count"); mergekit: (x >= 0) * 2 - 1. copysign maps +0 to +1 and -0 to -1, and a sum
        # is -0 only when every term is +-0, where no model contributes either way.
        ms = sbuf[: e - s]
        if consensus == "sum":
            ms.copy_(wds[0])
            for wd in wds[1:]:
                ms.add_(wd)
        else:
            torch.sign(wds[0], out=ms)
            for wd in wds[1:]:
                ms.add_(torch.sign(wd))
        torch.copysign(one, ms, out=ms)
        acc = out[s:e]
        acc.zero_()
        div = None if divbuf is None else divbuf[: e - s].zero_()
        for wd, w in zip(wds, ws, strict=True):
            if w == 0.0:
                continue  # sign(0) matches no elected sign: neither value nor weight counts
            # p = wd * ms is > 0 exactly where wd agrees with the elected sign, and there
            # p * ms == wd (multiplying by +-1 is exact).
            pbuf = wd.mul_(ms).relu_()
            if div is not None and tmp is not None:
                div.add_(torch.sign(pbuf, out=tmp[: e - s]), alpha=w)
            acc.addcmul_(pbuf, ms)
        if div is not None:
            if div_floor is not None:
                div.clamp_(min=div_floor)
            else:
                div.masked_fill_(div == 0, 1.0)
            acc.div_(div)
        if lambda_ != 1.0:
            acc.mul_(lambda_)
        acc.add_(b)
    return out.view(shape)


def _sparsifiers(
    method: str,
    kind: SparsificationMethod,
    densities: Sequence[float],
    *,
    rescale: bool,
    gammas: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
) -> list[Sparsifier]:
    res = []
    for i, dens in enumerate(densities):
        _check_unit(method, "density", dens, open_low=True)
        gamma = 0.0
        if gammas is not None:
            gamma = gammas[i]
            _check_unit(method, "gamma", gamma, open_low=False)
        seed = 0 if seeds is None else int(seeds[i])
        res.append(Sparsifier(kind, float(dens), rescale, gamma=float(gamma), seed=seed))
    return res


def task_arithmetic(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """``base + lambda * sum_i w_i (t_i - base)`` (/ ``sum w`` if ``normalize``; mergekit
    default False)."""
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        None,
        normalize=normalize,
        lambda_=lambda_,
        method="task_arithmetic",
        out=out,
    )


def ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = True,
    consensus: str = "sum",
    rescale: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """TIES: magnitude-trim each task vector to ``density``, elect signs, disjoint (weighted)
    mean (mergekit ``ties``: normalize True, rescale False)."""
    _check_len("ties", "densities", densities, len(tensors))
    sps = _sparsifiers("ties", SparsificationMethod.magnitude, densities, rescale=rescale)
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sps,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        method="ties",
        out=out,
    )


def dare_linear(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    *,
    rescale: bool = True,
    lambda_: float = 1.0,
    normalize: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """DARE: random drop to ``density`` and rescale, then a weighted sum (mergekit
    ``dare_linear``: normalize False, rescale True)."""
    _check_len("dare_linear", "densities", densities, len(tensors))
    _check_len("dare_linear", "seeds", seeds, len(tensors))
    sps = _sparsifiers(
        "dare_linear", SparsificationMethod.random, densities, rescale=rescale, seeds=seeds
    )
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sps,
        normalize=normalize,
        lambda_=lambda_,
        method="dare_linear",
        out=out,
    )


def dare_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    seeds: Sequence[int],
    *,
    rescale: bool = True,
    lambda_: float = 1.0,
    normalize: bool = False,
    consensus: str = "sum",
    out: Tensor | None = None,
) -> Tensor:
    """DARE drop-and-rescale with TIES sign election (mergekit ``dare_ties``: normalize False,
    rescale True)."""
    _check_len("dare_ties", "densities", densities, len(tensors))
    _check_len("dare_ties", "seeds", seeds, len(tensors))
    sps = _sparsifiers(
        "dare_ties", SparsificationMethod.random, densities, rescale=rescale, seeds=seeds
    )
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sps,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        method="dare_ties",
        out=out,
    )


def breadcrumbs(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Model Breadcrumbs: drop the ``gamma`` largest and the smallest magnitudes down to
    ``density``, then a weighted sum (mergekit ``breadcrumbs``: normalize/rescale False)."""
    _check_len("breadcrumbs", "densities", densities, len(tensors))
    _check_len("breadcrumbs", "gammas", gammas, len(tensors))
    sps = _sparsifiers(
        "breadcrumbs",
        SparsificationMethod.magnitude_outliers,
        densities,
        rescale=rescale,
        gammas=gammas,
    )
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sps,
        normalize=normalize,
        lambda_=lambda_,
        method="breadcrumbs",
        out=out,
    )


def breadcrumbs_ties(
    base: Tensor,
    tensors: Sequence[Tensor],
    weights: Sequence[float],
    densities: Sequence[float],
    gammas: Sequence[float],
    *,
    lambda_: float = 1.0,
    normalize: bool = False,
    rescale: bool = False,
    consensus: str = "sum",
    out: Tensor | None = None,
) -> Tensor:
    """Breadcrumbs sparsification with TIES sign election (mergekit ``breadcrumbs_ties``:
    normalize/rescale False)."""
    _check_len("breadcrumbs_ties", "densities", densities, len(tensors))
    _check_len("breadcrumbs_ties", "gammas", gammas, len(tensors))
    sps = _sparsifiers(
        "breadcrumbs_ties",
        SparsificationMethod.magnitude_outliers,
        densities,
        rescale=rescale,
        gammas=gammas,
    )
    return generalized_task_arithmetic(
        base,
        tensors,
        weights,
        sps,
        consensus=consensus,
        normalize=normalize,
        lambda_=lambda_,
        method="breadcrumbs_ties",
        out=out,
    )


# ---------------------------------------------------------------------------------------- slerp


def _stream_pair(a: Tensor, b: Tensor, chunk: int):
    """Yield float32 chunk views/copies of two flat tensors."""
    n = a.numel()
    m = min(chunk, n)
    abuf = (
        torch.empty(m, dtype=torch.float32, device=a.device) if a.dtype != torch.float32 else None
    )
    bbuf = (
        torch.empty(m, dtype=torch.float32, device=a.device) if b.dtype != torch.float32 else None
    )
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        ac = a[s:e] if abuf is None else abuf[: e - s].copy_(a[s:e])
        bc = b[s:e] if bbuf is None else bbuf[: e - s].copy_(b[s:e])
        yield s, e, ac, bc


def _combine2(
    v0: Tensor, v1: Tensor, s0: float, s1: float, shape: torch.Size, out: Tensor
) -> Tensor:
    """``s0 * v0 + s1 * v1`` in float32 into flat ``out``, skipping a zero coefficient (so ``t``
    of exactly 0 or 1 returns the endpoint bit for bit)."""
    n = v0.numel()
    chunk = chunk_elems(v0.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        acc = out[s:e]
        if s0 == 0.0:
            _scaled_into(acc, v1[s:e], s1)
        else:
            _scaled_into(acc, v0[s:e], s0)
            if s1 != 0.0:
                acc.add_(v1[s:e], alpha=s1)
    return out.view(shape)


def lerp(t: float, v0: Tensor, v1: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``(1 - t) * v0 + t * v1`` in float32."""
    _check_tensors("lerp", [v1], v0)
    buf = _output(out, v0, [v0, v1], "lerp")
    return _combine2(_flat(v0), _flat(v1), 1.0 - t, t, v0.shape, buf)


def slerp(
    t: float,
    v0: Tensor,
    v1: Tensor,
    *,
    dot_threshold: float = DOT_THRESHOLD,
    eps: float = 1e-8,
    out: Tensor | None = None,
) -> Tensor:
    """Spherical interpolation of two whole tensors (mergekit ``slerp``).

    The angle is taken between the flattened tensors, each normalised only if its norm exceeds
    ``eps``; if ``|cos| > dot_threshold`` the vectors are ~colinear and lerp is used. ``t = 0``
    gives ``v0`` (the base model), ``t = 1`` gives ``v1``.
    """
    _check_tensors("slerp", [v1], v0)
    _check_finite("slerp", "t", t)
    buf = _output(out, v0, [v0, v1], "slerp")
    a, b = _flat(v0), _flat(v1)
    dot = sq0 = sq1 = 0.0
    for _, _, ac, bc in _stream_pair(a, b, chunk_elems(a.device)):
        dot += float(torch.dot(ac, bc))
        sq0 += float(torch.dot(ac, ac))
        sq1 += float(torch.dot(bc, bc))
    n0, n1 = math.sqrt(sq0), math.sqrt(sq1)
    cos = dot / ((n0 if n0 > eps else 1.0) * (n1 if n1 > eps else 1.0))
    if abs(cos) > dot_threshold:
        return _combine2(a, b, 1.0 - t, t, v0.shape, buf)
    theta_0 = math.acos(cos)
    sin_theta_0 = math.sin(theta_0)
    theta_t = theta_0 * t
    s0 = math.sin(theta_0 - theta_t) / sin_theta_0
    s1 = math.sin(theta_t) / sin_theta_0
    return _combine2(a, b, s0, s1, v0.shape, buf)


# ---------------------------------------------------------------------------------- model_stock


def _stock_t(cos: Tensor, n_models: int) -> Tensor:
    """Model Stock's interpolation ratio ``t = N cos / (1 + (N - 1) cos)``.

    The denominator vanishes for exactly opposed offsets (``cos = -1 / (N - 1)``, common for
    tiny tensors such as a binary classifier's bias, whose deltas are collinear), where mergekit
    silently writes inf/nan. There we use ``t = 0``, the base, and log a warning.
    """
    denom = 1 + (n_models - 1) * cos
    degenerate = denom.abs() < 1e-6
    t = torch.where(degenerate, torch.zeros_like(cos), n_models * cos / denom.where(~degenerate, 1))
    if bool(degenerate.any()):
        log.warning(
            "model_stock: fine-tunes' offsets are exactly opposed (mean cosine -1/(N-1), N=%d) "
            "for %d of %d rows; keeping the base there",
            n_models,
            int(degenerate.sum()),
            degenerate.numel(),
        )
    return t


def model_stock(
    base: Tensor,
    tensors: Sequence[Tensor],
    *,
    filter_wise: bool = False,
    out: Tensor | None = None,
) -> Tensor:
    """Model Stock (mergekit ``model_stock``): move from the base towards the average of the
    fine-tunes by ``t = N cos / (1 + (N - 1) cos)``, ``cos`` the mean pairwise cosine of their
    offsets from the base (per row of the last dimension if ``filter_wise``; norm products are
    clamped to >= 1e-6 and cosines to [-1, 1] as in mergekit). Needs at least two fine-tunes.
    """
    method = "model_stock"
    _check_tensors(method, tensors, base)
    k = len(tensors)
    if k < 2:
        raise ValueError(f"{method}: needs at least 2 models besides the base, got {k}")
    result = _output(out, base, [base, *tensors], method)
    if filter_wise:
        return _model_stock_rows(base, tensors, result)
    base_f = _flat(base)
    flats = [_flat(t) for t in tensors]
    n = base_f.numel()
    device = base.device
    chunk = chunk_elems(device)
    m = max(1, min(chunk, n))
    bufs = [torch.empty(m, dtype=torch.float32, device=device) for _ in range(k)]
    base_buf = torch.empty(m, dtype=torch.float32, device=device)
    sq = [0.0] * k
    dots = {(i, j): 0.0 for i in range(k) for j in range(i + 1, k)}
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        b = _f32_chunk(base_f[s:e], base_buf)
        offs = []
        for f, buf in zip(flats, bufs, strict=True):
            o = buf[: e - s]
            torch.sub(f[s:e], b, out=o)
            offs.append(o)
        for i in range(k):
            sq[i] += float(torch.dot(offs[i], offs[i]))
        for i, j in dots:
            dots[i, j] += float(torch.dot(offs[i], offs[j]))
    cosines = []
    for (i, j), d in dots.items():
        c = d / max(math.sqrt(sq[i]) * math.sqrt(sq[j]), 1e-6)
        cosines.append(min(1.0, max(-1.0, c)))
    cos = sum(cosines) / len(cosines)
    t = float(_stock_t(torch.tensor(cos), k))
    # w_h = t * mean(ws) + (1 - t) * w_0
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        acc = result[s:e]
        _scaled_into(acc, base_f[s:e], 1.0 - t)
        for f in flats:
            acc.add_(f[s:e], alpha=t / k)
    return result.view(base.shape)


def _model_stock_rows(base: Tensor, tensors: Sequence[Tensor], out: Tensor) -> Tensor:
    """Filter-wise Model Stock: one ``t`` per vector along the last dimension (a 0-d or 1-d
    tensor is a single row, as mergekit treats biases)."""
    k = len(tensors)
    cols = base.shape[-1] if base.dim() >= 1 else 1
    rows = base.numel() // cols if cols else 0
    device = base.device
    if base.numel() == 0:
        return out.view(base.shape)
    base_r = base.reshape(rows, cols)
    rs = [t.reshape(rows, cols) for t in tensors]
    out_r = out.view(rows, cols)
    block = max(1, chunk_elems(device) // cols)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    for r0 in range(0, rows, block):
        r1 = min(r0 + block, rows)
        b = base_r[r0:r1].float()
        offs = [torch.sub(x[r0:r1], b) for x in rs]  # float32 via promotion with b
        norms = [o.norm(dim=-1) for o in offs]
        cos = torch.zeros(r1 - r0, dtype=torch.float32, device=device)
        for i, j in pairs:
            c = (offs[i] * offs[j]).sum(dim=-1) / (norms[i] * norms[j]).clamp(min=1e-6)
            cos.add_(c.clamp_(-1, 1))
        cos.div_(len(pairs))
        t = _stock_t(cos, k).unsqueeze(-1)
        acc = out_r[r0:r1]
        torch.mul(b, 1 - t, out=acc)
        for x in rs:
            acc.addcmul_(x[r0:r1].float(), t, value=1.0 / k)
    return out.view(base.shape)
