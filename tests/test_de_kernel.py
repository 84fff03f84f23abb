"""The fused CPU build of DE offspring against the eager torch build it replaces."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import pytest
import torch

from evoray.strategies import de_kernel
from evoray.strategies.de import BLOCK, Recipe, build_into, build_offspring, build_range
from evoray.weights.placement import Segment

DTYPES = (torch.bfloat16, torch.float32)
RECIPES = (
    Recipe(0, (2,), 0.5, 0.5, 12345),
    Recipe(1, (0, 2, 3), 0.8, 0.3, 7, "rand1"),
    Recipe(2, (1,), 1.3, 0.0, 5),  # only the forced element of each block
    Recipe(3, (0,), 0.2, 1.0, 6),  # every element
)

pytestmark = pytest.mark.skipif(de_kernel.kernel() is None, reason="no C compiler here")


def population(n: int, dtype: torch.dtype, special: bool = False) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    pop = []
    for _ in range(4):
        p = torch.randn(n, generator=g) * 0.02
        if special:  # infinities, signed zeros, subnormals (of float32 and of bfloat16)
            vals = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0, 1e-40, -1e-39, 1e-45])
            idx = torch.randint(0, n, (n // 50,), generator=g)
            p[idx] = vals[torch.randint(0, len(vals), (len(idx),), generator=g)]
        pop.append(p.to(dtype))
    return pop


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal values, NaN where NaN (inf - inf makes some; their payloads may differ)."""
    nan = a.isnan()
    return torch.equal(nan, b.isnan()) and torch.equal(a[~nan], b[~nan])


def eager(fn, *args, **kwargs):
    old = de_kernel.set_enabled(False)
    try:
        return fn(*args, **kwargs)
    finally:
        de_kernel.set_enabled(old)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("recipe", RECIPES, ids=lambda r: f"{r.mutation}-CR{r.CR}")
def test_fused_build_equals_the_eager_build_bit_for_bit(dtype, recipe):
    pop = population(3 * BLOCK + 999, dtype, special=True)
    for start, stop in ((0, 3 * BLOCK + 999), (BLOCK - 3, 2 * BLOCK + 5), (17, 40)):
        want = build_range(recipe, pop, start, stop, eager=True)
        for out_dtype in DTYPES:
            got = torch.empty(stop - start, dtype=out_dtype)
            assert de_kernel.usable(pop, got)
            de_kernel.build(recipe, pop, start, stop, got)
            assert same(got, want.to(out_dtype)), (start, stop, out_dtype)
    assert same(build_offspring(recipe, pop), eager(build_offspring, recipe, pop))


def test_nan_stays_nan():
    """NaN payloads may differ from torch's conversion; NaN-ness and every other value do not."""
    pop = population(BLOCK, torch.bfloat16)
    pop[0][::97] = float("nan")
    got, want = build_offspring(RECIPES[0], pop), eager(build_offspring, RECIPES[0], pop)
    assert got.isnan().any() and same(got, want)


def test_threads_split_the_build_without_changing_it(monkeypatch):
    pop = population(40 * BLOCK + 3, torch.bfloat16)
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = build_offspring(RECIPES[1], pop)
        torch.set_num_threads(3)
        calls = []
        run = de_kernel._run
        monkeypatch.setattr(de_kernel, "_run", lambda *a: calls.append(a[3:5]) or run(*a))
        three = build_offspring(RECIPES[1], pop)
    finally:
        torch.set_num_threads(old)
    assert len(calls) == 3 and calls[0][0] == 0 and calls[-1][1] == 40 * BLOCK + 3
    assert all(a[1] == b[0] and a[1] % BLOCK == 0 for a, b in itertools.pairwise(calls))
    assert torch.equal(one, three)


@pytest.mark.parametrize("dtype", DTYPES)
def test_build_into_segments_and_kinship_sums_match_eager(dtype):
    n = 5 * BLOCK + 11
    pop = population(n, dtype)
    base = population(n + 1, dtype)[0][:n].contiguous()
    pop = [base + p for p in pop]  # deltas from the base, as kinship wants
    cut = 2 * BLOCK + 100
    segs = [Segment(0, cut, torch.empty(cut, dtype=dtype)), Segment(cut, n, torch.empty(n - cut))]
    ref = [Segment(0, n, torch.empty(n, dtype=dtype))]
    got = build_into(RECIPES[0], pop, segs, base=base)
    want = eager(build_into, RECIPES[0], pop, ref, base=base)
    assert torch.equal(segs[0].buffer, ref[0].buffer[:cut])
    # the float32 segment stores the offspring unrounded: the eager build's float32 values
    assert torch.equal(segs[1].buffer, build_range(RECIPES[0], pop, cut, n, eager=True))
    assert got.n == want.n == n
    # the kernel sums in float64, torch's dot in float32: equal to float32 accuracy
    assert got.pearson == pytest.approx(want.pearson, rel=1e-5)
    assert got.sab == pytest.approx(want.sab, rel=1e-4)
    assert build_into(RECIPES[0], pop, ref) is None


def test_unsupported_inputs_fall_back_to_eager():
    pop = population(BLOCK, torch.float16)
    assert not de_kernel.usable(pop, torch.empty(BLOCK, dtype=torch.float16))
    mixed = [pop[0].float(), *pop[1:]]
    assert not de_kernel.usable(mixed, torch.empty(BLOCK))
    offset = [torch.cat([p.float(), p.float()])[BLOCK:] for p in pop]  # views into storage
    assert de_kernel.usable(offset, torch.empty(BLOCK))
    assert not de_kernel.usable(offset, torch.empty(2 * BLOCK)[::2])
    out = build_offspring(RECIPES[0], pop)  # float16 builds eagerly, as before
    assert out.dtype == torch.float16 and not torch.equal(out, pop[0])


def test_without_a_compiler_builds_stay_eager(tmp_path):
    """A machine with no C compiler runs the eager build (same offspring) and says why
    at INFO level only; the kernel compiles into $EVORAY_HOME/kernels when there is one."""
    code = (
        "import logging, torch; logging.basicConfig(level=logging.INFO)\n"
        "from evoray.strategies import de_kernel\n"
        "from evoray.strategies.de import Recipe, build_offspring\n"
        "pop = [torch.full((1000,), float(i)) for i in range(3)]\n"
        "out = build_offspring(Recipe(0, (1,), 0.5, 0.5, 1), pop)\n"
        "print(de_kernel.kernel() is not None, sorted(set(out.tolist())))\n"
    )
    env = {"PATH": "/nonexistent", "CC": "/nonexistent/cc", "EVORAY_HOME": str(tmp_path / "h")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split("\n")[0] == "False [0.0, 0.5]"
    assert "eager torch ops" in done.stderr
    assert not (tmp_path / "h" / "kernels").exists() or not any((tmp_path / "h").rglob("*.so"))
    env = {"PATH": os.environ["PATH"], "EVORAY_HOME": str(tmp_path / "h")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert done.stdout.split("\n")[0] == "True [0.0, 0.5]"
    assert len(list((tmp_path / "h" / "kernels").glob("de_kernel-*.so"))) == 1
