"""Evolver's selection rules and search state, free of Ray and of weights.

Evolver (Du et al., ACL 2024 Findings) treats fine-tuned models as a population and evolves them
with differential evolution. Two modes:
- individual selection: offspring ``u_i`` replaces its parent ``theta_i`` if it scores strictly
  better on the dev data;
- with a merger (average, Fisher, RegMean): ``u_i`` replaces ``theta_i`` only if the merged model
  with ``u_i`` in place of ``theta_i`` scores better than the current merged model.

Generations are synchronous: every trial of a generation is built from the population as it
was at the start of the generation, so trials run in parallel and the result does not depend on
the number of workers. The reference code accepts merger-mode trials one at a time; with
parallel trials several may improve the merge on their own, so we accept them all when their
combined merge is at least as good as the best single one (evaluated), else only the best one.

The state holds fitness values and the accepted recipes of every generation: that is the whole
population (a genome), replayable from the initial models, so checkpoints stay tiny.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evoray.evolution.de import MUTATIONS, Recipe, sample_recipes

MERGERS = ("none", "average", "fisher", "regmean")


@dataclass(frozen=True)
class EvolverSettings:
    """Hyperparameters of one Evolver run (defaults from the paper / reference code)."""

    generations: int = 15
    F: float = 0.5
    CR: float = 0.5
    mutation: str = "evolver"
    merger: str = "none"
    regmean_alpha: float = 0.1
    fisher_smoothing: float = 1e-10
    seed: int = 0
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.mutation not in MUTATIONS:
            raise ValueError(f"evolver.mutation must be one of {MUTATIONS}, got {self.mutation!r}")
        if self.merger not in MERGERS:
            raise ValueError(f"evolver.merger must be one of {MERGERS}, got {self.merger!r}")
        if not 0.0 < self.CR <= 1.0:
            raise ValueError(f"evolver.CR must be in (0, 1], got {self.CR}")
        if not 0.0 < self.F <= 2.0:
            raise ValueError(f"evolver.F must be in (0, 2], got {self.F}")
        if self.generations < 0:
            raise ValueError(f"evolver.generations must be >= 0, got {self.generations}")
        if not 0.0 <= self.regmean_alpha <= 1.0:
            raise ValueError(f"evolver.regmean_alpha must be in [0, 1], got {self.regmean_alpha}")
        if self.fisher_smoothing < 0:
            raise ValueError(f"evolver.fisher_smoothing must be >= 0, got {self.fisher_smoothing}")

    @property
    def merger_mode(self) -> bool:
        return self.merger != "none"


@dataclass(frozen=True)
class Trial:
    """The dev result of one offspring (or of the merge that contains it)."""

    recipe: Recipe
    fitness: float
    scores: dict[str, float] = field(default_factory=dict)


@dataclass
class EvolverState:
    """Everything needed to resume: fitness values and the accepted recipes per generation."""

    settings: EvolverSettings
    pop_size: int
    generation: int = 0  # generations completed
    fitness: list[float] = field(default_factory=list)  # per individual (individual mode)
    merged_fitness: float | None = None  # merger mode
    accepted: list[list[dict]] = field(default_factory=list)  # per generation, Recipe dicts

    def recipes(self) -> list[Recipe]:
        s = self.settings
        return sample_recipes(
            self.pop_size,
            F=s.F,
            CR=s.CR,
            mutation=s.mutation,
            seed=s.seed,
            generation=self.generation,
        )

    @property
    def best_fitness(self) -> float:
        if self.settings.merger_mode:
            return float("-inf") if self.merged_fitness is None else self.merged_fitness
        return max(self.fitness) if self.fitness else float("-inf")

    @property
    def best_individual(self) -> int:
        return max(range(len(self.fitness)), key=self.fitness.__getitem__)

    @property
    def done(self) -> bool:
        return self.generation >= self.settings.generations

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": vars(self.settings).copy(),
            "pop_size": self.pop_size,
            "generation": self.generation,
            "fitness": list(self.fitness),
            "merged_fitness": self.merged_fitness,
            "accepted": self.accepted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> EvolverState:
        return cls(
            settings=EvolverSettings(**d["settings"]),
            pop_size=d["pop_size"],
            generation=d["generation"],
            fitness=list(d["fitness"]),
            merged_fitness=d["merged_fitness"],
            accepted=[list(g) for g in d["accepted"]],
        )


def select_individuals(fitness: Sequence[float], trials: Sequence[Trial]) -> list[Trial]:
    """Individual mode: trials strictly better than their own parent."""
    return [t for t in trials if t.fitness > fitness[t.recipe.target]]


def improving_merges(merged_fitness: float, trials: Sequence[Trial]) -> list[Trial]:
    """Merger mode: trials whose merge beats the current merged model, best first."""
    better = [t for t in trials if t.fitness > merged_fitness]
    return sorted(better, key=lambda t: (-t.fitness, t.recipe.target))


def choose_merged(improving: Sequence[Trial], combined_fitness: float | None) -> list[Trial]:
    """Accept all improving trials if their combined merge is at least as good as the best one."""
    if not improving:
        return []
    if len(improving) == 1 or combined_fitness is None:
        return list(improving[:1])
    return list(improving) if combined_fitness >= improving[0].fitness else list(improving[:1])
