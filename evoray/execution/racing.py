"""A worker's racing scorer: the dev set in growing per-task slices, stopped by the bound of
``evoray.strategies.racing`` once the candidate cannot beat its target."""

from __future__ import annotations

from typing import Any

from evoray.strategies.racing import Race, TaskSeen, estimate, rejects, round_fractions, round_stops


def race_scores(worker: Any, race: Race) -> dict[str, Any]:
    """Score ``worker``'s model on its dev data by rounds. Every task gets the same fraction
    of its examples per round, so the multi-task fitness is estimated from all tasks. Rejected:
    the partial scores (each task's fitness metric on its seen rows), their weighted mean as
    fitness, ``racing_stopped`` True. Survivors are scored on the full dev set as without
    racing; ``examples`` counts every row scored, the rounds' included."""
    tasks, dev = worker.spec.tasks, worker.dev
    names = list(dev)
    fractions = round_fractions(race.first)
    stops = {t: round_stops(len(dev[t]), fractions) for t in names}
    rounds = max((len(v) for v in stops.values()), default=0)
    seen = dict.fromkeys(names, 0)
    sums = dict.fromkeys(names, 0.0)
    for k in range(rounds):
        for t in names:
            if not stops[t]:
                continue
            stop = stops[t][min(k, len(stops[t]) - 1)]
            if stop <= seen[t]:
                continue
            part = {t: dev[t].subset(seen[t], stop)}
            value = tasks.evaluate(worker.model, part, batch_size=worker.spec.batch_size)
            sums[t] += float(value[t][tasks.metric(t)]) * (stop - seen[t])
            seen[t] = stop
        state = [
            TaskSeen(seen[t], sums[t] / seen[t] if seen[t] else 0.0, len(dev[t]), tasks.weight(t))
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
    out = worker.full_scores()
    return {**out, "examples": out["examples"] + sum(seen.values())}
