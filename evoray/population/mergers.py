"""Merging a population of flat weight vectors: simple averaging, Fisher merging, RegMean.

Evolver (Du et al., ACL 2024 Findings) evolves a population of models and scores an offspring
by the merge of the population with the offspring in its parent's place. All three mergers
here are linear in each individual: ``merge(pop) = sum_i A_i theta_i`` with ``A_i`` fixed by
the per-model statistics (``evoray.population.statistics``), which stay those of the original models
during the search. So replacing individual ``i`` by ``u`` moves the merge by
``A_i (u - theta_i)``, which ``apply_delta`` adds in place without re-merging the population.
The ``A_i`` are precomputed once and stored as numpy arrays, so the merger object is shared
zero-copy by the workers of a node through Ray's object store (torch tensors would be copied
into every worker): an elementwise vector per individual for Fisher merging (float16 when the
models are stored in 16 bits: coefficients lie in [0, 1] and float16 rounds them far below a
bf16 weight's own rounding; float32 otherwise), an ``in x in`` float32 matrix per individual
and linear weight for RegMean.

Everything is applied range by range (``ranges``: runs of whole tensors of about ``chunk``
elements), so a worker moves only one range of coefficients to its device at a time and its
scratch stays of the order of the largest tensor.

Vectors are 1-D torch tensors over one ``Layout`` (e.g. ``FlatWeights.as_tensor()``), in any
floating dtype and on any device; merges are float32.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor

from evoray.errors import ConfigError
from evoray.weights.flat import from_numpy
from evoray.weights.layout import Layout, Slot

log = logging.getLogger(__name__)

MERGER_KINDS = ("average", "fisher", "regmean")
# Key suffix of a Gram for a weight stored (in, out), as GPT-2's ``Conv1D`` (``y = x W + b``):
# RegMean multiplies it from the left instead of the right.
TRANSPOSED_GRAM = ":in_rows"
#: Elements per range when the caller names none: cache-sized float32 temporaries on a CPU
#: (``evoray.strategies.de.default_chunk``; GPU callers pass theirs).
CHUNK = 1 << 18


@runtime_checkable
class Merger(Protocol):
    """A merge that is linear in each individual, with a cheap update for one replacement."""

    name: str

    def merge(self, population: Sequence[Tensor]) -> Tensor:
        """The merged flat vector (float32) of ``population``."""
        ...

    def apply_delta(self, merged: Tensor, i: int, diff: Tensor) -> None:
        """``merged += A_i @ diff`` in place, where ``diff = u - theta_i`` (flat)."""
        ...

    def ranges(self, chunk: int) -> list[tuple[int, int]]:
        """Element ranges ``add_range`` accepts: whole tensors, about ``chunk`` at a time."""
        ...

    def add_range(self, out: Tensor, i: int, t: Tensor, start: int, stop: int) -> None:
        """``out += (A_i t)[start:stop]`` where ``out`` and ``t`` hold elements
        ``[start, stop)`` (float32, one device) and the range is one of ``ranges``."""
        ...


class _LinearMerger:
    """Shared validation for mergers over ``n`` individuals of one layout."""

    name = ""

    def __init__(self, layout: Layout, n: int) -> None:
        if n < 1:
            raise ConfigError(f"{self.name} merging needs at least one model, got {n}")
        self.layout = layout
        self.n = n

    def _check_vector(self, t: Tensor, what: str) -> None:
        if not isinstance(t, Tensor) or t.dim() != 1 or t.numel() != self.layout.numel:
            shape = list(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ConfigError(
                f"{what} has shape {shape}; {self.name} merging over the layout of "
                f"{self.layout.source or 'these models'} needs a flat vector of "
                f"{self.layout.numel} elements"
            )
        if not t.is_floating_point():
            raise ConfigError(f"{what} is {t.dtype}; weight vectors must be floating point")

    def _check_population(self, population: Sequence[Tensor]) -> torch.device:
        if len(population) != self.n:
            raise ConfigError(
                f"{self.name} merger was built for {self.n} models but got a population of "
                f"{len(population)}"
            )
        for i, t in enumerate(population):
            self._check_vector(t, f"individual {i}")
        return population[0].device

    def _check_delta(self, merged: Tensor, i: int, diff: Tensor) -> None:
        if not 0 <= i < self.n:
            raise ConfigError(f"individual {i} is out of range for a population of {self.n}")
        self._check_vector(merged, "the merged vector")
        if merged.dtype != torch.float32 or not merged.is_contiguous():
            raise ConfigError(
                f"the merged vector is {merged.dtype}; apply_delta updates the contiguous "
                "float32 vector that merge() returned"
            )
        self._check_vector(diff, "the difference u - theta_i")

    def ranges(self, chunk: int = CHUNK) -> list[tuple[int, int]]:
        n = self.layout.numel  # elementwise mergers: any cut will do (RegMean overrides)
        return [(s, min(n, s + chunk)) for s in range(0, n, chunk)]

    def add_range(self, out: Tensor, i: int, t: Tensor, start: int, stop: int) -> None:
        raise NotImplementedError

    def merge(self, population: Sequence[Tensor]) -> Tensor:
        device = self._check_population(population)
        out = torch.zeros(self.layout.numel, dtype=torch.float32, device=device)
        for start, stop in self.ranges():
            for i, t in enumerate(population):
                self.add_range(out[start:stop], i, t[start:stop].float(), start, stop)
        return out

    def apply_delta(self, merged: Tensor, i: int, diff: Tensor) -> None:
        self._check_delta(merged, i, diff)
        for start, stop in self.ranges():
            self.add_range(merged[start:stop], i, diff[start:stop].float(), start, stop)


def tensor_ranges(layout: Layout, chunk: int, whole: set[str]) -> list[tuple[int, int]]:
    """The layout cut into runs of at most ``chunk`` elements, except that a tensor named in
    ``whole`` is never cut: one larger than ``chunk`` is a run of its own. Other tensors are
    cut anywhere."""
    out: list[tuple[int, int]] = []
    for s in layout.slots:
        lo, hi = s.offset, s.offset + s.numel
        if s.name not in whole:
            while lo < hi:  # elementwise here: fill the open run, then chunk-sized runs
                if out and out[-1][1] == lo and out[-1][1] - out[-1][0] < chunk:
                    step = min(hi, out[-1][0] + chunk)
                    out[-1] = (out[-1][0], step)
                else:
                    step = min(hi, lo + chunk)
                    out.append((lo, step))
                lo = step
        elif out and out[-1][1] == lo and hi - out[-1][0] <= chunk:
            out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


class AverageMerger(_LinearMerger):
    """Simple averaging: ``A_i = 1/N``."""

    name = "average"

    def add_range(self, out: Tensor, i: int, t: Tensor, start: int, stop: int) -> None:
        out.add_(t, alpha=1.0 / self.n)

    def to(self, device: torch.device | str) -> AverageMerger:
        return self


def _stat(stats: Mapping[str, Tensor], slot: Slot, i: int, what: str) -> Tensor:
    t = stats.get(slot.name)
    if t is None:
        raise ConfigError(
            f"{what} of model {i} has no entry for tensor {slot.name!r}; compute the "
            "statistics on the same architecture as the layout"
        )
    return t


#: Elements per step of the Fisher coefficients' float64 arithmetic (``N`` rows of this many
#: float64 values, twice, whatever the tensor's size).
STAT_CHUNK = 1 << 18


def _fisher_column(stats: Mapping[str, Tensor], slot: Slot, i: int) -> np.ndarray:
    """Model ``i``'s Fisher for ``slot``, flat on the host and checked (shape, sign, finite)."""
    t = _stat(stats, slot, i, "the Fisher")
    if tuple(t.shape) != slot.shape:
        raise ConfigError(
            f"the Fisher of model {i} for tensor {slot.name!r} has shape "
            f"{list(t.shape)} but the layout has {list(slot.shape)}"
        )
    t = t.detach().to("cpu").reshape(-1)
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16; float32 holds it exactly
        t = t.float()
    a = t.numpy()
    # Checked in the tensor's own dtype: widening to float64 keeps signs and finiteness.
    if not bool(np.isfinite(a).all()) or bool((a < 0).any()):
        raise ConfigError(
            f"the Fisher of model {i} for tensor {slot.name!r} has negative or "
            "non-finite entries; recompute it"
        )
    return a


