"""Differential-evolution offspring of flat weight vectors, built from small recipes.

An offspring is fully described by a ``Recipe`` (target, reference individuals, F, CR, seed), so
the search ships recipes to workers, never weights, and a population can be rebuilt from its
initial models and the accepted recipes alone. Crossover masks come from the recipe's seed, one
counter-based stream per fixed-size block, so the offspring is the same whatever chunk size or
worker builds it, and masks are never stored.

Mutations (Du et al. 2024, Evolver):
- ``evolver`` (the reference code): ``v = theta_i + F * (theta_r - theta_i)``
- ``rand1`` (classic DE/rand/1): ``v = theta_r1 + F * (theta_r2 - theta_r3)``
Crossover is binomial: each element comes from ``v`` with probability CR, else from ``theta_i``;
one element per block (the ``j_rand`` of classic DE, per block) always comes from ``v`` so an
offspring never equals its parent.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

MUTATIONS = ("evolver", "rand1")
BLOCK = 1 << 16  # elements per crossover block (one generator seed each)


@dataclass(frozen=True)
class Recipe:
    """How to build one offspring from the current population."""

    target: int
    refs: tuple[int, ...]
    F: float
    CR: float
    seed: int
    mutation: str = "evolver"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Recipe:
        return cls(**{**d, "refs": tuple(d["refs"])})


def sample_recipes(
    pop_size: int, *, F: float, CR: float, mutation: str, seed: int, generation: int
) -> list[Recipe]:
    """One recipe per individual for one generation, determined by (seed, generation) alone."""
    if mutation not in MUTATIONS:
        raise ValueError(f"mutation must be one of {MUTATIONS}, got {mutation!r}")
    need = 1 if mutation == "evolver" else 3
    if pop_size < need + 1:
        raise ValueError(f"mutation {mutation!r} needs a population of at least {need + 1}")
    rng = random.Random(f"recipes/{seed}/{generation}")
    recipes = []
    for i in range(pop_size):
        others = [j for j in range(pop_size) if j != i]
        refs = tuple(rng.sample(others, need))
        recipes.append(Recipe(i, refs, F, CR, rng.getrandbits(63), mutation))
    return recipes


def crossover_mask(seed: int, start: int, stop: int, CR: float) -> torch.Tensor:
    """Bernoulli(CR) mask of elements [start, stop), identical however the range is chunked."""
    parts = []
    pos = start
    while pos < stop:
        block = pos // BLOCK
        b0, b1 = block * BLOCK, (block + 1) * BLOCK
        g = torch.Generator().manual_seed((seed * 1_000_003 + block) % (2**63))
        u = torch.rand(BLOCK, generator=g)
        forced = torch.randint(BLOCK, (1,), generator=g).item()
        m = u < CR
        m[forced] = True
        end = min(stop, b1)
        parts.append(m[pos - b0 : end - b0])
        pos = end
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def build_offspring(
    recipe: Recipe,
    population: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    chunk: int = 1 << 22,
) -> torch.Tensor:
    """The offspring's flat weights, computed in float32 chunks into ``out`` (storage dtype).

    ``population`` holds 1-D tensors (zero-copy views of the object store's numpy arrays).
    """
    target = population[recipe.target]
    out = torch.empty_like(target) if out is None else out
    n = target.numel()
    F = recipe.F
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        x = target[start:stop].float()
        if recipe.mutation == "evolver":
            (r,) = recipe.refs
            v = population[r][start:stop].float() - x  # a fresh float32 tensor
            v.mul_(F).add_(x)
        else:
            r1, r2, r3 = recipe.refs
            v = population[r2][start:stop].float() - population[r3][start:stop].float()
            v.mul_(F).add_(population[r1][start:stop])
        mask = crossover_mask(recipe.seed, start, stop, recipe.CR)
        if out.dtype == torch.float32 and out.device == x.device:
            torch.where(mask, v, x, out=out[start:stop])
        else:
            out[start:stop] = torch.where(mask, v, x)
    return out
