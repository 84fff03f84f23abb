"""Differential-evolution recipes and Evolver's selection rules (no Ray, no models)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoray.strategies.de import BLOCK, Recipe, build_offspring, crossover_mask, sample_recipes
from evoray.strategies.evolver import (
    EvolverSettings,
    EvolverState,
    Trial,
    choose_merged,
    improving_merges,
    select_individuals,
)


def pop(n: int, size: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=g) for _ in range(n)]


@given(
    seed=st.integers(0, 2**62),
    start=st.integers(0, 3 * BLOCK),
    length=st.integers(1, 2 * BLOCK),
    cut=st.floats(0, 1),
)
@settings(max_examples=25, deadline=None)
def test_crossover_mask_does_not_depend_on_chunking(seed, start, length, cut):
    stop = start + length
    mid = start + int(cut * length)
    whole = crossover_mask(seed, start, stop, 0.5)
    parts = [crossover_mask(seed, a, b, 0.5) for a, b in ((start, mid), (mid, stop)) if b > a]
    assert torch.equal(whole, torch.cat(parts))


def test_crossover_rate_and_forced_element():
    m = crossover_mask(7, 0, 4 * BLOCK, 0.3)
    assert abs(m.float().mean().item() - 0.3) < 0.01
    tiny = crossover_mask(7, 0, 4 * BLOCK, 1e-12)
    # j_rand: exactly one element per block comes from the mutant even at CR ~ 0
    assert tiny.view(4, BLOCK).sum(1).tolist() == [1, 1, 1, 1]
    assert crossover_mask(7, 0, 1000, 1.0).all()


def test_evolver_mutation_with_full_crossover():
    p = pop(3, 1000)
    r = Recipe(target=0, refs=(2,), F=0.5, CR=1.0, seed=1)
    out = build_offspring(r, p)
    torch.testing.assert_close(out, p[0] + 0.5 * (p[2] - p[0]))


def test_rand1_mutation_and_crossover_mix():
    p = pop(4, 5000)
    r = Recipe(target=1, refs=(0, 2, 3), F=0.8, CR=0.5, seed=3, mutation="rand1")
    out = build_offspring(r, p)
    v = p[0] + 0.8 * (p[2] - p[3])
    mask = crossover_mask(3, 0, 5000, 0.5)
    torch.testing.assert_close(out[mask], v[mask])
    assert torch.equal(out[~mask], p[1][~mask])


def test_offspring_same_whatever_chunk_and_dtype_kept():
    p = [t.to(torch.bfloat16) for t in pop(3, 3 * BLOCK + 17)]
    r = Recipe(target=2, refs=(1,), F=0.5, CR=0.5, seed=9)
    a = build_offspring(r, p, chunk=1 << 22)
    b = build_offspring(r, p, chunk=12345)
    assert a.dtype == torch.bfloat16
    assert torch.equal(a, b)
    out = torch.empty_like(p[0])
    assert build_offspring(r, p, out) is out and torch.equal(out, a)


def test_sample_recipes_deterministic_and_valid():
    a = sample_recipes(5, F=0.5, CR=0.5, mutation="rand1", seed=1, generation=3)
    b = sample_recipes(5, F=0.5, CR=0.5, mutation="rand1", seed=1, generation=3)
    c = sample_recipes(5, F=0.5, CR=0.5, mutation="rand1", seed=1, generation=4)
    assert a == b and a != c
    for r in a:
        assert r.target not in r.refs and len(set(r.refs)) == 3
    assert [r.target for r in a] == list(range(5))
    assert Recipe.from_dict(a[0].to_dict()) == a[0]
    with pytest.raises(ValueError, match="at least 4"):
        sample_recipes(3, F=0.5, CR=0.5, mutation="rand1", seed=0, generation=0)
    with pytest.raises(ValueError, match="mutation"):
        sample_recipes(3, F=0.5, CR=0.5, mutation="best2", seed=0, generation=0)


def trial(target: int, fitness: float) -> Trial:
    return Trial(Recipe(target, (0,), 0.5, 0.5, target), fitness)


def test_individual_selection_is_strict():
    chosen = select_individuals([0.5, 0.6, 0.7], [trial(0, 0.5), trial(1, 0.65), trial(2, 0.1)])
    assert [t.recipe.target for t in chosen] == [1]


def test_merged_selection():
    improving = improving_merges(0.6, [trial(0, 0.7), trial(1, 0.6), trial(2, 0.8)])
    assert [t.recipe.target for t in improving] == [2, 0]
    assert [t.recipe.target for t in choose_merged(improving, 0.85)] == [2, 0]
    assert [t.recipe.target for t in choose_merged(improving, 0.75)] == [2]
    assert choose_merged([], None) == []


def test_state_round_trip_and_settings_validation():
    s = EvolverSettings(generations=3, merger="fisher")
    state = EvolverState(s, 4, generation=2, fitness=[0.1, 0.2, 0.3, 0.4], merged_fitness=0.5)
    state.accepted = [[Recipe(1, (2,), 0.5, 0.5, 5).to_dict()], []]
    back = EvolverState.from_dict(state.to_dict())
    assert back == state and back.recipes() == state.recipes()
    assert back.best_fitness == 0.5 and not back.done
    for bad in ({"CR": 0}, {"F": 3}, {"merger": "ties"}, {"mutation": "x"}, {"generations": -1}):
        with pytest.raises(ValueError):
            EvolverSettings(**bad)


# --- kinship-guided greedy merging -------------------------------------------------------------


def greedy_state(fitness, k=2, parents=None):
    from evoray.strategies.greedy import Candidate, GreedySettings, GreedyState

    parents = parents or {}
    cands = [Candidate(i, parents.get(i, ()), fitness=f) for i, f in enumerate(fitness)]
    st = GreedyState(GreedySettings(k=k), cands)
    st.top = st.rank()
    return st


def test_greedy_first_generation_merges_all_initial_pairs():
    st = greedy_state([0.5, 0.6, 0.4])
    assert st.pairs_to_merge() == [(0, 1), (0, 2), (1, 2)]
    assert st.top == [1, 0]


def test_greedy_later_generations_merge_unmerged_top_pairs_and_explore():
    # 0..2 initial; 3 = merge(0, 1), 4 = merge(0, 2), 5 = merge(1, 2)
    st = greedy_state(
        [0.5, 0.6, 0.4, 0.7, 0.65, 0.3], k=3, parents={3: (0, 1), 4: (0, 2), 5: (1, 2)}
    )
    st.generation = 1
    assert st.top == [3, 4, 1]
    assert st.pairs_to_merge() == [(1, 3), (1, 4), (3, 4)]
    in_top, fresh = st.exploration_candidates()
    assert in_top == [4, 1] and set(fresh) == {0, 1, 2, 4, 5}
    added = st.add((3, 4))
    assert added.id == 6 and added.generation == 2


def test_greedy_rank_ties_and_round_trip():
    from evoray.strategies.greedy import GreedyState

    st = greedy_state([0.5, 0.5, 0.5], k=2)
    assert st.top == [0, 1]
    assert GreedyState.from_dict(st.to_dict()) == st
    with pytest.raises(ValueError):
        from evoray.strategies.greedy import GreedySettings

        GreedySettings(operator="dare")


def _reference_mask(seed: int, index: int, CR: float) -> bool:
    """The documented mask in plain Python integers (no torch, no numpy): what every device's
    int32 tensor code must reproduce bit for bit."""
    m64 = (1 << 64) - 1

    def splitmix(x: int) -> int:
        z = (x + 0x9E3779B97F4A7C15) & m64
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m64
        return z ^ (z >> 31)

    def mix(h: int) -> int:
        h ^= h >> 16
        h = (h * 0x7FEB352D) & 0xFFFFFFFF
        h ^= h >> 15
        h = (h * 0x846CA68B) & 0xFFFFFFFF
        return h ^ (h >> 16)

    block, j = divmod(index, BLOCK)
    z = splitmix(splitmix(seed) ^ block)
    if splitmix(z) % BLOCK == j:
        return True
    h = mix(mix(j ^ (z & 0xFFFFFFFF)) ^ (z >> 32))
    return h < round(CR * 2**32)


@pytest.mark.parametrize("CR", [0.0, 0.3, 0.9])
def test_crossover_mask_matches_its_integer_definition(CR):
    seed, start = 2**62 + 12345, 5 * BLOCK - 300
    mask = crossover_mask(seed, start, start + 600, CR).tolist()
    forced = [i for i in range(start, start + 600) if _reference_mask(seed, i, 0.0)]
    assert mask == [_reference_mask(seed, i, CR) for i in range(start, start + 600)]
    assert len(forced) <= 2 and all(mask[i - start] for i in forced)
