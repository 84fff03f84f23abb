"""Evolver's merger mode with Fisher / RegMean statistics on a tiny causal-LM population,
through ``SearchRun`` on a local Ray, scored by mean token log-likelihood on a few texts."""

from __future__ import annotations

import time

import numpy as np
import pytest
import ray
import torch

import tests.lm_fixtures as lm_fixtures
from evoray.execution.pool import WorkerPool
from evoray.execution.population import RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import WorkerSpec
from evoray.models.pool import ModelPool
from evoray.strategies.base import Problem
from evoray.strategies.evolver import Evolver, EvolverSettings
from tests.lm_fixtures import TextLogLik, make_model


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory, ray_local):
    # The task pool class lives in the tests: ship it to the workers by value.
    ray.cloudpickle.register_pickle_by_value(lm_fixtures)
    root = tmp_path_factory.mktemp("lms")
    base = make_model(root / "base", "llama", seed=0)
    members = tuple(
        str(make_model(root / f"ft{i}", "llama", seed=0, noise=0.02 * (i + 1))) for i in range(3)
    )
    models = ModelPool(members, base=str(base))
    tasks = TextLogLik()
    spec = WorkerSpec(members[0], models.layout(), tasks, metric="loglik", torch_threads=1)
    pool = WorkerPool(spec, 2, num_cpus=0.5)
    yield models, tasks, pool, root
    pool.shutdown()


@pytest.mark.parametrize("merger", ["fisher", "regmean"])
def test_evolver_merger_mode_on_causal_lms(lm_run, merger: str) -> None:
    models, tasks, pool, root = lm_run
    inputs = RunInputs(models, tasks=tasks, stats_examples=6, cache_dir=str(root / merger))
    s = EvolverSettings(generations=2, seed=3, merger=merger, metric="loglik")
    problem = Problem(n_members=3, has_base=True)
    r = SearchRun(Evolver(s, problem), inputs, pool)
    t0 = time.perf_counter()
    r.start()
    t1 = time.perf_counter()
    state = r.strategy.state
    history = [state.merged_fitness]
    for _ in range(2):
        r.step()
        history.append(state.merged_fitness)
    t2 = time.perf_counter()
    print(
        f"{merger}: start (statistics, merge, scores) {t1 - t0:.2f}s, 2 generations {t2 - t1:.2f}s"
    )
    assert all(np.isfinite(history)) and history == sorted(history)
    assert all(f < 0 for f in history)  # a mean log-likelihood, not an accuracy
    merger_obj = ray.get(r.merger_ref)
    if merger == "fisher":
        # The statistics are the members' own, not a uniform average.
        assert not torch.allclose(merger_obj.coef, torch.full_like(merger_obj.coef, 1 / 3))
    else:
        assert any(s.name == "lm_head.weight" for s, _ in merger_obj.linear)
    pop = [torch.from_numpy(np.array(ray.get(ref))) for ref in r.refs]
    incremental = torch.from_numpy(np.array(ray.get(r.merged_ref)))
    torch.testing.assert_close(merger_obj.merge(pop), incremental, rtol=1e-4, atol=1e-5)
