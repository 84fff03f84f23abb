"""Strategies are pure ask/tell logic: driven here by an in-process population, no Ray.

The toy fitness is the negative distance to a hidden target vector, so what each strategy
should do (climb, keep its best, stop) is known without models or data.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from itertools import combinations

import pytest
import torch

from evoray.errors import ConfigError
from evoray.merge.walker import merge_flat
from evoray.population.mergers import make_merger
from evoray.strategies import REGISTRY, get_strategy, names
from evoray.strategies.base import (
    Answers,
    Batch,
    Keep,
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
    peak: int = 0  # most vectors held at once (a released slot is None)
    rebuilt: int = 0  # keeps into a slot released before

    def fitness(self, v: torch.Tensor) -> float:
        return -float((v.float() - self.target).norm())

    def build(self, b, pop, merged) -> torch.Tensor:
        if isinstance(b, Member):
            assert pop[b.slot] is not None, f"slot {b.slot} was released"
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
            assert all(pop[i] is not None for i in b.slots), f"{b.slots}: a slot was released"
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
                continue
            self.rebuilt += k.slot < len(self.members) and self.members[k.slot] is None
            self.members.extend([None] * (k.slot + 1 - len(self.members)))
            self.members[k.slot] = v
        self.peak = max(self.peak, self.held())
        for slot in batch.release:
            self.members[slot] = None
        return Answers(scores=scores, kinship=kin)

    def held(self) -> int:
        return sum(v is not None for v in self.members)


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
    assert pop.fitness(pop.build(g.answer(), pop.members, None)) == pytest.approx(g.best_fitness)


class MainGreedy(KinshipGreedy):
    """Greedy as main (870695a) ran it: every candidate kept in its slot, never released."""

    def replay(self):
        merged = self.state.candidates[self.problem.n_members :]
        return [Batch(keep=(Keep(self._merge(*c.parents), c.id),)) for c in merged]

    def generation(self):
        s, state = self.settings, self.state
        new = [state.add(p) for p in state.pairs_to_merge()]
        if s.explore and state.generation > 0:
            in_top, fresh = state.exploration_candidates()
            taken = {frozenset(c.parents) for c in new}
            options = [i for i in (in_top or fresh) if frozenset((state.best, i)) not in taken]
            if options:
                kin = yield Batch(kinship=tuple((state.best, i) for i in options))
                partner = options[min(range(len(options)), key=kin.kinship.__getitem__)]
                new.append(state.add((state.best, partner), explore=True))
        if not new:
            state.stopped = "nothing left to merge"
            state.generation += 1
            return self._report(0, 0.0, [])
        yield Batch(keep=tuple(Keep(self._merge(*c.parents), c.id) for c in new))
        answers = yield Batch(
            evaluate=tuple(Member(c.id) for c in new), kinship=tuple(c.parents for c in new)
        )
        for c, k, res in zip(new, answers.kinship, answers.scores, strict=True):
            c.parent_kinship = k
            c.fitness = res.fitness
        old_top = state.top
        state.top = state.rank()
        state.generation += 1
        if set(state.top) == set(old_top):
            state.stopped = "top-k unchanged"
        elif s.kinship_threshold is not None:
            pairs = tuple(combinations(state.top, 2))
            kin = (yield Batch(kinship=pairs)).kinship if pairs else []
            if kin and sum(kin) / len(kin) > s.kinship_threshold:
                state.stopped = f"top-k mean kinship above {s.kinship_threshold}"
        if not state.done and state.generation >= s.max_generations:
            state.stopped = "max_generations"
        return self._report(len(new), 0.0, [])


def run_greedy(cls, settings: GreedySettings, n: int, seed: int):
    """A greedy run on a fresh toy population: the strategy, population, top-k per generation
    and the number of new candidates per generation."""
    pop = population(n, seed)
    g = cls(settings, problem(pop))
    drive(g.setup(), pop.execute)
    tops, new = [list(g.state.top)], []
    while not g.done:
        before = len(g.state.candidates)
        drive(g.generation(), pop.execute)
        tops.append(list(g.state.top))
        new.append(len(g.state.candidates) - before)
    return g, pop, tops, new


GREEDY_CASES = [
    (GreedySettings(k=2, max_generations=8), 4, 0),
    (GreedySettings(k=3, max_generations=8), 5, 1),
    (GreedySettings(k=3, operator="task_arithmetic", weight=0.7, max_generations=8), 4, 2),
    (GreedySettings(k=2, operator="ties", explore=False, max_generations=8), 4, 3),
    (GreedySettings(k=4, kinship_threshold=0.99, max_generations=8), 5, 4),
]


@pytest.mark.parametrize(("settings", "n", "seed"), GREEDY_CASES)
def test_greedy_releases_candidates_yet_decides_as_main_did(settings, n, seed):
    """Same candidates, fitness, kinships, top-k sequence and answer as main's keep-everything
    greedy, while the population holds at most members + k + one generation's candidates."""
    want, want_pop, want_tops, _ = run_greedy(MainGreedy, settings, n, seed)
    got, pop, tops, new = run_greedy(KinshipGreedy, settings, n, seed)
    assert got.get_state() == want.get_state()
    assert tops == want_tops
    answer = pop.build(got.answer(), pop.members, None)
    torch.testing.assert_close(answer, want_pop.build(want.answer(), want_pop.members, None))
    n_cands = len(got.state.candidates)
    assert want_pop.peak == n_cands  # main held every candidate
    assert pop.peak <= n + settings.k + max(new)
    if got.generations_done > 2:
        assert pop.peak < n_cands
    # between generations: the members and the merged top-k only
    assert {i for i, v in enumerate(pop.members) if v is not None} == set(range(n)) | set(
        got.state.top
    )


