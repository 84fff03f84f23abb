"""Task-vector sparsification with mergekit's semantics (``mergekit/sparsify.py``).

Three methods, named as in mergekit's ``SparsificationMethod``:

* ``magnitude`` (TIES): keep the ``int(density * numel)`` largest ``|delta|`` of the whole tensor.
* ``random`` (DARE): keep each element with probability ``density`` (Bernoulli mask).
* ``magnitude_outliers`` (Model Breadcrumbs): drop the ``int(gamma * numel)`` largest and then
  enough of the smallest ``|delta|`` that ``int(density * numel)`` elements remain.

Shared rules, as in mergekit: ``density >= 1`` returns the input unchanged (no rescale, no random
draws); ``rescale`` multiplies the kept elements by ``L1(delta) / L1(kept)`` (mergekit's
``RescaleNorm.l1``; both norms must be >= 1e-7, else no rescale). Older mergekit releases divided
DARE's kept elements by ``density`` instead: in expectation the same, but not bit-identical.

Deliberate differences from mergekit (documented once here, referred to elsewhere):

* Masks are never materialised for the whole tensor. A *plan* is built once per task vector
  (thresholds from a selection, never a full sort) and then applied chunk by chunk, in order, so
  the merge can stream the flattened tensor through the cache. Everything is float32.
* Ties in magnitude are broken as a *stable* sort would: the element with the lower flat index
  comes first (is kept by ``magnitude``; is dropped first at the low end and kept first at the
  high end by ``magnitude_outliers``). mergekit uses an unstable ``argsort``/``sort``, so the
  choice among exactly equal magnitudes is unspecified there; with distinct magnitudes the masks
  are identical.
* ``magnitude`` with ``int(density * numel) == 0`` returns zeros (mergekit asserts).
* ``magnitude_outliers`` with ``int(gamma * numel) == 0`` removes no large values; mergekit's
  ``indices[n_bot:-0]`` slice is empty there and silently zeroes the whole task vector (e.g. every
  tensor of fewer than 100 elements at the default gamma 0.01).
* ``random`` draws its mask from a dedicated ``torch.Generator`` seeded with the caller's seed
  (keep iff ``u < density`` with ``u ~ U[0, 1)`` from ``torch.rand``, the rule
  ``torch.bernoulli`` uses), never from the global RNG as mergekit does. The stream is drawn on
  the CPU and consumed element by element, so the mask depends on neither the chunk size nor
  the device: a GPU worker's merge keeps exactly the elements ``evoray merge`` keeps on a CPU.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "RESCALE_EPS",
    "DeltaSource",
    "OrderStat",
    "Plan",
    "SparsificationMethod",
    "Sparsifier",
    "bernoulli",
    "kth_smallest_abs",
    "magnitude",
    "magnitude_outliers",
    "order_stats",
    "sparsify",
]

RESCALE_EPS = 1e-7
"""mergekit's ``rescaled_masked_tensor`` tolerance: smaller L1 norms disable rescaling."""


class SparsificationMethod(str, enum.Enum):
    magnitude = "magnitude"
    random = "random"
    magnitude_outliers = "magnitude_outliers"


def chunk_elems(device: torch.device) -> int:
    """Elements per streamed chunk: a few hundred KiB per operand keeps the working set of an
    elementwise pass in L2 on CPUs; accelerators prefer few, large launches."""
    if device.type == "cpu":
        return max(1 << 17, (1 << 15) * torch.get_num_threads())
    return 1 << 26


@dataclass(frozen=True)
class OrderStat:
    """The ``rank``-th smallest magnitude (1-based) and how many magnitudes are below / equal."""

    value: float
    n_less: int
    n_equal: int


_DIRECT_SELECT = 1 << 18  # below this many elements, select on a full copy
_SAMPLE = 1 << 16


