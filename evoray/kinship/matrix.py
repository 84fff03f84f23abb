"""Kinship of every pair of N models (Hu et al. 2024) in one streaming pass over the checkpoints.

Pairwise kinship needs, for the deltas ``d_i = theta_i - base``, only the element count, each
model's sum ``sum(d_i)`` and the Gram matrix ``d_i . d_j`` (its diagonal holds ``|d_i|^2``).
So each tensor is read once per checkpoint (base included), not once per pair, and all N x N
metrics come from ``(N+1)^2`` running sums. Per chunk, the deltas are written into the rows of
one float32 buffer whose last row is all ones; the product of that buffer with its transpose
yields the Gram block, the sums and the count. Products run in float32 over blocks of 1024
elements and are accumulated in float64: on a 128M-weight model the metrics agree with an
all-float64 computation to ~1e-8 (relative), against ~2e-6 for one product per 64K chunk.

Chunks default to 128K elements so the buffer stays in cache (measured ~1.6x faster than
4M-element chunks on CPU, and than 32K ones, where per-chunk overhead dominates). Memory: one
tensor per checkpoint plus the ``(N+1) x chunk`` buffer, whatever the model size; safetensors
reads are memory-mapped, so file pages also count in RSS until the files are closed, which
happens every ``RELEASE_BYTES`` read.

With Ray initialised (or ``parallel=True``), the tensor names are cut into contiguous groups of
about equal size, two per CPU, and one Ray task per group returns its partial sums, which are
added up. Tasks open the checkpoints themselves from their resolved local paths, so on a
multi-node cluster every node must see those paths (shared storage).
"""

from __future__ import annotations

import functools
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evoray.errors import EvorayError, ray_get
from evoray.kinship.metrics import KinshipSums
from evoray.weights.checkpoint import Checkpoint, open_checkpoint
from evoray.weights.layers import before_blocks, layer_index
from evoray.weights.layout import Layout

__all__ = [
    "METRICS",
    "GramSums",
    "KinshipResult",
    "heatmap",
    "kinship_matrix",
    "layer_group",
]

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


def _group_order(key: str) -> tuple[int, int]:
    if key == "embeddings":
        return (0, 0)
    if key.startswith("layers."):
        return (1, int(key.split(".", 1)[1]))
    return (2, 0)


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if math.isnan(v) else float(v) for v in row] for row in a.tolist()]


