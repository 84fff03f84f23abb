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

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from evoray.strategies.base import (
    Batch,
    Build,
    Generation,
    Keep,
    LogRow,
    Member,
    MergeAll,
    Merged,
    MergedWith,
    Offspring,
    Plan,
    Problem,
    Strategy,
    flat_scores,
    fmt_num,
)
from evoray.strategies.de import MUTATIONS, Recipe, sample_recipes
from evoray.strategies.racing import Race

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
    # Racing (evoray.strategies.racing): off by default.
    racing: bool = False
    racing_confidence: float = 0.95
    racing_first: float = 0.125
    # Offspring bred per individual per generation (the best one competes with its parent):
    # more than one keeps more workers busy than there are members.
    offspring_per_member: int = 1

    def __post_init__(self) -> None:
        if not 0.0 < self.racing_confidence <= 1.0:
            raise ValueError(
                f"evolver.racing_confidence must be in (0, 1], got {self.racing_confidence}"
            )
        if not 0.0 < self.racing_first <= 1.0:
            raise ValueError(f"evolver.racing_first must be in (0, 1], got {self.racing_first}")
        if self.offspring_per_member < 1:
            raise ValueError(
                f"evolver.offspring_per_member must be >= 1, got {self.offspring_per_member}"
            )
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
            per_individual=s.offspring_per_member,
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


def best_per_target(trials: Sequence[Trial]) -> list[Trial]:
    """Each individual's best trial (the first on ties), in target order: with several
    offspring per individual only one can replace it."""
    best: dict[int, Trial] = {}
    for t in trials:
        held = best.get(t.recipe.target)
        if held is None or t.fitness > held.fitness:
            best[t.recipe.target] = t
    return [best[k] for k in sorted(best)]


def select_individuals(fitness: Sequence[float], trials: Sequence[Trial]) -> list[Trial]:
    """Individual mode: each individual's best trial, when strictly better than its parent."""
    return [t for t in best_per_target(trials) if t.fitness > fitness[t.recipe.target]]


def improving_merges(merged_fitness: float, trials: Sequence[Trial]) -> list[Trial]:
    """Merger mode: trials whose merge beats the current merged model, best first, at most
    one per individual (two offspring of one individual cannot both take its place)."""
    better = [t for t in best_per_target(trials) if t.fitness > merged_fitness]
    return sorted(better, key=lambda t: (-t.fitness, t.recipe.target))


def choose_merged(improving: Sequence[Trial], combined_fitness: float | None) -> list[Trial]:
    """Accept all improving trials if their combined merge is at least as good as the best one."""
    if not improving:
        return []
    if len(improving) == 1 or combined_fitness is None:
        return list(improving[:1])
    return list(improving) if combined_fitness >= improving[0].fitness else list(improving[:1])


# -- the strategy -------------------------------------------------------------------------------