def order_stats(src: DeltaSource, ranks: Sequence[int]) -> list[OrderStat]:
    """Exact order statistics of ``|delta|`` for several ranks, in one streaming pass.

    mergekit sorts the whole tensor (``argsort``); a full ``torch.kthvalue`` is ~7x faster but
    still a quickselect over a copy. We bracket each rank with quantiles of a fixed random sample,
    then stream the tensor once, counting the magnitudes below each bracket and collecting the
    few inside it, and select on those. If a bracket misses (vanishingly rare, the bracket is ~6
    sigma wide) we fall back to a full selection, so the result is always exact.
    """
    n = src.numel
    if n <= _DIRECT_SELECT:
        return _order_stats_full(src, ranks)
    gen = torch.Generator(device=src.device).manual_seed(0)
    idx = torch.randint(n, (_SAMPLE,), generator=gen, device=src.device)
    sample = torch.sort(src.gather(idx).abs_()).values
    m = sample.numel()
    bounds = []
    for r in ranks:
        q = r / n
        spread = 6.0 * (q * (1.0 - q) / m) ** 0.5 + 8.0 / m
        lo_q, hi_q = q - spread, q + spread
        lo = float(sample[int(lo_q * (m - 1))]) if lo_q > 0.0 else float("-inf")
        hi = float(sample[min(m - 1, int(hi_q * (m - 1)) + 1)]) if hi_q < 1.0 else float("inf")
        bounds.append((lo, hi))
    below = [0] * len(ranks)
    equal = [0] * len(ranks)  # only for degenerate brackets (lo == hi)
    inside: list[list[Tensor]] = [[] for _ in ranks]
    for d in src.chunks():
        a = d.abs_()
        for j, (lo, hi) in enumerate(bounds):
            below[j] += int(torch.count_nonzero(a < lo))
            if lo == hi:
                equal[j] += int(torch.count_nonzero(a == lo))
            else:
                inside[j].append(a[(a >= lo) & (a <= hi)])
    res: list[OrderStat | None] = []
    for j, r in enumerate(ranks):
        lo, hi = bounds[j]
        if lo == hi:
            hit = below[j] < r <= below[j] + equal[j]
            res.append(OrderStat(lo, below[j], equal[j]) if hit else None)
            continue
        ins = torch.cat(inside[j]) if inside[j] else torch.empty(0, device=src.device)
        inside[j] = []
        if not below[j] < r <= below[j] + ins.numel():
            res.append(None)
            continue
        v = float(torch.kthvalue(ins, r - below[j]).values)
        n_less = below[j] + int(torch.count_nonzero(ins < v))
        res.append(OrderStat(v, n_less, int(torch.count_nonzero(ins == v))))
    missed = [r for r, st in zip(ranks, res, strict=True) if st is None]
    if missed:
        full = dict(zip(missed, _order_stats_full(src, missed), strict=True))
        res = [full[r] if st is None else st for r, st in zip(ranks, res, strict=True)]
    return res  # type: ignore[return-value]


def _order_stats_full(src: DeltaSource, ranks: Sequence[int]) -> list[OrderStat]:
    a = src.abs_full()
    out = []
    for r in ranks:
        v = float(torch.kthvalue(a, r).values)
        out.append(OrderStat(v, int(torch.count_nonzero(a < v)), int(torch.count_nonzero(a == v))))
    return out


def kth_smallest_abs(values: Tensor, k: int) -> float:
    """The ``k``-th smallest (1-based) of ``|values|``, exactly (see :func:`order_stats`)."""
    flat = values.reshape(-1)
    return order_stats(DeltaSource(flat, None, chunk_elems(flat.device)), [k])[0].value


class Plan:
    """Masks consecutive chunks of one flattened task vector in place (base class: keep all)."""

    factor: float = 1.0
    """Rescale multiplier for the kept elements (1.0 when ``rescale`` is off or not applicable)."""

    identity: bool = True
    """True when ``mask_`` keeps everything, so callers may skip it."""

    def begin(self) -> None:
        """Rewind the sequential state before a pass over the chunks."""

    def mask_(self, chunk: Tensor) -> None:
        """Zero the dropped elements of the next chunk (chunks must come in order, each once)."""


class _Zero(Plan):
    identity = False

    def mask_(self, chunk: Tensor) -> None:
        chunk.zero_()


