"""Model kinship (Hu et al. 2024): similarity of two models' weight deltas from a shared base.

Computed exactly from running sums over chunks, so memory does not grow with model size:
with deltas ``a = theta_1 - base`` and ``b = theta_2 - base`` over all n elements,
Pearson = cov(a, b) / (std(a) std(b)), cosine = a.b / (|a| |b|), Euclidean = |a - b|.
Sums are accumulated in float64 per chunk (float32 elementwise), so results do not depend on
the chunk size beyond rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CHUNK = 1 << 22


@dataclass
class KinshipSums:
    """Running sums of two delta vectors; ``update`` per chunk, then read the metrics."""

    n: int = 0
    sa: float = 0.0
    sb: float = 0.0
    saa: float = 0.0
    sbb: float = 0.0
    sab: float = 0.0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        a, b = a.reshape(-1).float(), b.reshape(-1).float()
        self.n += a.numel()
        self.sa += float(a.sum(dtype=torch.float64))
        self.sb += float(b.sum(dtype=torch.float64))
        self.saa += float(torch.dot(a, a))
        self.sbb += float(torch.dot(b, b))
        self.sab += float(torch.dot(a, b))

    def merge(self, other: KinshipSums) -> KinshipSums:
        """Combine sums from disjoint parts (e.g. shards read by parallel tasks)."""
        return KinshipSums(
            self.n + other.n,
            self.sa + other.sa,
            self.sb + other.sb,
            self.saa + other.saa,
            self.sbb + other.sbb,
            self.sab + other.sab,
        )

    @property
    def pearson(self) -> float:
        if self.n == 0:
            return float("nan")
        cov = self.sab - self.sa * self.sb / self.n
        va = self.saa - self.sa**2 / self.n
        vb = self.sbb - self.sb**2 / self.n
        return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else float("nan")

    @property
    def cosine(self) -> float:
        return (
            self.sab / math.sqrt(self.saa * self.sbb)
            if self.saa > 0 and self.sbb > 0
            else float("nan")
        )

    @property
    def euclidean(self) -> float:
        return math.sqrt(max(self.saa + self.sbb - 2 * self.sab, 0.0))

    def as_dict(self) -> dict[str, float]:
        return {"pearson": self.pearson, "cosine": self.cosine, "euclidean": self.euclidean}


def kinship_flat(
    x: torch.Tensor, y: torch.Tensor, base: torch.Tensor, *, chunk: int = CHUNK
) -> KinshipSums:
    """Kinship of two flat weight vectors relative to a flat base vector, chunk by chunk."""
    if not x.numel() == y.numel() == base.numel():
        raise ValueError(f"sizes differ: {x.numel()}, {y.numel()}, base {base.numel()}")
    sums = KinshipSums()
    dev = x.device  # a GPU worker's offspring against CPU population vectors: chunks move
    for s in range(0, x.numel(), chunk):
        b = base[s : s + chunk].to(dev, torch.float32)
        xs = x[s : s + chunk].float()
        sums.update(xs - b, y[s : s + chunk].to(dev, torch.float32) - b)
    return sums
