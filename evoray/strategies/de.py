"""Differential-evolution offspring of flat weight vectors, built from small recipes.

An offspring is fully described by a ``Recipe`` (target, reference individuals, F, CR, seed), so
the search ships recipes to workers, never weights, and a population can be rebuilt from its
initial models and the accepted recipes alone.

Crossover masks are never stored: each element's draw is a counter-based hash of (seed, block,
position in block) computed with 32-bit integer tensor ops, so the mask is generated on the
worker's own device (CPU or GPU) and is bit-identical on every device, whatever the chunking:
an offspring built on a GPU equals the one a CPU worker builds from the same recipe. Builds
run in chunks of elements in float32, so a build needs scratch of a few chunks, never a second
model.

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
from typing import TYPE_CHECKING

import numpy as np
import torch

from evoray.kinship.metrics import KinshipSums
from evoray.strategies import de_kernel

if TYPE_CHECKING:
    from evoray.weights.placement import Segment

MUTATIONS = ("evolver", "rand1")
BLOCK = 1 << 16  # elements per crossover block (one hash key and one forced element each)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


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
    pop_size: int,
    *,
    F: float,
    CR: float,
    mutation: str,
    seed: int,
    generation: int,
    per_individual: int = 1,
) -> list[Recipe]:
    """``per_individual`` recipes per individual for one generation (individual 0's first,
    then 1's, ...), determined by (seed, generation) alone; the first of each individual's
    are the recipes of ``per_individual=1``."""
    if mutation not in MUTATIONS:
        raise ValueError(f"mutation must be one of {MUTATIONS}, got {mutation!r}")
    if per_individual < 1:
        raise ValueError(f"per_individual must be >= 1, got {per_individual}")
    need = 1 if mutation == "evolver" else 3
    if pop_size < need + 1:
        raise ValueError(f"mutation {mutation!r} needs a population of at least {need + 1}")
    rng = random.Random(f"recipes/{seed}/{generation}")
    extra = random.Random(f"recipes/{seed}/{generation}/extra")
    recipes = []
    for i in range(pop_size):
        others = [j for j in range(pop_size) if j != i]
        for k in range(per_individual):
            r = rng if k == 0 else extra
            refs = tuple(r.sample(others, need))
            recipes.append(Recipe(i, refs, F, CR, r.getrandbits(63), mutation))
    return recipes


def default_chunk(device: torch.device | str) -> int:
    """Elements per build step: cache-sized on a CPU, large on a GPU (few kernel launches)."""
    return 4 * BLOCK if torch.device(device).type == "cpu" else 64 * BLOCK


# -- the mask -------------------------------------------------------------------------------------


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on uint64 arrays (numpy wraps on overflow, as the algorithm needs)."""
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def _block_keys(seed: int, b0: int, b1: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per block in ``[b0, b1)``: two 32-bit hash keys (as int32) and the forced element."""
    base = _splitmix64(np.array([seed % 2**64], dtype=np.uint64))
    z = _splitmix64(base ^ np.arange(b0, b1, dtype=np.uint64))
    k1 = (z & np.uint64(0xFFFFFFFF)).astype(np.uint32).view(np.int32)
    k2 = (z >> np.uint64(32)).astype(np.uint32).view(np.int32)
    forced = (_splitmix64(z) % np.uint64(BLOCK)).astype(np.int64)
    return k1, k2, forced


def _mix32(h: torch.Tensor, tmp: torch.Tensor) -> None:
    """lowbias32 (Wellons) in place on int32 tensors: wrapping multiplies, logical shifts."""
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B - 2**32), (16, None)):
        torch.bitwise_right_shift(h, shift, out=tmp)
        tmp.bitwise_and_((1 << (32 - shift)) - 1)
        h.bitwise_xor_(tmp)
        if mult is not None:
            h.mul_(mult)


def crossover_mask(
    seed: int, start: int, stop: int, CR: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bernoulli(CR) mask of elements [start, stop) on ``device``: the same bits on every
    device and however the range is chunked."""
    device = torch.device(device)
    b0, b1 = start // BLOCK, -(-stop // BLOCK)
    k1, k2, forced = _block_keys(seed, b0, b1)
    nb = b1 - b0
    h = torch.arange(BLOCK, dtype=torch.int32, device=device).expand(nb, BLOCK).clone()
    h.bitwise_xor_(torch.from_numpy(k1).to(device).view(nb, 1))
    tmp = torch.empty_like(h)
    _mix32(h, tmp)
    h.bitwise_xor_(torch.from_numpy(k2).to(device).view(nb, 1))
    _mix32(h, tmp)
    threshold = round(CR * 2**32)  # element taken when its hash, as uint32, is below
    if threshold >= 2**32:
        mask = torch.ones(nb * BLOCK, dtype=torch.bool, device=device)
    else:  # compare as unsigned: flip the sign bit, compare signed
        h.bitwise_xor_(-(2**31))
        mask = torch.lt(h, threshold - 2**31).view(-1)
    pos = torch.from_numpy(forced + np.arange(nb, dtype=np.int64) * BLOCK).to(device)
    mask[pos] = True
    lo = start - b0 * BLOCK
    return mask[lo : lo + stop - start]


# -- builds ---------------------------------------------------------------------------------------


def _f32(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as float32 on ``device``, moved in its stored dtype first (half the bytes for
    bf16); may be ``t`` itself, so callers never write into the result."""
    return t.to(device, non_blocking=True).to(torch.float32)


def build_range(
    recipe: Recipe,
    population: Sequence[torch.Tensor],
    start: int,
    stop: int,
    device: torch.device | str | None = None,
    *,
    eager: bool = False,
) -> torch.Tensor:
    """Elements [start, stop) of the offspring, as a new float32 tensor on ``device``
    (default: the target's). Population tensors may live on any device (host memory of the
    object store, typically); only the slices needed are moved. On a CPU the fused kernel
    builds it unless ``eager`` (the same values)."""
    target = population[recipe.target]
    device = target.device if device is None else torch.device(device)
    if not eager and device.type == "cpu":
        out = torch.empty(stop - start, dtype=torch.float32)
        if de_kernel.usable(population, out):
            de_kernel.build(recipe, population, start, stop, out)
            return out
    x = _f32(target[start:stop], device)
    F = recipe.F
    if recipe.mutation == "evolver":
        (r,) = recipe.refs
        v = _f32(population[r][start:stop], device) - x  # a fresh tensor
        v.mul_(F).add_(x)
    else:
        r1, r2, r3 = recipe.refs
        v = _f32(population[r2][start:stop], device) - _f32(population[r3][start:stop], device)
        v.mul_(F).add_(_f32(population[r1][start:stop], device))
    mask = crossover_mask(recipe.seed, start, stop, recipe.CR, device)
    return torch.where(mask, v, x, out=v)


def build_offspring(
    recipe: Recipe,
    population: Sequence[torch.Tensor],
    out: torch.Tensor | None = None,
    *,
    chunk: int | None = None,
) -> torch.Tensor:
    """The offspring's flat weights, built chunk by chunk in float32 into ``out`` (storage
    dtype, any device: a GPU worker's model buffer builds on the GPU from host vectors).

    ``population`` holds 1-D tensors (zero-copy views of the object store's numpy arrays).
    """
    target = population[recipe.target]
    out = torch.empty_like(target) if out is None else out
    n = target.numel()
    if de_kernel.usable(population, out):
        de_kernel.build(recipe, population, 0, n, out)
        return out
    chunk = chunk or default_chunk(out.device)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        out[start:stop].copy_(build_range(recipe, population, start, stop, out.device))
    return out


def build_into(
    recipe: Recipe,
    population: Sequence[torch.Tensor],
    segments: Sequence[Segment],
    *,
    base: torch.Tensor | None = None,
    chunk: int | None = None,
) -> KinshipSums | None:
    """Build the offspring straight into a worker's segments (its model's memory, one or
    several devices), each on its segment's device. With ``base``, also returns the kinship
    sums of the offspring's delta from the base (as stored) against its parent's, summed in
    the same pass."""
    sums = None if base is None else KinshipSums()
    parent = population[recipe.target]
    for seg in segments:
        if de_kernel.usable(population, seg.buffer, base):
            got = de_kernel.build(recipe, population, seg.start, seg.stop, seg.buffer, base)
            sums = None if got is None else sums.merge(got)
            continue
        step = chunk or default_chunk(seg.device)
        start = seg.start
        while start < seg.stop:
            stop = min(seg.stop, (start // step + 1) * step)  # chunk edges stay block-aligned
            view = seg.buffer[start - seg.start : stop - seg.start]
            view.copy_(build_range(recipe, population, start, stop, seg.device))
            if sums is not None:
                b = base[start:stop].to(view.device, torch.float32)
                p = parent[start:stop].to(view.device, torch.float32)
                sums.update(view.float() - b, p - b)
            start = stop
    return sums