def _below(x: float) -> float:
    """The largest float32 below ``x``."""
    return float(torch.nextafter(torch.tensor(x), torch.tensor(float("-inf"))))


@dataclass
class _TieGroup:
    """Elements with ``|delta| == value`` straddling a window edge: those with flat index in
    ``[start, stop)`` are kept, the others dropped (index order = stable-sort order)."""

    value: float
    start: int
    stop: int


class _RankWindow(Plan):
    """Keep the elements whose position in a stable sort of ``|delta|`` lies in a window.

    The window is ``a_min <= |x| <= a_max`` (either bound optional); each bound is inclusive or
    strict per flat-index segment, as the tie group at that bound dictates, so a chunk is masked
    by one or two fused ``hardshrink`` calls per segment (no per-element ordinals).
    """

    identity = False

    def __init__(self, a_min: float | None, a_max: float | None, groups: list[_TieGroup]):
        self.a_min, self.a_max, self.groups = a_min, a_max, groups
        self.cuts = sorted({c for g in groups for c in (g.start, g.stop)})
        self._pos = 0
        self._min_below = None if a_min is None else _below(a_min)
        self._max_below = None if a_max is None else _below(a_max)

    def begin(self) -> None:
        self._pos = 0

    def _inclusive(self, value: float | None, pos: int) -> bool:
        for g in self.groups:
            if g.value == value:
                return g.start <= pos < g.stop
        return True

    def mask_(self, chunk: Tensor) -> None:
        s, e = self._pos, self._pos + chunk.numel()
        self._pos = e
        edges = [s, *(c for c in self.cuts if s < c < e), e]
        for p, q in itertools.pairwise(edges):
            seg = chunk[p - s : q - s]
            if self.a_min is not None:  # hardshrink zeroes |x| <= lambd
                lo_incl = self._inclusive(self.a_min, p)
                torch.hardshrink(seg, self._min_below if lo_incl else self.a_min, out=seg)
            if self.a_max is not None:  # x - hardshrink(x, lambd) zeroes |x| > lambd
                hi_incl = self._inclusive(self.a_max, p)
                seg.sub_(torch.hardshrink(seg, self.a_max if hi_incl else self._max_below))


def _tie_cuts(src: DeltaSource, wanted: dict[float, list[int]]) -> dict[tuple[float, int], int]:
    """Flat index of the ``ordinal``-th (0-based) element with ``|delta| == value``, for each
    value and ordinal in ``wanted``; one streaming pass that stops when all are found."""
    found: dict[tuple[float, int], int] = {}
    todo = sum(len(v) for v in wanted.values())
    seen = dict.fromkeys(wanted, 0)
    pos = 0
    for d in src.chunks():
        a = d.abs_()
        for v, ordinals in wanted.items():
            eq = a == v
            cnt = int(torch.count_nonzero(eq))
            for o in ordinals:
                if seen[v] <= o < seen[v] + cnt:
                    idx = torch.nonzero(eq).view(-1)[o - seen[v]]
                    found[v, o] = pos + int(idx)
            seen[v] += cnt
        pos += a.numel()
        if len(found) == todo:
            break
    return found


