"""Kinship-guided top-k greedy merging on the worker pool.

Merges of a generation are computed by the workers into the object store, evaluated in parallel,
and logged with their lineage (parents) and the parents' kinship. The state (candidates and
their parents) replays deterministically, so a Tune checkpoint is a few KB.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from itertools import combinations
from typing import Any

import ray

from evoray.errors import ConfigError
from evoray.evolution.greedy import Candidate, GreedySettings, GreedyState
from evoray.execution.search_run import RunInputs, SearchRun, flat_scores


class GreedyRun(SearchRun):
    """One kinship-guided greedy merging run."""

    strategy = "kinship_greedy"

    def __init__(self, settings: GreedySettings, inputs: RunInputs, *args: Any, **kw: Any) -> None:
        if inputs.base is None:
            raise ConfigError("kinship_greedy needs the models' shared base (models.base)")
        super().__init__(settings, inputs, *args, **kw)

    def start(self, state: GreedyState | None = None) -> GreedyState:
        self.load_models()
        if state is not None:  # replay: every merged candidate from its parents, in order
            for c in state.candidates[len(self.inputs.members) :]:
                self.refs.append(self._merge(*c.parents))
            return state
        state = GreedyState(self.settings, [Candidate(i) for i in range(len(self.refs))])
        for c, res in zip(state.candidates, self.pool.evaluate_vectors(self.refs), strict=True):
            c.fitness = res["fitness"]
        state.top = state.rank()
        return state

    def _merge(self, a: int, b: int) -> ray.ObjectRef:
        method, per, glob, a_is_base = self.settings.recipe()
        if a_is_base:  # slerp from parent a towards parent b
            return self.pool.submit("merge_vector", method, per, glob, self.refs[a], self.refs[b])
        return self.pool.submit(
            "merge_vector", method, per, glob, self.base_ref, self.refs[a], self.refs[b]
        )

    def _kinship(self, pairs: list[tuple[int, int]]) -> list[float]:
        calls = [
            self.pool.submit("kinship", self.base_ref, self.refs[a], self.refs[b]) for a, b in pairs
        ]
        return [k["pearson"] for k in ray.get(calls)]

    def step(self, state: GreedyState) -> dict[str, Any]:
        s = self.settings
        t0 = time.perf_counter()
        new = [state.add(p) for p in state.pairs_to_merge()]
        if s.explore and state.generation > 0:
            in_top, fresh = state.exploration_candidates()
            taken = {frozenset(c.parents) for c in new}
            options = [i for i in (in_top or fresh) if frozenset((state.best, i)) not in taken]
            if options:
                kin = self._kinship([(state.best, i) for i in options])
                partner = options[min(range(len(options)), key=kin.__getitem__)]
                new.append(state.add((state.best, partner), explore=True))
        if not new:
            state.stopped = "nothing left to merge"
            state.generation += 1
            return self._metrics(state, 0, t0)
        for c in new:
            self.refs.append(self._merge(*c.parents))
        results = self.pool.evaluate_vectors([self.refs[c.id] for c in new])
        for c, k in zip(new, self._kinship([c.parents for c in new]), strict=True):
            c.parent_kinship = k
        for c, res in zip(new, results, strict=True):
            c.fitness = res["fitness"]
        old_top = state.top
        state.top = state.rank()
        state.generation += 1
        self._log(state, new, results)
        if set(state.top) == set(old_top):
            state.stopped = "top-k unchanged"
        elif s.kinship_threshold is not None:
            kin = self._kinship(list(combinations(state.top, 2)))
            if kin and sum(kin) / len(kin) > s.kinship_threshold:
                state.stopped = f"top-k mean kinship above {s.kinship_threshold}"
        if not state.done and state.generation >= s.max_generations:
            state.stopped = "max_generations"
        return self._metrics(state, len(new), t0)

    def _metrics(self, state: GreedyState, n: int, t0: float) -> dict[str, Any]:
        return {
            "generation": state.generation,
            "best_fitness": state.best_fitness,
            "evaluated": n,
            "evaluations": len(state.candidates),
            "generation_time_s": time.perf_counter() - t0,
        }

    def _log(self, state: GreedyState, new: list[Candidate], results: list[dict]) -> None:
        if self.run_log is None:
            return
        method = self.settings.operator
        for c, res in zip(new, results, strict=True):
            self.run_log.append(
                {
                    "run_id": self.run_id,
                    "strategy": self.strategy,
                    "generation": state.generation - 1,
                    "individual": c.id,
                    "parents": list(c.parents),
                    "operator": method + ("+explore" if c.explore else ""),
                    "seed": 0,
                    "scores": flat_scores(res["scores"]),
                    "fitness": res["fitness"],
                    "accepted": c.id in state.top,
                    "kinship_to_parent": c.parent_kinship,
                    "wall_time_s": res["eval_time_s"],
                    "eval_time_s": res["eval_time_s"],
                    "node": res["node"],
                    "device": res["device"],
                    "timestamp": datetime.now(timezone.utc),
                }
            )
        self.run_log.commit_generation(state.generation - 1)

    def final_ref(self, state: GreedyState) -> ray.ObjectRef:
        return self.refs[state.best]
