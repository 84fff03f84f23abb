"""Weight space: a model's floating parameters as one flat vector over a ``Layout``.

Population search (Evolver, kinship) works on whole models as vectors: task vectors
``theta_finetuned - theta_base`` that live once per node in Ray's object store. A flat numpy
buffer is what the object store hands out zero-copy, so that is the storage; torch views of it
(``as_tensor``, ``tensor``) cost nothing. bfloat16 has no numpy dtype, so it is stored as its raw
16-bit pattern (``uint16``) and viewed back as bfloat16 by torch.

Differences are computed in float32 one chunk at a time and stored in the source dtype, so
memory stays at one model in its own precision plus one float32 chunk.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from evoray.errors import LayoutError
from evoray.weights.layout import Layout, TensorSource

CHUNK_ELEMS = 1 << 22  # 16 MiB of float32 per operand

_NUMPY_STORAGE = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.uint16,  # raw bits; torch views them as bfloat16
    torch.float64: np.float64,
}


def _numpy_dtype(dtype: torch.dtype) -> type:
    try:
        return _NUMPY_STORAGE[dtype]
    except KeyError:
        raise LayoutError(f"unsupported storage dtype {dtype} for the weight space") from None


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """Storage-dtype numpy array of a tensor (bfloat16 as its uint16 bit pattern)."""
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_numpy(arr: np.ndarray) -> torch.Tensor:
    """Zero-copy torch view of a stored vector; uint16 arrays are bfloat16 bit patterns.
    Object-store arrays are read-only; callers never write to them."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        t = torch.from_numpy(np.asarray(arr))
    return t.view(torch.bfloat16) if t.dtype == torch.uint16 else t


class TensorReader(TensorSource, Protocol):
    """A layout source that can also read tensor data (a ``Checkpoint``)."""

    def get(self, name: str) -> torch.Tensor: ...


@dataclass
class FlatWeights:
    """A flat vector of one model's floating parameters (or of a task vector)."""

    layout: Layout
    data: np.ndarray

    def __post_init__(self) -> None:
        expected = _numpy_dtype(self.layout.storage_dtype)
        if (
            self.data.ndim != 1
            or self.data.dtype != expected
            or self.data.size != self.layout.numel
        ):
            raise LayoutError(
                f"flat buffer has shape {self.data.shape} and dtype {self.data.dtype}; the "
                f"layout of {self.layout.source} needs ({self.layout.numel},) {np.dtype(expected)}"
            )

    @classmethod
    def zeros(cls, layout: Layout) -> FlatWeights:
        return cls(layout, np.zeros(layout.numel, dtype=_numpy_dtype(layout.storage_dtype)))

    def as_tensor(self) -> torch.Tensor:
        """Zero-copy 1-D torch view in the storage dtype (writes go to ``data``)."""
        t = torch.from_numpy(self.data)
        return t.view(torch.bfloat16) if self.layout.storage_dtype == torch.bfloat16 else t

    def tensor(self, name: str) -> torch.Tensor:
        """Zero-copy view of one tensor, shaped as in the checkpoint."""
        s = self.layout.slot(name)
        return self.as_tensor()[s.offset : s.offset + s.numel].view(s.shape)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """All tensors as views, for ``model.load_state_dict(..., strict=False)``."""
        return {s.name: self.tensor(s.name) for s in self.layout.slots}


def _check_all(layout: Layout, sources: Sequence[TensorSource]) -> None:
    for src in sources:
        layout.check(src)


def flatten(
    ckpt: TensorReader, layout: Layout | None = None, out: FlatWeights | None = None
) -> FlatWeights:
    """Copy a checkpoint's floating tensors into one flat vector (in the layout's dtype):
    ``out`` when given (e.g. a worker's model memory), else a new one."""
    layout = layout or Layout.from_checkpoint(ckpt)
    _check_all(layout, [ckpt])
    out = FlatWeights.zeros(layout) if out is None else out
    for s in layout.slots:
        out.tensor(s.name).copy_(ckpt.get(s.name))
    return out


def task_vectors(
    finetuned: Sequence[TensorReader],
    base: TensorReader,
    layout: Layout | None = None,
    *,
    chunk_elems: int = CHUNK_ELEMS,
) -> list[FlatWeights]:
    """Task vectors ``finetuned_i - base`` of several models, reading each base tensor once.

    Every checkpoint is checked against the layout first, so a mismatch fails before any
    data is read. Each subtraction runs in float32 on ``chunk_elems`` elements at a time and
    is rounded once into the storage dtype.
    """
    layout = layout or Layout.from_checkpoint(base)
    _check_all(layout, [base, *finetuned])
    outs = [FlatWeights.zeros(layout) for _ in finetuned]
    scratch = torch.empty(min(chunk_elems, max(s.numel for s in layout.slots)))
    for s in layout.slots:
        b = base.get(s.name).reshape(-1)
        for ckpt, out in zip(finetuned, outs, strict=True):
            f = ckpt.get(s.name).reshape(-1)
            dst = out.tensor(s.name).view(-1)
            for start in range(0, s.numel, chunk_elems):
                stop = min(start + chunk_elems, s.numel)
                buf = scratch[: stop - start]
                buf.copy_(f[start:stop])
                buf.sub_(b[start:stop])
                dst[start:stop].copy_(buf)
            del f
    return outs
