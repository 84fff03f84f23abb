"""Interpolation merges with mergekit's semantics: ``lerp``, ``slerp`` and ``model_stock``.

Pure tensor functions like ``operators``: float32 arithmetic, chunked passes, ``out=`` buffers.
slerp falls back to lerp for nearly colinear inputs (``DOT_THRESHOLD``); model_stock keeps the
base where offsets are exactly opposed (mergekit writes inf/nan there).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evoray.merge.checks import (
    check_finite,
    check_tensors,
    f32_chunk,
    flatten_view,
    output_buffer,
    scaled_into,
)
from evoray.merge.sparsify import chunk_elems

__all__ = ["DOT_THRESHOLD", "lerp", "model_stock", "slerp"]

DOT_THRESHOLD = 0.9995
"""mergekit's slerp colinearity threshold: above it, slerp falls back to lerp."""

log = logging.getLogger(__name__)


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
            scaled_into(acc, v1[s:e], s1)
        else:
            scaled_into(acc, v0[s:e], s0)
            if s1 != 0.0:
                acc.add_(v1[s:e], alpha=s1)
    return out.view(shape)


def lerp(t: float, v0: Tensor, v1: Tensor, *, out: Tensor | None = None) -> Tensor:
    """``(1 - t) * v0 + t * v1`` in float32."""
    check_tensors("lerp", [v1], v0)
    buf = output_buffer(out, v0, [v0, v1], "lerp")
    return _combine2(flatten_view(v0), flatten_view(v1), 1.0 - t, t, v0.shape, buf)


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
    check_tensors("slerp", [v1], v0)
    check_finite("slerp", "t", t)
    buf = output_buffer(out, v0, [v0, v1], "slerp")
    a, b = flatten_view(v0), flatten_view(v1)
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
    check_tensors(method, tensors, base)
    k = len(tensors)
    if k < 2:
        raise ValueError(f"{method}: needs at least 2 models besides the base, got {k}")
    result = output_buffer(out, base, [base, *tensors], method)
    if filter_wise:
        return _model_stock_rows(base, tensors, result)
    base_f = flatten_view(base)
    flats = [flatten_view(t) for t in tensors]
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
        b = f32_chunk(base_f[s:e], base_buf)
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
        scaled_into(acc, base_f[s:e], 1.0 - t)
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
