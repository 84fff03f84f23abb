"""Shared checks and chunked float32 helpers of the merge operators (``operators``,
``interpolation``): inputs validated once, results written into a caller's buffer."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from evoray.errors import ConfigError


def check_tensors(method: str, tensors: Sequence[Tensor], base: Tensor | None) -> None:
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


def check_len(method: str, name: str, values: Sequence, n: int) -> None:
    if len(values) != n:
        raise ValueError(f"{method}: got {len(values)} {name} for {n} models")


def check_finite(method: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{method}: parameter '{name}' must be a finite number, got {value!r}")


def check_unit(method: str, name: str, value: float, *, open_low: bool) -> None:
    check_finite(method, name, value)
    ok = (0 < value <= 1) if open_low else (0 <= value <= 1)
    if not ok:
        interval = "(0, 1]" if open_low else "[0, 1]"
        raise ConfigError(f"{method}: parameter '{name}' must be in {interval}, got {value!r}")


def output_buffer(out: Tensor | None, ref: Tensor, inputs: Sequence[Tensor], method: str) -> Tensor:
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


def flatten_view(t: Tensor) -> Tensor:
    return t.reshape(-1)


def f32_chunk(src: Tensor, buf: Tensor) -> Tensor:
    """``src`` as float32: a view when it already is, else converted into ``buf``."""
    if src.dtype == torch.float32:
        return src
    return buf[: src.numel()].copy_(src)


def scaled_into(out: Tensor, src: Tensor, alpha: float) -> None:
    """``out = alpha * src`` computed in float32 (``torch.mul(bf16, s, out=f32)`` would round the
    product in bfloat16 first)."""
    if src.dtype == torch.float32:
        torch.mul(src, alpha, out=out)
    else:
        out.copy_(src)
        if alpha != 1.0:
            out.mul_(alpha)