def _rank_window(src: DeltaSource, lo: int, hi: int, descending: bool) -> Plan:
    """Plan keeping positions ``[lo, hi)`` of the stable sort of the flat magnitudes.

    ``descending`` sorts by decreasing magnitude (ties still by increasing index), as
    mergekit's ``argsort(descending=True)[:k]`` for ``magnitude``.
    """
    n = src.numel
    lo, hi = max(lo, 0), min(hi, n)
    if lo >= hi:
        return _Zero()
    if lo == 0 and hi == n:
        return Plan()
    # Sorted position (0-based) -> ascending rank (1-based) of the magnitude there.
    positions = [p for p, needed in ((lo, lo > 0), (hi - 1, hi < n)) if needed]
    ranks = [n - p if descending else p + 1 for p in positions]
    stats = dict(zip(positions, order_stats(src, ranks), strict=True))
    first = stats[lo].value if lo > 0 else None
    last = stats[hi - 1].value if hi < n else None
    a_min, a_max = (last, first) if descending else (first, last)
    # Tie groups that the window cuts: keep ordinals [g_lo, g_hi) of the group (index order).
    partial: dict[float, tuple[int, int, int]] = {}
    for st in stats.values():
        # Elements sorted before the group: smaller (ascending) or larger (descending) ones.
        before = n - st.n_less - st.n_equal if descending else st.n_less
        g_lo, g_hi = max(lo - before, 0), min(hi - before, st.n_equal)
        if g_lo > 0 or g_hi < st.n_equal:
            partial[st.value] = (g_lo, g_hi, st.n_equal)
    wanted = {
        v: [o for o, needed in ((g_lo, g_lo > 0), (g_hi, g_hi < eq)) if needed]
        for v, (g_lo, g_hi, eq) in partial.items()
    }
    cuts = _tie_cuts(src, wanted) if partial else {}
    groups = [
        _TieGroup(
            v,
            cuts[v, g_lo] if g_lo > 0 else 0,
            cuts[v, g_hi] if g_hi < eq else n,
        )
        for v, (g_lo, g_hi, eq) in partial.items()
    ]
    return _RankWindow(a_min, a_max, groups)


def _l1_factor(before: float, after: float) -> float:
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after


class _Bernoulli(Plan):
    """DARE's random mask: keep iff ``u < density``, ``u`` drawn in chunk order from a CPU
    generator re-seeded by ``begin`` (so the rescale pass and the merge pass see one mask, and
    every device the same one: CUDA's generator would give another stream for the seed)."""

    identity = False

    def __init__(self, density: float, seed: int, device: torch.device, chunk: int) -> None:
        self.density = density
        self.seed = seed
        self.device = torch.device(device)
        self.generator = torch.Generator()
        self._u = torch.empty(chunk, dtype=torch.float32)
        self.begin()

    def begin(self) -> None:
        self.generator.manual_seed(self.seed)

    def keep(self, numel: int) -> Tensor:
        keep = self._u[:numel].uniform_(generator=self.generator) < self.density
        return keep if self.device.type == "cpu" else keep.to(self.device)

    def mask_(self, chunk: Tensor) -> None:
        chunk.mul_(self.keep(chunk.numel()))


class DeltaSource:
    """The float32 task vector ``tensor - base`` of one model, flattened, computed on demand.

    ``chunks()`` streams it through one reusable chunk buffer (valid until the next chunk), so
    no full-size temporary is needed; ``base=None`` means the tensor is the task vector itself.
    """

    def __init__(self, tensor: Tensor, base: Tensor | None, chunk: int) -> None:
        self.tensor = tensor
        self.base = base
        self.chunk = chunk
        self.numel = tensor.numel()
        self.device = tensor.device

    def _delta_into(self, out: Tensor, s: int, e: int) -> Tensor:
        if self.base is None:
            return out.copy_(self.tensor[s:e])
        if torch.float32 in (self.tensor.dtype, self.base.dtype):  # promotes: computed in fp32
            return torch.sub(self.tensor[s:e], self.base[s:e], out=out)
        # Both half precision: a bf16 - bf16 subtraction would round in bf16.
        return out.copy_(self.tensor[s:e]).sub_(self.base[s:e])

    def chunks(self) -> Iterator[Tensor]:
        buf = torch.empty(min(self.chunk, self.numel), dtype=torch.float32, device=self.device)
        for s in range(0, self.numel, self.chunk):
            e = min(s + self.chunk, self.numel)
            yield self._delta_into(buf[: e - s], s, e)

    def gather(self, idx: Tensor) -> Tensor:
        out = self.tensor[idx].float()
        if self.base is not None:
            out.sub_(self.base[idx])
        return out

    def abs_full(self) -> Tensor:
        out = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        for s in range(0, self.numel, self.chunk):
            e = min(s + self.chunk, self.numel)
            self._delta_into(out[s:e], s, e).abs_()
        return out


