"""Racing: score an offspring on growing slices of the dev set and stop once it cannot win.

Pure math, free of Ray and torch. A candidate must beat a known value (its parent's dev
fitness, or the current merged fitness). After each round an upper confidence bound of its
full-dev fitness is computed from the examples seen; below the value to beat, it is rejected
without scoring the rest (in the spirit of racing algorithms and Mergenetic's / MERGE^3's cheap
fitness estimators).

The fitness is a weighted mean of per-task metrics that are means of per-example scores in
[0, 1] (accuracy, exact match). With ``m`` of a task's ``n`` examples seen, the task's full-dev
mean lies between the worst and best completions of the unseen ``n - m`` (all 0, all 1): that
is the certain bound, used at ``confidence: 1.0``, so racing then never rejects what the full
dev set would accept. Below 1.0 the error probability ``1 - confidence`` is split over the
rounds (union bound) and each round tests "the full-dev fitness is at least ``must_beat``":

- When every seen row weighs the same in the estimate (equal task weights over equal slice
  sizes, e.g. tasks of one dev size; or one task) and the scores are 0/1, the exact binomial
  test: the seen rows' count of 1s is a sum of independent hypergeometric counts, each a sum of
  independent Bernoulli trials (the hypergeometric law is Poisson-binomial: Vatutin & Mikhailov
  1982), with mean ``m * fitness``; by Hoeffding's 1956 theorem (Theorem 4) its lower tail is at
  most the binomial's ``B(c; m, must_beat)`` for ``c <= m * must_beat - 1``. Reject when that
  tail is at most the round's error probability. Much tighter than a Hoeffding bound on the
  small slices racing decides on (measured on the LM zoo: ``benchmarks/evaluation_budget.py``).
- Otherwise Hoeffding's bound with Serfling's finite-population factor (sampling without
  replacement), over all tasks' examples at once, never above the certain bound.

Both tests need each slice to be a random sample of its task's dev rows: slices are
prefixes of ``race_order``, a seeded shuffle of each task's rows (dev files sorted by label or
source would otherwise break it), the same for every offspring and worker.

A survivor is not scored again on the rows its slices saw: the per-task sums are kept and only
the remaining rows are scored, so its scores are the full-dev ones (exactly, for 0/1 per-example
scores: ``slice_sum`` makes each slice's sum a whole count) for the cost of one full-dev pass.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

#: Metrics that are means of per-example scores in [0, 1]: the ones racing can bound.
BOUNDED_MEAN_METRICS = ("accuracy", "exact_match")

#: Slack against float rounding: reject only when the bound is below the target by more.
EPS = 1e-9


@dataclass(frozen=True)
class Race:
    """What a worker needs to race one build: the value to beat and the racing settings."""

    must_beat: float
    confidence: float = 0.95
    first: float = 0.125

    def to_dict(self) -> dict[str, float]:
        return {"must_beat": self.must_beat, "confidence": self.confidence, "first": self.first}


@dataclass(frozen=True)
class TaskSeen:
    """One task so far: ``seen`` of its ``n`` dev examples scored, with mean score ``mean``."""

    seen: int
    mean: float
    n: int
    weight: float = 1.0


def round_fractions(first: float) -> list[float]:
    """Fractions of the dev set scored before each racing decision: ``first``, then doubling,
    while below 1 (a survivor is then scored on the full dev set)."""
    if not 0.0 < first <= 1.0:
        raise ValueError(f"first must be in (0, 1], got {first}")
    out, f = [], first
    while f < 1.0:
        out.append(f)
        f *= 2
    return out


def race_order(task: str, n: int) -> list[int]:
    """The order racing scores a task's ``n`` dev rows in: a shuffle seeded by the task's name
    and size only (``random.Random`` seeded by a string is stable across processes), so every
    offspring on every worker sees the same slices and decisions are reproducible."""
    order = list(range(n))
    random.Random(f"evoray-racing/{task}/{n}").shuffle(order)
    return order


def slice_sum(mean: float, count: int) -> float:
    """The sum of a slice's per-example scores from its ``mean`` over ``count`` rows. Accuracy
    and exact match are 0/1 per example, so the sum is a whole number: rounding it removes the
    float error of ``mean * count``, which makes a survivor's combined mean (total / n) equal the
    full-dev mean bit for bit. Other means are kept as they are."""
    total = mean * count
    whole = round(total)
    return float(whole) if abs(total - whole) < 1e-6 else total


def round_stops(n: int, fractions: Sequence[float]) -> list[int]:
    """Per round, how many of a task's ``n`` examples are seen (at least one, increasing,
    below ``n``; rounds that would see no new example are dropped)."""
    out: list[int] = []
    for f in fractions:
        stop = min(n - 1, max(1, math.ceil(f * n)))
        if stop > (out[-1] if out else 0):
            out.append(stop)
    return out


def estimate(tasks: Sequence[TaskSeen]) -> float:
    """The partial fitness: the weighted mean of each task's mean over its seen examples."""
    w = sum(t.weight for t in tasks)
    return sum(t.weight * t.mean for t in tasks) / w


