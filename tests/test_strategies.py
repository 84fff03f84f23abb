"""Strategies are pure ask/tell logic: driven here by an in-process population, no Ray.

The toy fitness is the negative distance to a hidden target vector, so what each strategy
should do (climb, keep its best, stop) is known without models or data.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import pytest
import torch

from evoray.errors import ConfigError
from evoray.merge.walker import merge_flat
from evoray.population.mergers import make_merger
from evoray.strategies import REGISTRY, get_strategy, names
from evoray.strategies.base import (
    Answers,
    Batch,
    Member,
    MergeAll,
    Merged,
    MergedWith,
    MethodMerge,
    Offspring,
    Problem,
    Score,
    Strategy,
    drive,
)
from evoray.strategies.de import build_offspring
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.strategies.greedy import GreedySettings, KinshipGreedy
from evoray.strategies.recipe import RecipeSearch, RecipeSettings
from evoray.weights.layout import Layout

Info = namedtuple("Info", "name shape dtype")
LAYOUT = Layout.from_infos(
    [
        Info("model.embed.weight", (8, 4), torch.float32),
        Info("model.layers.0.w", (4, 4), torch.float32),
        Info("model.layers.1.w", (4, 4), torch.float32),
        Info("head.weight", (2, 4), torch.float32),
    ]
)


@dataclass
class LocalPopulation:
    """Answers batches in this process, on plain tensors (what the Ray runner does remotely)."""

    members: list[torch.Tensor]
    base: torch.Tensor
    target: torch.Tensor
    merger: object = None
    merged: torch.Tensor | None = None
    evaluated: int = 0

    def fitness(self, v: torch.Tensor) -> float:
        return -float((v.float() - self.target).norm())

    def build(self, b, pop, merged) -> torch.Tensor:
        if isinstance(b, Member):
            return pop[b.slot]
        if isinstance(b, Merged):
            return merged
        if isinstance(b, Offspring):
            return build_offspring(b.recipe, pop)
        if isinstance(b, MergeAll):
            return self.merger.merge(pop)
        if isinstance(b, MergedWith):
            out = merged.clone()
            for r in b.recipes:
                self.merger.apply_delta(out, r.target, build_offspring(r, pop) - pop[r.target])
            return out
        if isinstance(b, MethodMerge):
            base = pop[b.slots[0]] if not b.with_base else self.base
            models = [pop[i] for i in (b.slots if b.with_base else b.slots[1:])]
            return merge_flat(b.method, LAYOUT, models, base, b.per_model, b.settings, n_layers=2)
        raise TypeError(b)

    def execute(self, batch: Batch) -> Answers:
        pop, merged = list(self.members), self.merged
        scores = []
        for b in batch.evaluate:
            self.evaluated += 1
            f = self.fitness(self.build(b, pop, merged))
            scores.append(Score(fitness=f, scores={"toy": {"accuracy": f}}))
        kin = [
            float(torch.cosine_similarity(pop[a] - self.base, pop[b] - self.base, 0))
            for a, b in batch.kinship
        ]
        for k in batch.keep:
            v = self.build(k.build, pop, merged)
            if k.slot is None:
                self.merged = v
            elif k.slot == len(self.members):
                self.members.append(v)
            else:
                self.members[k.slot] = v
        return Answers(scores=scores, kinship=kin)


def population(n: int = 4, seed: int = 0) -> LocalPopulation:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(LAYOUT.numel, generator=g)
    target = base + torch.randn(LAYOUT.numel, generator=g)
    members = [base + torch.randn(LAYOUT.numel, generator=g) for _ in range(n)]
    return LocalPopulation(members, base, target)


def run(strategy: Strategy, pop: LocalPopulation, state=None) -> Strategy:
    """What the runner does: merger, replay or set-up, then generations until done."""
    merger = strategy.merger()
    if merger is not None:
        pop.merger = make_merger(merger[0], LAYOUT, len(pop.members), **merger[1])
    if state is not None:
        strategy.set_state(state)
    for batch in strategy.replay():
        pop.execute(batch)
    if state is None:
        drive(strategy.setup(), pop.execute)
    while not strategy.done:
        drive(strategy.generation(), pop.execute)
    return strategy


def problem(pop: LocalPopulation) -> Problem:
    return Problem(n_members=len(pop.members), has_base=True, n_layers=2)


@pytest.mark.parametrize("merger", ["none", "average"])
def test_evolver_only_climbs_and_its_answer_is_its_best(merger):
    pop = population()
    start = [pop.fitness(m) for m in pop.members]
    ev = run(Evolver(EvolverSettings(generations=6, seed=1, merger=merger), problem(pop)), pop)
    if merger == "none":
        assert all(f >= f0 for f, f0 in zip(ev.state.fitness, start, strict=True))
        assert ev.state.fitness == [pytest.approx(pop.fitness(m)) for m in pop.members]
        best = pop.build(ev.answer(), pop.members, pop.merged)
        assert pop.fitness(best) == pytest.approx(max(ev.state.fitness))
    else:
        assert ev.state.merged_fitness == pytest.approx(pop.fitness(pop.merged))
        torch.testing.assert_close(pop.merged, pop.merger.merge(pop.members))
    assert ev.generations_done == 6
    # the budget counts every offspring and starting point (not combined-merge checks)
    assert ev.evaluations == 4 * 7 + (merger != "none") <= pop.evaluated


def test_evolver_resumed_from_its_state_equals_the_uninterrupted_run():
    s = EvolverSettings(generations=4, seed=2)
    full_pop = population()
    full = run(Evolver(s, problem(full_pop)), full_pop)
    half_pop = population()
    half = run(Evolver(EvolverSettings(generations=2, seed=2), problem(half_pop)), half_pop)
    state = {**half.get_state(), "settings": vars(s).copy()}
    again_pop = population()
    again = run(Evolver(s, problem(again_pop)), again_pop, state=state)
    assert again.get_state() == full.get_state()
    assert all(torch.equal(a, b) for a, b in zip(again_pop.members, full_pop.members, strict=True))


def test_greedy_keeps_the_best_candidate_and_stops():
    pop = population()
    g = run(KinshipGreedy(GreedySettings(k=2, max_generations=4), problem(pop)), pop)
    assert g.done and g.state.stopped
    fits = [c.fitness for c in g.state.candidates]
    assert g.best_fitness == max(fits)
    assert len(pop.members) == len(g.state.candidates)  # every merge was kept as a slot
    assert pop.fitness(pop.members[g.state.best]) == pytest.approx(g.best_fitness)


def test_greedy_needs_a_base():
    with pytest.raises(ConfigError, match="base"):
        KinshipGreedy(GreedySettings(), Problem(n_members=3, has_base=False))


def test_recipe_search_asks_batches_and_answers_its_best_recipe():
    pop = population(3)
    settings = RecipeSettings(rounds=3, batch_size=4, sampler="tpe")
    rs = run(RecipeSearch(settings, problem(pop)), pop)
    assert rs.evaluations == 12 == pop.evaluated
    best = pop.build(rs.answer(), pop.members, None)
    assert pop.fitness(best) == pytest.approx(rs.best_fitness)


def test_registry_resolves_every_strategy_and_rejects_unknown_names():
    assert set(names()) == set(REGISTRY) == {"evolver", "kinship_greedy", "recipe_search"}
    for name in names():
        cls = get_strategy(name)
        assert issubclass(cls, Strategy) and cls.name == name
        assert cls.generations_key in {f for f in cls.settings_cls.__dataclass_fields__}
        assert set(cls.searchable) <= set(cls.settings_cls.__dataclass_fields__)
    with pytest.raises(ConfigError, match="evolver"):
        get_strategy("magic")