def _fisher_coefficients(cols: list[np.ndarray], smoothing: float, out: np.ndarray) -> None:
    """``out[i] = (F_i + eps) / sum_j (F_j + eps)`` (``1/N`` where the sum is 0) for one tensor,
    in float64 on ``STAT_CHUNK`` elements at a time, the sum taken in model order."""
    n = len(cols)
    for lo in range(0, out.shape[1], STAT_CHUNK):
        hi = min(out.shape[1], lo + STAT_CHUNK)
        w = np.empty((n, hi - lo), dtype=np.float64)
        for i, a in enumerate(cols):
            w[i] = a[lo:hi]
        w += smoothing
        total = w[0].copy()
        for i in range(1, n):
            total += w[i]
        seen = total > 0
        np.divide(w, total, out=w, where=seen)
        w[:, ~seen] = 1.0 / n
        out[:, lo:hi] = w


class FisherMerger(_LinearMerger):
    """Fisher merging: ``theta* = sum_i (F_i + eps) theta_i / sum_j (F_j + eps)`` elementwise.

    ``smoothing`` (``eps``) keeps parameters that no model's Fisher sees (all zeros) at their
    plain average instead of 0/0.

    Built tensor by tensor: each model's Fisher is read once per tensor (``fishers[i].get(name)``),
    so lazy mappings (``execution.population.StoredStatistics``: one object ref per tensor)
    keep only one tensor of every model alive, and the float64 arithmetic runs on
    ``STAT_CHUNK`` elements at a time: the build holds the coefficients plus
    ``O(N x largest tensor)``, never every model's whole Fisher.
    """

    name = "fisher"

    def __init__(
        self,
        layout: Layout,
        fishers: Sequence[Mapping[str, Tensor]],
        *,
        smoothing: float = 1e-10,
    ) -> None:
        super().__init__(layout, len(fishers))
        if not smoothing >= 0:
            raise ConfigError(f"Fisher smoothing must be >= 0, got {smoothing}")
        self.smoothing = smoothing
        half = layout.storage_dtype.itemsize <= 2
        self.coef = np.empty((self.n, layout.numel), dtype=np.float16 if half else np.float32)
        for slot in layout.slots:
            # One tensor of every model at a time: the list dies with the call.
            _fisher_coefficients(
                [_fisher_column(f, slot, i) for i, f in enumerate(fishers)],
                smoothing,
                self.coef[:, slot.offset : slot.offset + slot.numel],
            )

    def add_range(self, out: Tensor, i: int, t: Tensor, start: int, stop: int) -> None:
        c = from_numpy(self.coef[i, start:stop]).to(out.device).to(torch.float32)
        out.addcmul_(c, t)

    def to(self, device: torch.device | str) -> FisherMerger:
        return self  # coefficients move range by range


