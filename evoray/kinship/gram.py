"""Streaming sums for kinship: per tensor, the deltas of N models from the base go into the
rows of one float32 buffer whose product with its transpose gives the Gram block, the sums and
the count, so every N x N metric comes from (N+1)^2 running sums and each tensor is read once.

Why float32 blocks added in float64, the chunk size and the memory bound: docs/kinship.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from evoray.kinship.metrics import KinshipSums
from evoray.weights.checkpoint import Checkpoint, open_checkpoint
from evoray.weights.layers import before_blocks, layer_index

METRICS = ("pearson", "cosine", "euclidean")
CHUNK_ELEMS = 1 << 17
BLOCK = 1 << 10  # elements per float32 dot product
# safetensors tensors are views of a memory map of the whole file; the pages read stay in this
# process's RSS until the map is closed. Closing the files after this many bytes keeps RSS bounded
# (the page cache keeps them; reopening costs a header parse).
RELEASE_BYTES = 256 << 20
TOTAL = "all"  # group key when per-layer values are not asked for


@dataclass(eq=False)
class GramSums:
    """Running sums of N delta vectors: element count, per-model sums and the Gram matrix.

    Enough for every pairwise kinship metric, and additive over disjoint parts of the weights,
    so partial sums from chunks, tensors, layers or Ray tasks combine with ``merge``.
    """

    n: int
    sums: np.ndarray  # (N,) sum of each delta
    gram: np.ndarray  # (N, N) dot products of deltas; the diagonal is |d_i|^2

    @classmethod
    def zeros(cls, k: int) -> GramSums:
        return cls(0, np.zeros(k), np.zeros((k, k)))

    @classmethod
    def from_augmented(cls, g: np.ndarray) -> GramSums:
        """From the Gram matrix of the deltas with a row of ones appended."""
        k = g.shape[0] - 1
        g = (g + g.T) / 2  # the float32 product is symmetric only up to rounding
        return cls(round(float(g[k, k])), g[:k, k].copy(), g[:k, :k].copy())

    def merge(self, other: GramSums) -> GramSums:
        """Sums over the union of two disjoint parts."""
        return GramSums(self.n + other.n, self.sums + other.sums, self.gram + other.gram)

    def pair(self, i: int, j: int) -> KinshipSums:
        """The two-model sums of models ``i`` and ``j`` (``evoray.kinship.metrics.KinshipSums``)."""
        g, s = self.gram, self.sums
        return KinshipSums(self.n, s[i], s[j], g[i, i], g[j, j], g[i, j])

    def matrix(self, metric: str) -> np.ndarray:
        """N x N matrix of ``metric``, the same formulas as ``KinshipSums``.

        The diagonal is exactly 1 (pearson, cosine) or 0 (euclidean); pearson and cosine are NaN
        for a model whose delta has no variance (or is zero), since they are undefined there.
        """
        g = self.gram
        with np.errstate(invalid="ignore", divide="ignore"):
            if metric == "euclidean":
                sq = np.diag(g)
                out = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * g, 0.0))
                np.fill_diagonal(out, 0.0)
                return out
            if metric == "pearson":
                n = max(self.n, 1)
                cov = g - np.outer(self.sums, self.sums) / n
            elif metric == "cosine":
                cov = g
            else:
                raise ValueError(f"unknown kinship metric {metric!r}; expected one of {METRICS}")
            var = np.diag(cov).copy()
            ok = (var > 0) & (self.n > 0)
            scale = np.sqrt(np.where(ok, var, np.nan))
            out = cov / np.outer(scale, scale)
            np.fill_diagonal(out, np.where(ok, 1.0, np.nan))
            return np.clip(out, -1.0, 1.0)

    @property
    def delta_norms(self) -> np.ndarray:
        """|theta_i - base| of each model."""
        return np.sqrt(np.maximum(np.diag(self.gram), 0.0))


def layer_group(name: str) -> str:
    """Per-layer group of a tensor: ``layers.<i>`` for transformer block ``i``, else
    ``embeddings`` (token/position embeddings, before the blocks) or ``head`` (everything after
    the blocks: final norm, LM head, pooler), as merge configs place tensors for gradients."""
    idx = layer_index(name)
    if idx is not None:
        return f"layers.{idx}"
    return "embeddings" if before_blocks(name) else "head"


def group_order(key: str) -> tuple[int, int]:
    if key == "embeddings":
        return (0, 0)
    if key.startswith("layers."):
        return (1, int(key.split(".", 1)[1]))
    return (2, 0)


def _accumulate_tensor(
    ckpts: Sequence[Checkpoint],
    name: str,
    buf: torch.Tensor,
    base_buf: torch.Tensor,
    *,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """Augmented Gram (float64, (N+1)^2) of one tensor's deltas, chunk by chunk.

    A function of its own so every tensor it read is freed on return: at most one tensor per
    checkpoint is alive at any time. A NaN or Inf weight makes the Gram non-finite, so the
    tensors are searched for it (and it is named) only then: the check costs nothing otherwise.
    """
    tensors = [c.get(name).reshape(-1) for c in ckpts]
    acc = _gram(tensors, buf, base_buf)
    if not allow_nonfinite and not bool(torch.isfinite(acc).all()):
        for c, t in zip(ckpts, tensors, strict=True):
            c.check_finite(name, t)
    return acc


def _gram(tensors: list[torch.Tensor], buf: torch.Tensor, base_buf: torch.Tensor) -> torch.Tensor:
    base, *models = tensors
    k, chunk = len(models), buf.shape[1]
    acc = torch.zeros(k + 1, k + 1, dtype=torch.float64)
    numel = base.numel()
    for s in range(0, numel, chunk):
        e = min(s + chunk, numel)
        view = buf[:, : e - s]
        b = base[s:e]
        if b.dtype != torch.float32:
            b = base_buf[: e - s].copy_(b)  # bf16/fp16 read, float32 arithmetic
        for i, m in enumerate(models):
            torch.sub(m[s:e], b, out=view[i])
        # float32 products over blocks of BLOCK elements, added in float64: one product over
        # the whole chunk would round ~100x more (measured) and is no faster.
        nb = (e - s) // BLOCK
        if nb:
            blocks = view[:, : nb * BLOCK].reshape(k + 1, nb, BLOCK).transpose(0, 1)
            acc += torch.bmm(blocks, blocks.transpose(1, 2)).sum(0, dtype=torch.float64)
        rest = view[:, nb * BLOCK :]
        if rest.shape[1]:
            acc += torch.mm(rest, rest.T)
    return acc


def group_sums(
    paths: Sequence[str],
    names: Sequence[str],
    *,
    allow_pickle: bool,
    per_layer: bool,
    chunk_elems: int,
    ckpts: Sequence[Checkpoint] | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, GramSums]:
    """Partial sums over ``names`` (base first in ``paths``), keyed by layer group."""
    own = ckpts is None
    if ckpts is None:
        ckpts = [open_checkpoint(p, allow_pickle=allow_pickle) for p in paths]
    try:
        k = len(ckpts) - 1
        longest = max((ckpts[0].info(n).numel for n in names), default=1)
        chunk = max(1, min(chunk_elems, longest))
        buf = torch.empty(k + 1, chunk, dtype=torch.float32)
        buf[k].fill_(1.0)  # the ones row: its products give the sums and the count
        base_buf = torch.empty(chunk, dtype=torch.float32)
        acc: dict[str, torch.Tensor] = {}
        unreleased = 0
        for name in names:
            key = layer_group(name) if per_layer else TOTAL
            g = _accumulate_tensor(ckpts, name, buf, base_buf, allow_nonfinite=allow_nonfinite)
            acc[key] = acc[key] + g if key in acc else g
            unreleased += sum(c.info(name).nbytes for c in ckpts)
            if unreleased >= RELEASE_BYTES:
                for c in ckpts:
                    c.close()  # unmaps what was read; later reads reopen the files
                unreleased = 0
        return {key: GramSums.from_augmented(g.numpy()) for key, g in acc.items()}
    finally:
        if own:
            for c in ckpts:
                c.close()