class Evolver(Strategy):
    """Evolver as an ask/tell strategy: DE offspring scored alone or inside the merge."""

    name = "evolver"
    settings_cls = EvolverSettings
    state_cls = EvolverState
    generations_key = "generations"
    searchable = ("F", "CR", "regmean_alpha")
    title = "Evolver"

    def __init__(self, settings: EvolverSettings, problem: Problem) -> None:
        super().__init__(settings, problem)
        self.state = EvolverState(settings=settings, pop_size=problem.n_members)

    # -- set-up and resume ---------------------------------------------------------------------

    def setup(self) -> Plan:
        s = self.settings
        if s.merger_mode:
            answers = yield Batch(evaluate=(Merged(),))
            self.state.merged_fitness = answers.scores[0].fitness
        answers = yield Batch(evaluate=tuple(Member(i) for i in range(self.state.pop_size)))
        self.state.fitness = [a.fitness for a in answers.scores]

    def merger(self) -> tuple[str, dict[str, Any]] | None:
        s = self.settings
        options = {
            "none": None,
            "average": {},
            "fisher": {"smoothing": s.fisher_smoothing},
            "regmean": {"alpha": s.regmean_alpha},
        }[s.merger]
        return None if options is None else (s.merger, options)

    def replay(self) -> list[Batch]:
        """The merged model, then each generation's accepted offspring, exactly as they ran."""
        out = [Batch(keep=(Keep(MergeAll(), None),))] if self.settings.merger_mode else []
        for accepted in self.state.accepted:
            out.append(Batch(keep=self._keeps([Recipe.from_dict(r) for r in accepted])))
        return out

    def _keeps(self, recipes: Sequence[Recipe]) -> tuple[Keep, ...]:
        """Synchronous update: the merged model and every accepted offspring, all built from
        the population as it was at the start of the generation."""
        if not recipes:
            return ()
        merged = (Keep(MergedWith(tuple(recipes)), None),) if self.settings.merger_mode else ()
        return merged + tuple(Keep(Offspring(r), r.target) for r in recipes)

    # -- one generation ------------------------------------------------------------------------

    def generation(self) -> Plan:
        s, state = self.settings, self.state
        t0 = time.perf_counter()
        recipes = state.recipes()
        builds = tuple(
            MergedWith((r,), self._race(state.merged_fitness))
            if s.merger_mode
            else Offspring(r, self._race(state.fitness[r.target]), state.fitness[r.target])
            for r in recipes
        )
        answers = yield Batch(evaluate=builds)
        results = answers.scores
        trials = [
            Trial(r, res.fitness, flat_scores(res.scores))
            for r, res in zip(recipes, results, strict=True)
        ]
        if s.merger_mode:
            improving = improving_merges(state.merged_fitness, trials)
            combined = None
            if len(improving) > 1:
                both = yield Batch(evaluate=(MergedWith(tuple(t.recipe for t in improving)),))
                combined = both.scores[0].fitness
            chosen = choose_merged(improving, combined)
            if chosen:
                state.merged_fitness = combined if len(chosen) > 1 else chosen[0].fitness
        else:
            chosen = select_individuals(state.fitness, trials)
            for t in chosen:
                state.fitness[t.recipe.target] = t.fitness
        if chosen:
            yield Batch(keep=self._keeps([t.recipe for t in chosen]))
        accepted = {t.recipe for t in chosen}
        state.accepted.append([t.recipe.to_dict() for t in chosen])
        state.generation += 1
        rows = [(self._row(r, r in accepted), res) for r, res in zip(recipes, results, strict=True)]
        return Generation(
            metrics={
                "generation": state.generation,
                "best_fitness": state.best_fitness,
                "mean_fitness": sum(state.fitness) / len(state.fitness) if state.fitness else None,
                "accepted": len(chosen),
                "evaluated": len(recipes),
                "generation_time_s": time.perf_counter() - t0,
            },
            rows=rows,
        )

    def _race(self, must_beat: float | None) -> Race | None:
        """What a trial must beat to be accepted, when racing is on (None: score it fully)."""
        s = self.settings
        if not s.racing or must_beat is None:
            return None
        return Race(float(must_beat), s.racing_confidence, s.racing_first)

    def _row(self, r: Recipe, accepted: bool) -> LogRow:
        settings: dict[str, Any] = {"mutation": r.mutation, "F": r.F, "CR": r.CR}
        if self.settings.merger_mode:
            settings["merger"] = self.settings.merger
        return LogRow(
            individual=r.target,
            parents=[r.target, *r.refs],
            operator=f"{r.mutation}+binomial",
            seed=r.seed,
            accepted=accepted,
            settings=settings,
        )

    # -- results and state ---------------------------------------------------------------------

    def answer(self) -> Build:
        """The merged model (merger mode) or the best individual."""
        return Merged() if self.settings.merger_mode else Member(self.state.best_individual)

    def initial(self) -> tuple[dict[str, Any], dict[str, Build]]:
        out = {"fitness": self.state.fitness, "merged_fitness": self.state.merged_fitness}
        return out, ({"merged_scores": Merged()} if self.settings.merger_mode else {})

    @property
    def evaluations(self) -> int:
        n, k = self.state.pop_size, self.settings.offspring_per_member
        return n + n * k * self.state.generation + (1 if self.settings.merger_mode else 0)

    # -- how reports show it -------------------------------------------------------------------

    @classmethod
    def label(cls, settings: dict[str, Any]) -> str:
        merger = settings.get("merger")
        mode = "?" if merger is None else "individual" if merger == "none" else f"+{merger}"
        f, cr = fmt_num(settings.get("F", "?")), fmt_num(settings.get("CR", "?"))
        return f"Evolver F={f} CR={cr} {mode}"

    @classmethod
    def baselines(cls, settings: dict[str, Any]) -> dict[str, str]:
        merger = settings.get("merger", "none")
        return {} if merger == "none" else {"merged_scores": f"{merger} merge (no evolution)"}

    @classmethod
    def settings_from_log(cls, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Rows name the merger only in merger mode."""
        out = super().settings_from_log(rows)
        return {**out, "merger": out.get("merger", "none")} if rows else out

    @classmethod
    def start_fitness(cls, settings: dict[str, Any], initial: dict[str, Any]) -> float | None:
        """Merger modes start from the merge of the initial population, individual mode from
        the best initial member."""
        merged = initial.get("merged_fitness")
        if settings.get("merger", "none") != "none" or merged is not None:
            return None if merged is None else float(merged)
        return super().start_fitness(settings, initial)

    @classmethod
    def recipe_note(cls, settings: dict[str, Any], complete: bool) -> str:
        what = "merge" if settings.get("merger", "none") != "none" else "best member"
        return (
            "Final recipe: not expressible as one mergekit recipe (the answer is an evolved "
            f"population's {what}, built by chains of DE mutation and crossover with random "
            "masks); use its model folder."
        )