@dataclass(frozen=True, eq=False)
class KinshipResult:
    """All pairwise kinship values of N models relative to one base.

    Holds the exact running sums (``total``, and per layer group in ``layers`` when asked for),
    so any metric can be read from it; ``metrics`` are the ones shown by ``to_dict`` and the CLI.
    """

    base: str
    sources: tuple[str, ...]
    labels: tuple[str, ...]
    total: GramSums
    layers: dict[str, GramSums] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS

    def matrix(self, metric: str) -> np.ndarray:
        """N x N matrix over all floating tensors (symmetric; see ``GramSums.matrix``)."""
        return self.total.matrix(metric)

    def layer_matrix(self, layer: str, metric: str) -> np.ndarray:
        try:
            return self.layers[layer].matrix(metric)
        except KeyError:
            raise KeyError(f"no per-layer values for {layer!r}; have {list(self.layers)}") from None

    @property
    def per_layer(self) -> dict[str, dict[str, np.ndarray]]:
        """``{layer group: {metric: N x N matrix}}`` in model order (empty unless per_layer)."""
        return {k: {m: s.matrix(m) for m in self.metrics} for k, s in self.layers.items()}

    @property
    def delta_norms(self) -> np.ndarray:
        return self.total.delta_norms

    @property
    def n_elements(self) -> int:
        return self.total.n

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes null)."""
        out: dict[str, Any] = {
            "base": self.base,
            "models": list(self.sources),
            "labels": list(self.labels),
            "n_elements": self.n_elements,
            "delta_norm": [float(v) for v in self.delta_norms],
            "metrics": {m: _nan_to_none(self.matrix(m)) for m in self.metrics},
        }
        if self.layers:
            out["per_layer"] = {
                k: {
                    "n_elements": s.n,
                    "delta_norm": [float(v) for v in s.delta_norms],
                    **{m: _nan_to_none(s.matrix(m)) for m in self.metrics},
                }
                for k, s in self.layers.items()
            }
        return out

    def format_table(self, metric: str) -> str:
        """The N x N matrix as aligned text, plus each model's delta norm."""
        a = self.matrix(metric)
        fmt = _value_format(metric)
        width = max(9, *(len(lab) for lab in self.labels)) + 2
        first = max(len(lab) for lab in self.labels) + 2
        lines = [
            f"{metric} kinship of weight deltas from base {self.base}",
            " " * first
            + "".join(f"{lab:>{width}}" for lab in self.labels)
            + f"{'|delta|':>{width}}",
        ]
        for lab, row, norm in zip(self.labels, a, self.delta_norms, strict=True):
            cells = "".join(f"{fmt(v):>{width}}" for v in row)
            lines.append(f"{lab:<{first}}{cells}{norm:>{width}.4g}")
        return "\n".join(lines)

    def format_layer_table(self, metric: str) -> str:
        """One row per layer group, one column per model pair (``i-j``, numbered as listed)."""
        if not self.layers:
            return ""
        k = len(self.labels)
        pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
        fmt = _value_format(metric)
        width = 10
        first = max(len("layer"), *(len(g) for g in self.layers)) + 2
        legend = ", ".join(f"{i + 1}={lab}" for i, lab in enumerate(self.labels))
        lines = [
            f"{metric} kinship per layer ({legend})",
            f"{'layer':<{first}}" + "".join(f"{f'{i + 1}-{j + 1}':>{width}}" for i, j in pairs),
        ]
        for key, sums in self.layers.items():
            a = sums.matrix(metric)
            lines.append(f"{key:<{first}}" + "".join(f"{fmt(a[i, j]):>{width}}" for i, j in pairs))
        return "\n".join(lines)


def _value_format(metric: str) -> Any:
    if metric == "euclidean":
        return lambda v: f"{v:.4g}"
    return lambda v: "nan" if math.isnan(v) else f"{v:.4f}"


# ---------------------------------------------------------------------------------------------
# the pass over the checkpoints


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


