"""Where a worker's flat weights live: contiguous segments of the layout, each on one device.

A worker on one device holds one segment (the whole flat vector). A worker spanning several
GPUs holds one segment per device, split at tensor boundaries, so every tensor is a view into
exactly one segment. Builds (offspring, merges, copies) write element ranges of the layout;
``pieces`` maps a range onto the segments that hold it, so they never care how many there are.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Segment:
    """Elements ``[start, stop)`` of the layout, stored in ``buffer`` (1-D, on its device)."""

    start: int
    stop: int
    buffer: torch.Tensor

    def __post_init__(self) -> None:
        if self.buffer.dim() != 1 or self.buffer.numel() != self.stop - self.start:
            raise ValueError(
                f"segment [{self.start}, {self.stop}) needs a 1-D buffer of "
                f"{self.stop - self.start} elements, got shape {list(self.buffer.shape)}"
            )

    @property
    def device(self) -> torch.device:
        return self.buffer.device


def single_segment(numel: int, dtype: torch.dtype, device: torch.device | str) -> list[Segment]:
    """The whole layout on one device."""
    return [Segment(0, numel, torch.empty(numel, dtype=dtype, device=device))]


def pieces(
    segments: Sequence[Segment], start: int, stop: int
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """``(lo, hi, view)`` for each part of ``[start, stop)``: ``view`` is the segment memory
    holding elements ``[lo, hi)``."""
    for s in segments:
        lo, hi = max(start, s.start), min(stop, s.stop)
        if lo < hi:
            yield lo, hi, s.buffer[lo - s.start : hi - s.start]


def write_range(segments: Sequence[Segment], start: int, values: torch.Tensor) -> None:
    """Copy ``values`` (1-D, any device and floating dtype: layout elements ``start`` on) into
    the segments that hold them."""
    for lo, hi, view in pieces(segments, start, start + values.numel()):
        view.copy_(values[lo - start : hi - start])


def write_flat(segments: Sequence[Segment], flat: torch.Tensor) -> None:
    """Copy a whole flat vector (any device, any floating dtype) into the segments."""
    for s in segments:
        s.buffer.copy_(flat[s.start : s.stop])


def read_flat(segments: Sequence[Segment]) -> np.ndarray:
    """The segments as one host numpy vector (for the object store)."""
    from evoray.weights.flat import to_numpy

    if len(segments) == 1:
        return to_numpy(segments[0].buffer.cpu())
    return to_numpy(torch.cat([s.buffer.cpu() for s in segments]))
