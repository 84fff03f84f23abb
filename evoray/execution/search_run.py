"""What every search strategy's run shares: inputs, worker pool, run log, loading, test scores.

Each strategy (``EvolverRun``, ``GreedyRun``, ``RecipeRun``) adds ``start(state)``,
``step(state) -> metrics`` and ``final_ref(state)``; the Tune trainable drives them alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray

from evoray.execution.pool import WorkerPool
from evoray.execution.worker import TaskSpec


@dataclass(frozen=True)
class RunInputs:
    """The models of a run: the initial population, optionally their shared base."""

    members: tuple[str, ...]
    base: str | None = None
    tasks: TaskSpec = field(default_factory=TaskSpec)
    member_tasks: tuple[str, ...] | None = None  # each member's own task, for Fisher/RegMean
    stats_examples: int = 256
    cache_dir: str | None = None
    allow_pickle: bool = False  # the CLI's --allow-pickle: members may be .bin/.pt checkpoints


class SearchRun:
    """Base of the strategies' runs (see the module docstring)."""

    strategy = "search"

    def __init__(
        self,
        settings: Any,
        inputs: RunInputs,
        pool: WorkerPool,
        *,
        run_log: Any | None = None,
        run_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.inputs = inputs
        self.pool = pool
        self.layout = pool.spec.layout
        self.run_log = run_log
        self.run_id = run_id or self.strategy
        self.refs: list[ray.ObjectRef] = []
        self.base_ref: ray.ObjectRef | None = None

    def load_models(self) -> None:
        """Flat vectors of the base and the members, read by the workers into the store."""
        base = self.inputs.base
        pickle = self.inputs.allow_pickle
        self.base_ref = self.pool.submit("load", base, pickle) if base is not None else None
        self.refs = [self.pool.submit("load", p, pickle) for p in self.inputs.members]

    def test_scores(self, ref: ray.ObjectRef) -> dict[str, dict[str, dict[str, float]]]:
        """In-domain test and OOD test scores of one vector (for the final report only)."""
        (test,) = self.pool.evaluate_vectors([ref], split="test")
        out = {"test": test["scores"]}
        if self.inputs.tasks.n_ood:
            (ood,) = self.pool.evaluate_vectors([ref], split="ood-test")
            out["ood"] = ood["scores"]
        return out


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}, the run log's score keys."""
    return {f"{task}/{metric}": v for task, m in scores.items() for metric, v in m.items()}
