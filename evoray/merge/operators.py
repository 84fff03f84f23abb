"""Pure tensor merge operators with mergekit's semantics.

No I/O, no Ray, no config parsing: same-shape tensors in (any float dtype, one device), a float32
tensor of that shape out; ``evoray.merge.registry`` maps config parameters onto these functions.
How the task-vector methods work, where evoray deliberately differs from mergekit and why the
operators stream in chunks: docs/merge-methods.md.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evoray.errors import ConfigError
from evoray.merge.checks import (
    check_finite,
    check_len,
    check_tensors,
    check_unit,
    flatten_view,
    output_buffer,
    scaled_into,
)
from evoray.merge.sparsify import (
    DeltaSource,
    Plan,
    SparsificationMethod,
    Sparsifier,
    chunk_elems,
)

__all__ = [
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "generalized_task_arithmetic",
    "linear",
    "task_arithmetic",
    "ties",
]

CONSENSUS_METHODS = ("sum", "count")

log = logging.getLogger(__name__)


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
    check_tensors(method, tensors, None)
    check_len(method, "weights", weights, len(tensors))
    for w in weights:
        check_finite(method, "weight", w)
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
    flats = [flatten_view(t) for t in tensors]
    n = flats[0].numel()
    out = output_buffer(out, flats[0], tensors, method)
    chunk = chunk_elems(out.device)
    for s in range(0, n, chunk):
        e = min(s + chunk, n)
        acc = out[s:e]
        scaled_into(acc, flats[0][s:e], ws[0])
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
    check_tensors(method, tensors, base)
    k = len(tensors)
    check_len(method, "weights", weights, k)
    if sparsifiers is None:
        sparsifiers = [None] * k
    check_len(method, "sparsifiers", sparsifiers, k)
    if consensus is not None and consensus not in CONSENSUS_METHODS:
        raise ConfigError(
            f"{method}: consensus must be one of {', '.join(CONSENSUS_METHODS)} or None, "
            f"got {consensus!r}"
        )
    for w in weights:
        check_finite(method, "weight", w)
    check_finite(method, "lambda", lambda_)
    ws = [float(w) for w in weights]

    shape = base.shape
    device = base.device
    base_f = flatten_view(base)
    flats = [flatten_view(t) for t in tensors]
    n = base_f.numel()
    chunk = chunk_elems(device)
    out = output_buffer(out, base, [base, *tensors], method)
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
        check_unit(method, "density", dens, open_low=True)
        gamma = 0.0
        if gammas is not None:
            gamma = gammas[i]
            check_unit(method, "gamma", gamma, open_low=False)
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
    check_len("ties", "densities", densities, len(tensors))
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
    check_len("dare_linear", "densities", densities, len(tensors))
    check_len("dare_linear", "seeds", seeds, len(tensors))
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
    check_len("dare_ties", "densities", densities, len(tensors))
    check_len("dare_ties", "seeds", seeds, len(tensors))
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
    check_len("breadcrumbs", "densities", densities, len(tensors))
    check_len("breadcrumbs", "gammas", gammas, len(tensors))
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
    check_len("breadcrumbs_ties", "densities", densities, len(tensors))
    check_len("breadcrumbs_ties", "gammas", gammas, len(tensors))
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
