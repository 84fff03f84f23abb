"""One search run of any registered strategy on a worker pool: start, step, log, answer.

The strategy decides (ask/tell, no Ray); ``RayPopulation`` answers its batches on the workers;
this class ties them together and writes one log row per scored build. Used by the Tune
trainable (one trial per run, one Tune iteration per generation) and directly by tests.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import ray

from evoray.execution.pool import WorkerPool
from evoray.execution.population import RayPopulation, RunInputs
from evoray.strategies.base import Score, Strategy, drive, flat_scores


class SearchRun:
    """Drives ``strategy`` on ``pool``; ``run_log`` (optional) receives the rows."""

    def __init__(
        self,
        strategy: Strategy,
        inputs: RunInputs,
        pool: WorkerPool,
        *,
        run_log: Any | None = None,
        run_id: str | None = None,
    ) -> None:
        self.strategy = strategy
        self.inputs = inputs
        self.pool = pool
        self.population = RayPopulation(inputs, pool)
        self.layout = pool.spec.layout
        self.run_log = run_log
        self.run_id = run_id or strategy.name

    @property
    def refs(self) -> list[ray.ObjectRef]:
        return self.population.refs

    @property
    def merged_ref(self) -> ray.ObjectRef | None:
        return self.population.merged_ref

    @property
    def merger_ref(self) -> ray.ObjectRef | None:
        return self.population.merger_ref

    def start(self, state: dict[str, Any] | None = None) -> bool:
        """Load the population, replay ``state`` (a checkpoint) or score the initial models.
        Returns whether the run was resumed."""
        pop = self.population
        pop.load()
        merger = self.strategy.merger()
        if merger is not None:
            pop.make_merger(*merger)
        if state is not None:
            self.strategy.set_state(state)
        for batch in self.strategy.replay():
            pop.execute(batch)
        if state is None:
            drive(self.strategy.setup(), pop.execute)
        return state is not None

    def step(self) -> dict[str, Any]:
        """One generation; returns its Tune metrics."""
        report = drive(self.strategy.generation(), self.population.execute)
        if self.run_log is not None and report.rows:
            generation = self.strategy.generations_done - 1
            for row, score in report.rows:
                self.run_log.append(self._row(row, score))
            self.run_log.commit_generation(generation)
        return report.metrics

    def _row(self, row: Any, score: Score) -> dict[str, Any]:
        kin = row.kinship_to_parent
        return {
            "run_id": self.run_id,
            "strategy": self.strategy.name,
            "individual": row.individual,
            "parents": row.parents,
            "operator": row.operator,
            "settings": row.settings,
            "seed": row.seed,
            "scores": flat_scores(score.scores),
            "fitness": score.fitness,
            "accepted": row.accepted,
            "kinship_to_parent": score.kinship_to_parent if kin is None else kin,
            "wall_time_s": score.build_time_s + score.eval_time_s,
            "eval_time_s": score.eval_time_s,
            "node": score.node,
            "device": score.device,
            "timestamp": datetime.now(timezone.utc),
            "dev_examples": score.examples,
            "racing_stopped": score.racing_stopped if score.examples is not None else None,
        }

    def final_ref(self) -> ray.ObjectRef:
        """The run's answer as a population vector."""
        return self.population.materialize(self.strategy.answer())

    def test_scores(self, ref: ray.ObjectRef) -> dict[str, dict[str, dict[str, float]]]:
        return self.population.test_scores(ref)