def _group_sums(
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


def _split(names: Sequence[str], sizes: Sequence[int], parts: int) -> list[list[str]]:
    """Contiguous groups of about equal total size (file order keeps reads sequential)."""
    total = sum(sizes) or 1
    groups: list[list[str]] = [[]]
    done = 0
    for name, size in zip(names, sizes, strict=True):
        if groups[-1] and done >= total * len(groups) / parts:
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def _ray_enabled(parallel: bool | None) -> bool:
    if parallel is False:
        return False
    if parallel is None:
        ray = sys.modules.get("ray")  # not imported means not initialised: skip the import cost
        return ray is not None and ray.is_initialized()
    return True


def _labels(models: Sequence[str]) -> tuple[str, ...]:
    """Short names (folder or file stem); the given strings where those would collide."""
    short = []
    for m in models:
        p = Path(m.rstrip("/\\"))
        short.append(p.stem if p.suffix == ".safetensors" else (p.name or m))
    return tuple(short) if len(set(short)) == len(short) else tuple(models)


def kinship_matrix(
    base: str | Path,
    models: Sequence[str | Path],
    *,
    metrics: Sequence[str] = METRICS,
    per_layer: bool = False,
    allow_pickle: bool = False,
    parallel: bool | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    allow_nonfinite: bool = False,
) -> KinshipResult:
    """Kinship of every pair of ``models`` (weight deltas from ``base``) in one pass.

    ``parallel``: None uses Ray if it is initialised, True starts a local Ray if needed (or joins
    ``RAY_ADDRESS``), False reads in this process. ``per_layer`` also keeps sums per layer group
    (see ``layer_group``). Layouts are checked against the base before any tensor is read, so a
    mismatch raises ``LayoutError`` naming the tensor at once. A NaN or Inf weight raises
    ``CheckpointError`` naming file and tensor (the values would be ``nan``) unless
    ``allow_nonfinite``.
    """
    metrics = tuple(metrics)
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown kinship metric {m!r}; expected some of {METRICS}")
    if len(models) < 2:
        raise EvorayError(f"kinship needs at least two models besides the base, got {len(models)}")
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")

    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    ckpts = [base_ckpt] + [open_checkpoint(m, allow_pickle=allow_pickle) for m in models]
    try:
        layout = Layout.from_checkpoint(base_ckpt)
        for c in ckpts[1:]:
            layout.check(c)
        names = layout.names
        if _ray_enabled(parallel):
            parts = _ray_sums(ckpts, layout, allow_pickle, per_layer, chunk_elems, allow_nonfinite)
        else:
            parts = [
                _group_sums(
                    [],
                    names,
                    allow_pickle=allow_pickle,
                    per_layer=per_layer,
                    chunk_elems=chunk_elems,
                    ckpts=ckpts,
                    allow_nonfinite=allow_nonfinite,
                )
            ]
    finally:
        for c in ckpts:
            c.close()

    k = len(models)
    merged: dict[str, GramSums] = {}
    for part in parts:
        for key, s in part.items():
            merged[key] = merged[key].merge(s) if key in merged else s
    total = GramSums.zeros(k)
    for s in merged.values():
        total = total.merge(s)
    layers = {key: merged[key] for key in sorted(merged, key=_group_order)} if per_layer else {}
    return KinshipResult(
        base=str(base),
        sources=tuple(str(m) for m in models),
        labels=_labels([str(m) for m in models]),
        total=total,
        layers=layers,
        metrics=metrics,
    )


@functools.cache
def _remote_group_sums() -> Any:
    """The Ray task, made once per process (each ``ray.remote`` call re-exports the function)."""
    import ray

    return ray.remote(num_cpus=1)(_group_sums)


def _ray_sums(
    ckpts: Sequence[Checkpoint],
    layout: Layout,
    allow_pickle: bool,
    per_layer: bool,
    chunk_elems: int,
    allow_nonfinite: bool = False,
) -> list[dict[str, GramSums]]:
    """One Ray task per group of tensors; each returns its partial sums."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    groups = _split(layout.names, [s.numel for s in layout.slots], 2 * cpus)
    paths = [str(c.path) for c in ckpts]  # resolved local paths: no hub lookups in the tasks
    task = _remote_group_sums()
    refs = [
        task.remote(
            paths,
            g,
            allow_pickle=allow_pickle,
            per_layer=per_layer,
            chunk_elems=chunk_elems,
            allow_nonfinite=allow_nonfinite,
        )
        for g in groups
    ]
    return ray_get(refs)


# ---------------------------------------------------------------------------------------------
# plots


def heatmap(result: KinshipResult, metric: str | Sequence[str], path: str | Path) -> Path:
    """Write the N x N matrix of ``metric`` (or one panel per metric) as an annotated PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is switched in the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [metric] if isinstance(metric, str) else list(metric)
    k = len(result.labels)
    side = max(3.0, 0.8 * k + 1.5)
    fig = Figure(figsize=(1.25 * side * len(metrics), side), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        a = result.matrix(m)
        off = np.abs(a[~np.eye(k, dtype=bool)])
        top = float(np.nanmax(off)) if np.isfinite(off).any() else 0.0
        top = top if top > 0 else 1.0
        # Correlations on a symmetric scale around 0, distances from 0: off-diagonal values use
        # the whole colour range (the diagonal saturates), so small kinships stay visible.
        lo, hi, cmap = (0.0, top, "magma_r") if m == "euclidean" else (-top, top, "RdBu_r")
        im = ax.imshow(np.clip(a, lo, hi), cmap=cmap, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fmt = _value_format(m)
        for i in range(k):
            for j in range(k):
                v = a[i, j]
                shade = (min(max(v, lo), hi) - lo) / (hi - lo) if np.isfinite(v) else 0.5
                dark = shade > 0.6 if m == "euclidean" else abs(shade - 0.5) > 0.3
                ax.text(
                    j,
                    i,
                    fmt(a[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(k), result.labels, rotation=45, ha="right")
        ax.set_yticks(range(k), result.labels)
        ax.set_title(f"{m} kinship")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