def certain_upper(tasks: Sequence[TaskSeen]) -> float:
    """The full-dev fitness if every unseen example scored 1 (the maximum)."""
    w = sum(t.weight for t in tasks)
    return sum(t.weight * (t.seen * t.mean + (t.n - t.seen)) / t.n for t in tasks) / w


def upper_bound(tasks: Sequence[TaskSeen], confidence: float, rounds: int = 1) -> float:
    """An upper bound of the full-dev fitness holding with probability ``confidence`` over all
    ``rounds`` decisions; ``confidence == 1`` gives the certain (worst-case) bound."""
    if not 0.0 < confidence <= 1.0:
        raise ValueError(f"confidence must be in (0, 1], got {confidence}")
    certain = certain_upper(tasks)
    if confidence >= 1.0 or any(t.seen == 0 for t in tasks):
        return certain
    delta = (1.0 - confidence) / max(1, rounds)
    w = sum(t.weight for t in tasks)
    # Each seen example of task t moves the estimate by at most (w_t / W) / m_t; Serfling's
    # factor (1 - (m_t - 1) / n_t) shrinks the variance proxy as the sample nears the whole.
    var = sum(
        (t.weight / w) ** 2 * (1.0 - (t.seen - 1) / t.n) / t.seen for t in tasks if t.seen > 0
    )
    hoeffding = estimate(tasks) + math.sqrt(var * math.log(1.0 / delta) / 2.0)
    return min(certain, hoeffding)


def pooled_count(tasks: Sequence[TaskSeen]) -> tuple[int, int] | None:
    """``(count of 1s, rows)`` of all tasks' seen rows as one sample, when every seen row
    weighs the same in the estimate (``weight / seen`` equal over tasks) and each task's seen
    scores sum to a whole count (0/1 scores); else None (then the binomial test does not apply)."""
    if not tasks or any(t.seen <= 0 for t in tasks):
        return None
    scales = [t.weight / t.seen for t in tasks]
    if max(scales) - min(scales) > 1e-12 * max(scales):
        return None
    count = 0
    for t in tasks:
        total = t.mean * t.seen
        if abs(total - round(total)) > 1e-6:
            return None
        count += round(total)
    return count, sum(t.seen for t in tasks)


def binomial_cdf(c: int, m: int, p: float) -> float:
    """``P(Binomial(m, p) <= c)``, summed in log space (``m`` up to millions of rows)."""
    if c < 0:
        return 0.0
    if c >= m:
        return 1.0
    lp, lq = math.log(p), math.log1p(-p)
    logs = [
        math.lgamma(m + 1) - math.lgamma(k + 1) - math.lgamma(m - k + 1) + k * lp + (m - k) * lq
        for k in range(c + 1)
    ]
    top = max(logs)
    return min(1.0, math.exp(top) * sum(math.exp(x - top) for x in logs))


def binomial_rejects(count: int, rows: int, must_beat: float, delta: float) -> bool:
    """The exact test (module docstring): ``count`` 1s in ``rows`` seen rows are too few for a
    full-dev fitness of ``must_beat`` or more, at error probability ``delta``."""
    if not 0.0 < must_beat < 1.0 or count > rows * must_beat - 1:
        return False  # outside the range where Hoeffding's binomial domination holds
    return binomial_cdf(count, rows, must_beat) <= delta


def rejects(tasks: Sequence[TaskSeen], must_beat: float, confidence: float, rounds: int) -> bool:
    """Whether racing stops here: the candidate cannot beat ``must_beat`` (certainly, or at
    ``confidence`` over ``rounds`` decisions: the binomial test where it applies, else the
    Hoeffding-Serfling bound; which one depends on the slice sizes and weights, not on the
    scores, so the error probability stays ``1 - confidence``)."""
    if certain_upper(tasks) < must_beat - EPS:
        return True
    if confidence >= 1.0:
        return False
    pooled = pooled_count(tasks)
    if pooled is not None:
        return binomial_rejects(*pooled, must_beat, (1.0 - confidence) / max(1, rounds))
    return upper_bound(tasks, confidence, rounds) < must_beat - EPS
