"""Kinship-guided top-k greedy merging (Hu et al. 2024), as pure decisions over candidates.

Generation 1 merges every pair of the initial models and keeps the top-k of everything
evaluated. Each later generation merges every not-yet-merged pair inside the top-k, plus one
exploration merge: the best model with the top-k model of lowest kinship to it (merging with a
distant relative escapes the local optimum that merging near-identical models ends in). When
that pair was merged already, the lowest-kinship model among all candidates not yet merged with
the best is taken instead. The search stops when the top-k set no longer changes, when the
top-k models' mean pairwise kinship exceeds a threshold (optional), or after max_generations.

Candidates are described by their parents, so the state replays (merges are deterministic).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

OPERATORS = ("slerp", "task_arithmetic", "ties")


@dataclass(frozen=True)
class GreedySettings:
    """Hyperparameters of one kinship-guided greedy run."""

    k: int = 3
    operator: str = "slerp"
    t: float = 0.5  # slerp
    weight: float = 0.5  # task_arithmetic / ties, per parent
    density: float = 0.5  # ties
    max_generations: int = 5
    kinship_threshold: float | None = None
    explore: bool = True
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"kinship_greedy.operator must be one of {OPERATORS}")
        if self.k < 2:
            raise ValueError(f"kinship_greedy.k must be >= 2, got {self.k}")
        if self.max_generations < 1:
            raise ValueError("kinship_greedy.max_generations must be >= 1")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"kinship_greedy.t must be in [0, 1], got {self.t}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"kinship_greedy.density must be in (0, 1], got {self.density}")
        if self.kinship_threshold is not None and not -1.0 <= self.kinship_threshold <= 1.0:
            raise ValueError(
                f"kinship_greedy.kinship_threshold must be in [-1, 1] (a Pearson correlation) "
                f"or null, got {self.kinship_threshold}"
            )

    def recipe(self) -> tuple[str, list[dict], dict, bool]:
        """(method, per-parent settings, global settings, parent_a_is_base) for one pair."""
        if self.operator == "slerp":
            return "slerp", [{}], {"t": self.t}, True
        per = {"weight": self.weight}
        if self.operator == "ties":
            per["density"] = self.density
        return self.operator, [dict(per), dict(per)], {}, False


@dataclass
class Candidate:
    id: int
    parents: tuple[int, ...] = ()
    generation: int = 0
    fitness: float | None = None
    parent_kinship: float | None = None
    explore: bool = False


@dataclass
class GreedyState:
    settings: GreedySettings
    candidates: list[Candidate] = field(default_factory=list)
    generation: int = 0
    top: list[int] = field(default_factory=list)
    stopped: str | None = None

    @property
    def done(self) -> bool:
        return self.stopped is not None

    @property
    def best(self) -> int:
        return self.top[0]

    @property
    def best_fitness(self) -> float:
        return self.candidates[self.best].fitness if self.top else float("-inf")

    def merged_pairs(self) -> set[frozenset[int]]:
        return {frozenset(c.parents) for c in self.candidates if c.parents}

    def rank(self) -> list[int]:
        """Top-k ids by fitness (ties broken by lower id, so replays agree)."""
        scored = [c for c in self.candidates if c.fitness is not None]
        scored.sort(key=lambda c: (-c.fitness, c.id))
        return [c.id for c in scored[: self.settings.k]]

    def pairs_to_merge(self) -> list[tuple[int, int]]:
        """Exploitation pairs for the next generation (exploration is chosen separately)."""
        done = self.merged_pairs()
        pool = (
            [c.id for c in self.candidates if not c.parents] if self.generation == 0 else self.top
        )
        return [(a, b) for a, b in combinations(sorted(pool), 2) if frozenset((a, b)) not in done]

    def exploration_candidates(self) -> tuple[list[int], list[int]]:
        """(top-k others, all other candidates) not yet merged with the best, in rank order."""
        best = self.best
        done = self.merged_pairs()
        fresh = [
            c.id
            for c in self.candidates
            if c.id != best and frozenset((best, c.id)) not in done and c.fitness is not None
        ]
        in_top = [i for i in self.top if i in fresh]
        return in_top, fresh

    def add(self, parents: tuple[int, ...], explore: bool = False) -> Candidate:
        c = Candidate(len(self.candidates), parents, self.generation + 1, explore=explore)
        self.candidates.append(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "candidates": [asdict(c) for c in self.candidates],
            "generation": self.generation,
            "top": self.top,
            "stopped": self.stopped,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GreedyState:
        return cls(
            settings=GreedySettings(**d["settings"]),
            candidates=[
                Candidate(**{**c, "parents": tuple(c["parents"])}) for c in d["candidates"]
            ],
            generation=d["generation"],
            top=list(d["top"]),
            stopped=d["stopped"],
        )