@dataclass(frozen=True)
class Sparsifier:
    """How to sparsify one model's task vector; ``plan`` turns it into a chunk masker."""

    method: SparsificationMethod
    density: float
    rescale: bool = False
    gamma: float = 0.0
    seed: int = 0

    def plan(self, src: DeltaSource) -> Plan:
        """Build the chunk masker, with one streaming pass when a global statistic is needed
        (thresholds; L1 norms for ``rescale``)."""
        if self.density >= 1:
            return Plan()
        n = src.numel
        if self.method is SparsificationMethod.random:
            rnd = _Bernoulli(self.density, self.seed, src.device, min(src.chunk, n))
            if self.rescale:
                before = after = 0.0
                for d in src.chunks():
                    d.abs_()
                    before += float(d.sum())
                    after += float(d.mul_(rnd.keep(d.numel())).sum())
                rnd.begin()
                rnd.factor = _l1_factor(before, after)
            return rnd
        plan: Plan
        if self.method is SparsificationMethod.magnitude:
            plan = _rank_window(src, 0, int(self.density * n), descending=True)
        elif self.method is SparsificationMethod.magnitude_outliers:
            target = int(self.density * n)
            n_top = int(self.gamma * n)
            n_bot = n - target - n_top
            if n_bot < 0:  # as mergekit: remove fewer large values to reach the density
                n_top += n_bot
                n_bot = 0
            plan = _rank_window(src, n_bot, n - n_top, descending=False)
        else:  # pragma: no cover - enum is closed
            raise NotImplementedError(self.method)
        if self.rescale and isinstance(plan, _RankWindow):
            before = after = 0.0
            for d in src.chunks():
                before += float(d.abs().sum())
                plan.mask_(d)
                after += float(d.abs_().sum())
            plan.begin()
            plan.factor = _l1_factor(before, after)
        return plan


def _apply(tensor: Tensor, sp: Sparsifier) -> Tensor:
    """Sparsify a whole tensor (treated as the task vector itself); float32 result."""
    flat = tensor.reshape(-1)
    chunk = chunk_elems(flat.device)
    plan = sp.plan(DeltaSource(flat, None, chunk))
    out = torch.empty(flat.numel(), dtype=torch.float32, device=flat.device)
    plan.begin()
    for s in range(0, flat.numel(), chunk):
        c = out[s : s + chunk]
        c.copy_(flat[s : s + chunk])
        plan.mask_(c)
        if plan.factor != 1.0:
            c.mul_(plan.factor)
    return out.view(tensor.shape)


def magnitude(tensor: Tensor, density: float, *, rescale: bool = False) -> Tensor:
    """Keep the ``int(density * numel)`` largest magnitudes (mergekit ``magnitude``)."""
    return _apply(tensor, Sparsifier(SparsificationMethod.magnitude, density, rescale))


def bernoulli(tensor: Tensor, density: float, *, seed: int, rescale: bool = False) -> Tensor:
    """Keep each element with probability ``density`` (mergekit ``bernoulli``), seeded."""
    return _apply(tensor, Sparsifier(SparsificationMethod.random, density, rescale, seed=seed))


def magnitude_outliers(
    tensor: Tensor, density: float, *, gamma: float = 0.01, rescale: bool = False
) -> Tensor:
    """Drop the ``gamma`` largest, then the smallest magnitudes down to ``density``
    (mergekit ``magnitude_outliers``)."""
    return _apply(
        tensor, Sparsifier(SparsificationMethod.magnitude_outliers, density, rescale, gamma=gamma)
    )


def sparsify(
    tensor: Tensor,
    density: float,
    method: SparsificationMethod | str,
    *,
    gamma: float = 0.0,
    seed: int = 0,
    rescale: bool = False,
) -> Tensor:
    """mergekit's ``sparsify`` dispatcher (float32 result; ``seed`` used by ``random`` only)."""
    return _apply(
        tensor, Sparsifier(SparsificationMethod(method), density, rescale, gamma=gamma, seed=seed)
    )