def test_greedy_rebuilds_a_released_exploration_partner():
    """k=2: the best soon has merged with the other top model, so exploration picks among all
    candidates, released ones rebuilt from their recipes (ancestors first) and released again."""
    settings, n, seed = GreedySettings(k=2, max_generations=8), 4, 0
    got, pop, _, _ = run_greedy(KinshipGreedy, settings, n, seed)
    want, _, _, _ = run_greedy(MainGreedy, settings, n, seed)
    assert got.get_state() == want.get_state()
    assert pop.rebuilt > 0  # released candidates were compared (and merged) again
    assert any(c.explore and c.parents[1] not in want.state.top for c in got.state.candidates)


def test_greedy_resumed_from_its_state_rebuilds_only_its_top_k():
    s = GreedySettings(k=3, max_generations=6)
    full, full_pop, _, _ = run_greedy(KinshipGreedy, s, 5, 1)
    half, _, _, _ = run_greedy(KinshipGreedy, GreedySettings(k=3, max_generations=2), 5, 1)
    state = {**half.get_state(), "settings": vars(s).copy(), "stopped": None}
    pop = population(5, 1)
    again = KinshipGreedy(s, problem(pop))
    again.set_state(state)
    for batch in again.replay():
        pop.execute(batch)
    held = {i for i, v in enumerate(pop.members) if v is not None}
    assert held == set(range(5)) | set(again.state.top) and len(held) < len(again.state.candidates)
    while not again.done:
        drive(again.generation(), pop.execute)
    assert again.get_state() == full.get_state()
    for i, v in enumerate(pop.members):
        if v is not None:
            torch.testing.assert_close(v, full_pop.members[i])


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


@pytest.mark.parametrize("merger", ["none", "average"])
def test_several_offspring_per_member_compete_and_one_replaces_each(merger):
    """offspring_per_member: k recipes per individual (k x N builds to score, so more workers
    than members are busy); at most one of them replaces each individual, its best."""
    pop = population()
    s = EvolverSettings(generations=3, seed=4, merger=merger, offspring_per_member=3)
    ev = Evolver(s, problem(pop))
    merger_spec = ev.merger()
    if merger_spec is not None:
        pop.merger = make_merger(merger_spec[0], LAYOUT, len(pop.members), **merger_spec[1])
    for batch in ev.replay():  # the merged model, in merger mode
        pop.execute(batch)
    drive(ev.setup(), pop.execute)
    for _ in range(3):
        gen = drive(ev.generation(), pop.execute)
        assert len(gen.rows) == 12
        targets = [row.individual for row, _ in gen.rows if row.accepted]
        assert len(targets) == len(set(targets))
        for row, res in gen.rows:  # an accepted offspring is its individual's best
            if row.accepted:
                mine = [r.fitness for w, r in gen.rows if w.individual == row.individual]
                assert res.fitness == max(mine)
    assert ev.evaluations == 4 + 12 * 3 + (merger != "none")
    if merger == "none":
        assert ev.state.fitness == [pytest.approx(pop.fitness(m)) for m in pop.members]


def test_one_offspring_per_member_is_the_default_recipe_stream():
    from evoray.strategies.de import sample_recipes

    one = sample_recipes(5, F=0.5, CR=0.5, mutation="rand1", seed=3, generation=2)
    three = sample_recipes(
        5, F=0.5, CR=0.5, mutation="rand1", seed=3, generation=2, per_individual=3
    )
    assert [r.target for r in three] == [i for i in range(5) for _ in range(3)]
    assert three[::3] == one and len(set(three)) == 15
