"""A worker's racing scorer: the dev set in growing per-task slices, stopped by the bound of
``evoray.strategies.racing`` once the candidate cannot beat its target."""

from __future__ import annotations

from typing import Any

from evoray.strategies.racing import (
    Race,
    TaskSeen,
    estimate,
    race_order,
    rejects,
    round_fractions,
    round_stops,
    slice_sum,
)


def _rows(data: Any, order: list[int], start: int, stop: int) -> Any:
    """Rows ``order[start:stop]`` of a task's dev data. A data kind without ``take`` is cut by
    ``subset`` (its own order: slices are then prefixes, random only if the rows are)."""
    take = getattr(data, "take", None)
    return take(order[start:stop]) if take is not None else data.subset(start, stop)


def race_scores(worker: Any, race: Race) -> dict[str, Any]:
    """Score ``worker``'s model on its dev data by rounds, in ``race_order``. Every task gets
    the same fraction of its examples per round, so the multi-task fitness is estimated from
    all tasks. Rejected: the partial scores (each task's fitness metric on its seen rows), their
    weighted mean as fitness, ``racing_stopped`` True. A survivor has only its unseen rows
    scored; the per-task sums combine into the full-dev fitness metric of each task (the only
    metric its scores carry), so its fitness is the full-dev one and ``examples`` the dev size."""
    tasks, dev = worker.spec.tasks, worker.dev
    names = list(dev)
    n = {t: len(dev[t]) for t in names}
    order = {t: race_order(t, n[t]) for t in names}
    stops = {t: round_stops(n[t], round_fractions(race.first)) for t in names}
    rounds = max((len(v) for v in stops.values()), default=0)
    seen = dict.fromkeys(names, 0)
    sums = dict.fromkeys(names, 0.0)

    def score(t: str, stop: int) -> None:
        part = {t: _rows(dev[t], order[t], seen[t], stop)}
        value = tasks.evaluate(worker.model, part, batch_size=worker.spec.batch_size)
        sums[t] += slice_sum(float(value[t][tasks.metric(t)]), stop - seen[t])
        seen[t] = stop

    for k in range(rounds):
        for t in names:
            if stops[t] and stops[t][min(k, len(stops[t]) - 1)] > seen[t]:
                score(t, stops[t][min(k, len(stops[t]) - 1)])
        state = [
            TaskSeen(seen[t], sums[t] / seen[t] if seen[t] else 0.0, n[t], tasks.weight(t))
            for t in names
        ]
        if rejects(state, race.must_beat, race.confidence, rounds):
            partial = zip(names, state, strict=True)
            return {
                "scores": {t: {tasks.metric(t): s.mean} for t, s in partial if s.seen},
                "fitness": estimate(state),
                "examples": sum(seen.values()),
                "racing_stopped": True,
            }
    for t in names:
        if seen[t] < n[t]:
            score(t, n[t])
    scores = {t: {tasks.metric(t): sums[t] / n[t]} for t in names}
    return {
        "scores": scores,
        "fitness": tasks.fitness(scores),
        "examples": sum(seen.values()),
        "racing_stopped": False,
    }