class RegMeanMerger(_LinearMerger):
    """RegMean: per linear weight ``W* = (sum_i W_i G~_i)(sum_i G~_i)^-1``, the rest averaged.

    ``G~_i = alpha G_i + (1 - alpha) diag(G_i)``: Evolver/RegMean shrink the off-diagonal of
    the Grams (``alpha=0`` weights each input column by its input norm, ``alpha=1`` is plain
    RegMean). So ``A_i = G~_i S^-1`` with ``S = sum_j G~_j``, applied as ``W @ A_i``.

    ``ridge`` adds ``ridge * mean(diag S) / N`` to every ``G~_i``'s diagonal so that ``S`` is
    invertible when an input dimension is never active (that column is then averaged); adding
    it to each ``G~_i`` rather than only to ``S`` keeps the merge of identical or single models
    exact. A tensor whose Grams are all zero, or whose ``S`` still cannot be factorised, is
    averaged with a warning.
    """

    name = "regmean"

    def __init__(
        self,
        layout: Layout,
        grams: Sequence[Mapping[str, Tensor]],
        *,
        alpha: float = 0.1,
        ridge: float = 1e-6,
    ) -> None:
        super().__init__(layout, len(grams))
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"RegMean alpha must be in [0, 1], got {alpha}")
        if not ridge >= 0:
            raise ConfigError(f"RegMean ridge must be >= 0, got {ridge}")
        self.alpha = alpha
        self.ridge = ridge
        self.linear: list[tuple[Slot, np.ndarray]] = []  # (slot, A of shape (N, in, in))
        # Weights stored (in, out) (GPT-2's Conv1D; Grams keyed name + TRANSPOSED_GRAM).
        self.transposed: list[tuple[Slot, np.ndarray]] = []
        averaged: list[Slot] = []
        names = set(layout.names) | {n + TRANSPOSED_GRAM for n in layout.names}
        unknown = {k for g in grams for k in g if k not in names}
        for slot in layout.slots:
            key, side = slot.name, self.linear
            if not any(key in g for g in grams) and any(key + TRANSPOSED_GRAM in g for g in grams):
                key, side = key + TRANSPOSED_GRAM, self.transposed
            have = [key in g for g in grams]
            if not any(have):
                averaged.append(slot)
                continue
            if not all(have):
                raise ConfigError(
                    f"the Gram for tensor {slot.name!r} is missing for model {have.index(False)} "
                    "but present for others; compute every model's Grams the same way"
                )
            coef = self._coefficients(
                slot, [g[key] for g in grams], in_dim=0 if side is self.transposed else 1
            )
            if coef is None:
                averaged.append(slot)
            else:
                side.append((slot, coef))
        if not any(k in names for g in grams for k in g):
            example = f" (e.g. {sorted(unknown)[0]!r})" if unknown else ""
            raise ConfigError(
                f"no Gram names a tensor of the layout{example}; the statistics belong to "
                "another architecture or naming"
            )
        if unknown:
            log.info("RegMean ignores Grams of %d tensors not in the layout", len(unknown))
        self._avg_runs = _runs(averaged)
        self._coef_at = {s.offset: (a, False) for s, a in self.linear} | {
            s.offset: (a, True) for s, a in self.transposed
        }

    def _coefficients(self, slot: Slot, grams: list[Tensor], in_dim: int = 1) -> np.ndarray | None:
        if len(slot.shape) != 2:
            raise ConfigError(
                f"tensor {slot.name!r} has shape {list(slot.shape)}; RegMean Grams belong to "
                "2-D linear weights only"
            )
        d = slot.shape[in_dim]
        for i, g in enumerate(grams):
            if tuple(g.shape) != (d, d):
                raise ConfigError(
                    f"the Gram of model {i} for tensor {slot.name!r} has shape {list(g.shape)}; "
                    f"its weight {list(slot.shape)} needs ({d}, {d}), the input width squared"
                )
            if not bool(torch.isfinite(g).all()):
                raise ConfigError(
                    f"the Gram of model {i} for tensor {slot.name!r} has non-finite entries"
                )
        g = torch.stack([t.detach().to("cpu", torch.float64) for t in grams])
        g = (g + g.transpose(1, 2)) / 2
        diag = torch.diagonal(g, dim1=1, dim2=2)
        gt = g * self.alpha
        torch.diagonal(gt, dim1=1, dim2=2).copy_(diag)
        scale = float(diag.sum(0).mean())
        if scale <= 0:
            log.warning("RegMean: all Grams of %r are zero; averaging that tensor", slot.name)
            return None
        torch.diagonal(gt, dim1=1, dim2=2).add_(self.ridge * scale / self.n)
        chol, info = torch.linalg.cholesky_ex(gt.sum(0))
        if int(info) != 0:
            log.warning(
                "RegMean: the Gram sum of %r is not positive definite (raise ridge); averaging "
                "that tensor",
                slot.name,
            )
            return None
        a = torch.cholesky_solve(gt, chol).transpose(1, 2)  # (S^-1 G~_i)^T = G~_i S^-1
        if not bool(torch.isfinite(a).all()):
            log.warning("RegMean: solving for %r gave non-finite values; averaging it", slot.name)
            return None
        return a.to(torch.float32).contiguous().numpy()

    def ranges(self, chunk: int = CHUNK) -> list[tuple[int, int]]:
        whole = {s.name for s, _ in self.linear} | {s.name for s, _ in self.transposed}
        return tensor_ranges(self.layout, chunk, whole)

    def add_range(self, out: Tensor, i: int, t: Tensor, start: int, stop: int) -> None:
        """``out += A_i t`` on whole tensors: a scaled copy on averaged ones, one matmul per
        linear weight (its ``A_i`` moved to the device for that matmul only)."""
        for lo, hi in self._avg_runs:
            lo, hi = max(lo, start), min(hi, stop)
            if lo < hi:
                out[lo - start : hi - start].add_(t[lo - start : hi - start], alpha=1.0 / self.n)
        for slot in self.layout.slots:
            if not start <= slot.offset < stop or slot.offset not in self._coef_at:
                continue
            if slot.offset + slot.numel > stop:
                raise ValueError(f"range [{start}, {stop}) cuts tensor {slot.name}")
            a, transposed = self._coef_at[slot.offset]
            ai = from_numpy(a[i]).to(out.device)
            sl = slice(slot.offset - start, slot.offset - start + slot.numel)
            w = t[sl].view(slot.shape)
            if transposed:  # W stored (in, out): A_i^T W = S^-1 G~_i W
                out[sl].view(slot.shape).addmm_(ai.T, w)
            else:
                out[sl].view(slot.shape).addmm_(w, ai)

    def to(self, device: torch.device | str) -> RegMeanMerger:
        return self  # coefficients move tensor by tensor


