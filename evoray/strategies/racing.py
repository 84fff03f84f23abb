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
dev set would accept. Below 1.0 the bound is Hoeffding's with Serfling's finite-population
factor (sampling without replacement), over all tasks' examples at once, with the error
probability split over the rounds (union bound), and never above the certain bound. The
probabilistic bound assumes the dev examples are in random order (slices are prefixes).
"""

from __future__ import annotations

import math
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
    first: float = 0.25

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


def rejects(tasks: Sequence[TaskSeen], must_beat: float, confidence: float, rounds: int) -> bool:
    """Whether racing stops here: the bound says the candidate cannot beat ``must_beat``."""
    return upper_bound(tasks, confidence, rounds) < must_beat - EPS