def _runs(slots: list[Slot]) -> list[tuple[int, int]]:
    """Contiguous element ranges covered by ``slots`` (adjacent slots fused)."""
    runs: list[tuple[int, int]] = []
    for s in sorted(slots, key=lambda s: s.offset):
        if runs and runs[-1][1] == s.offset:
            runs[-1] = (runs[-1][0], s.offset + s.numel)
        else:
            runs.append((s.offset, s.offset + s.numel))
    return runs


_PARAMS = {"average": set(), "fisher": {"smoothing"}, "regmean": {"alpha", "ridge"}}


def make_merger(
    kind: str,
    layout: Layout,
    n: int,
    *,
    fishers: Sequence[Mapping[str, Tensor]] | None = None,
    grams: Sequence[Mapping[str, Tensor]] | None = None,
    **params: Any,
) -> Merger:
    """Build the merger ``kind`` for ``n`` models; ``params`` are that merger's options."""
    if kind not in MERGER_KINDS:
        raise ConfigError(f"merger {kind!r} is unknown; use one of {list(MERGER_KINDS)}")
    extra = set(params) - _PARAMS[kind]
    if extra:
        raise ConfigError(
            f"merger {kind!r} has no parameter {sorted(extra)[0]!r}; it takes "
            f"{sorted(_PARAMS[kind]) or 'none'}"
        )
    if kind == "average":
        return AverageMerger(layout, n)
    stats, what = (fishers, "fishers") if kind == "fisher" else (grams, "grams")
    if stats is None:
        raise ConfigError(f"merger {kind!r} needs per-model statistics: pass {what}=[...]")
    if len(stats) != n:
        raise ConfigError(f"merger {kind!r} got {what} for {len(stats)} models but n={n}")
    if kind == "fisher":
        return FisherMerger(layout, stats, **params)
    return RegMeanMerger(layout, stats, **params)
