"""Evolver on a Ray worker pool: determinism, resume, merger mode, and the Tune path."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from evoray.execution.pool import WorkerPool
from evoray.execution.population import RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.pool import ModelPool
from evoray.population.mergers import make_merger
from evoray.strategies.base import Problem
from evoray.strategies.de import Recipe, build_offspring
from evoray.strategies.evolver import Evolver, EvolverSettings, EvolverState
from evoray.tasks.pool import ZooTasks
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.flat import flatten
from evoray.weights.layout import Layout


def inputs_for(zoo) -> tuple[RunInputs, WorkerSpec]:
    members = tuple(str(p) for p in zoo.experts.values())
    with open_checkpoint(members[0]) as c:
        layout = Layout.from_checkpoint(c)
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    models = ModelPool(members, base=str(zoo.base), member_tasks=tuple(zoo.experts))
    inputs = RunInputs(models, tasks=tasks)
    return inputs, WorkerSpec(members[0], layout, tasks, torch_threads=1)


@pytest.fixture(scope="module")
def pools(small_zoo, ray_local):
    """Worker pools are reused across runs (starting actors costs seconds each)."""
    _, spec = inputs_for(small_zoo)
    made = {1: WorkerPool(spec, 1, num_cpus=0.5), 2: WorkerPool(spec, 2, num_cpus=0.5)}
    yield made
    for p in made.values():
        p.shutdown()


def evolver_run(settings: EvolverSettings, inputs: RunInputs, pool, **kw) -> SearchRun:
    problem = Problem(n_members=len(inputs.members), has_base=inputs.base is not None)
    return SearchRun(Evolver(settings, problem), inputs, pool, **kw)


def run(zoo, pools, settings: EvolverSettings, workers: int, generations: int, state=None):
    inputs, _ = inputs_for(zoo)
    r = evolver_run(settings, inputs, pools[workers])
    r.start(None if state is None else state.to_dict())
    for _ in range(generations):
        r.step()
    final = [np.array(ray.get(ref)) for ref in r.refs]
    merged = None if r.merged_ref is None else np.array(ray.get(r.merged_ref))
    return r.strategy.state, final, merged


def test_individual_mode_deterministic_across_worker_counts(small_zoo, pools):
    s = EvolverSettings(generations=3, seed=1)
    a, pop_a, _ = run(small_zoo, pools, s, workers=1, generations=3)
    b, pop_b, _ = run(small_zoo, pools, s, workers=2, generations=3)
    assert a.to_dict() == b.to_dict()
    assert all(np.array_equal(x, y) for x, y in zip(pop_a, pop_b, strict=True))
    assert a.generation == 3 and len(a.accepted) == 3
    # The population is exactly the replay of the accepted recipes from the initial models.
    inputs, spec = inputs_for(small_zoo)
    current = []
    for m in inputs.members:
        with open_checkpoint(m) as c:
            current.append(flatten(c, spec.layout).as_tensor().clone())
    for accepted in a.accepted:
        old = list(current)
        for d in accepted:
            r = Recipe.from_dict(d)
            current[r.target] = build_offspring(r, old)
    for x, y in zip(current, pop_a, strict=True):
        assert torch.equal(x, torch.from_numpy(y))
    # Selection is strict and fitness only ever rises per individual.
    start = run(small_zoo, pools, s, workers=1, generations=0)[0]
    assert len(start.fitness) == len(a.fitness)
    assert all(f >= f0 for f, f0 in zip(a.fitness, start.fitness, strict=True))
    accepted = {d["target"] for g in a.accepted for d in g}
    assert all(a.fitness[i] > start.fitness[i] for i in accepted)


def test_scored_offspring_weights_are_the_rebuilt_offspring(small_zoo, ray_local):
    """A worker returns the weights it scored only when the fitness beats ``keep_above``, and
    they are exactly what a rebuild gives (not a view of the model the next recipe reuses)."""
    inputs, spec = inputs_for(small_zoo)
    worker = OffspringWorker(spec)
    pop = [worker.load(m) for m in inputs.members]
    r1, r2, r3 = (Recipe(i, ((i + 1) % 3,), 0.5, 0.5, 10 + i) for i in range(3))
    dicts = [
        {**r1.to_dict(), "keep_above": float("-inf")},
        {**r2.to_dict(), "keep_above": float("inf")},
        r3.to_dict(),
    ]
    results, *weights = worker.evaluate_batch(dicts, False, {}, *pop)
    assert [r["kept"] for r in results] == [True, False, False]
    assert weights[1] is None and weights[2] is None
    assert np.array_equal(weights[0], worker.build(r1.to_dict(), *pop))
    assert not np.array_equal(weights[0], worker.build(r3.to_dict(), *pop))
    # A rebuild for the store is built into the worker's model and handed out as its memory
    # (Ray copies it into the store as the call returns): no second model on a CPU worker.
    stored = worker.build_for_store(r1.to_dict(), *pop)
    assert np.array_equal(weights[0], stored)
    assert stored.ctypes.data == worker.segments[0].buffer.data_ptr()
    loaded = worker.load_for_store(inputs.members[2])  # the population's load, likewise
    assert np.array_equal(loaded, pop[2])
    assert loaded.ctypes.data == worker.segments[0].buffer.data_ptr()
    # In merger mode the model is the merge, not the offspring: nothing is returned.
    merger = make_merger("average", spec.layout, len(pop))
    merged = merger.merge([torch.from_numpy(p) for p in pop]).float().numpy()
    context = {"merged": ray.put(merged), "merger": ray.put(merger)}
    results, weights = worker.evaluate_batch(dicts[:1], True, context, *pop)
    assert not results[0]["kept"] and weights is None


def test_worker_fetches_only_changed_population_slots(small_zoo, ray_local):
    """Population refs travel nested in each call; a slot whose ref did not change is the
    tensor the worker already holds, a changed one is the new vector."""
    inputs, spec = inputs_for(small_zoo)
    worker = OffspringWorker(spec)
    arrays = [worker.load(m) for m in inputs.members]
    refs = [ray.put(a) for a in arrays]
    worker.use_context({"population": refs})
    before = list(worker.population)
    changed = arrays[0] + np.ones_like(arrays[0])
    worker.use_context({"population": [ray.put(changed), *refs[1:]]})
    assert all(a is b for a, b in zip(worker.population[1:], before[1:], strict=True))
    assert np.array_equal(worker.population[0].numpy(), changed)
    assert all(np.array_equal(t.numpy(), a) for t, a in zip(before, arrays, strict=True))


def test_dynamic_dealing_and_scored_keeps_match_rebuilds(small_zoo, pools, monkeypatch):
    """Dealing recipes to whichever worker frees first, and keeping the weights as scored
    instead of rebuilding them, give the same run as static dealing with rebuilds."""
    s = EvolverSettings(generations=2, seed=4)
    pool = pools[2]
    original = pool.evaluate_recipes

    def no_hint(*args, **kwargs):
        return original(*args, **{**kwargs, "keep_above": None})

    monkeypatch.setattr(pool, "evaluate_recipes", no_hint)
    rebuilt, pop_rebuilt, _ = run(small_zoo, pools, s, workers=2, generations=2)
    monkeypatch.undo()
    submitted: list[str] = []
    submit = pool.submit
    monkeypatch.setattr(pool, "submit", lambda m, *a: submitted.append(m) or submit(m, *a))
    monkeypatch.setattr(pool, "dealing", "dynamic")
    dynamic, pop_dynamic, _ = run(small_zoo, pools, s, workers=2, generations=2)
    assert sum(len(g) for g in dynamic.accepted) > 0  # some keeps happened ...
    assert "build_for_store" not in submitted  # ... none of them rebuilt the offspring
    assert dynamic.to_dict() == rebuilt.to_dict()
    assert all(np.array_equal(x, y) for x, y in zip(pop_dynamic, pop_rebuilt, strict=True))


def test_resume_matches_uninterrupted_run(small_zoo, pools):
    s = EvolverSettings(generations=3, seed=2)
    full, pop_full, _ = run(small_zoo, pools, s, workers=2, generations=3)
    half, _, _ = run(small_zoo, pools, s, workers=2, generations=2)
    restored = EvolverState.from_dict(half.to_dict())
    resumed, pop_resumed, _ = run(small_zoo, pools, s, workers=2, generations=1, state=restored)
    assert resumed.to_dict() == full.to_dict()
    assert all(np.array_equal(x, y) for x, y in zip(pop_full, pop_resumed, strict=True))


@pytest.mark.parametrize("merger", ["average", "fisher", "regmean"])
def test_merger_mode_improves_monotonically_and_stays_consistent(small_zoo, pools, merger):
    s = EvolverSettings(generations=2, seed=3, merger=merger)
    inputs, _ = inputs_for(small_zoo)
    r = evolver_run(s, inputs, pools[2])
    r.start()
    state = r.strategy.state
    history = [state.merged_fitness]
    for _ in range(2):
        r.step()
        history.append(state.merged_fitness)
    assert history == sorted(history)
    # Incremental updates equal merging the final population from scratch.
    merger_obj = ray.get(r.merger_ref)
    pop = [torch.from_numpy(np.array(ray.get(ref))) for ref in r.refs]
    incremental = torch.from_numpy(np.array(ray.get(r.merged_ref)))
    torch.testing.assert_close(merger_obj.merge(pop), incremental, rtol=1e-4, atol=1e-5)


def crash_once_worker(marker: Path) -> type:
    """A worker class (defined here, so Ray ships it by value) whose process dies in the
    middle of its first batch, as a lost node would."""

    class CrashOnceWorker(OffspringWorker):
        def evaluate_batch(self, recipes, merged, context, *population):
            if recipes and not marker.exists():
                marker.touch()
                super().evaluate_batch(recipes[:1], merged, context, *population)  # some work
                os._exit(1)  # ... then the process dies before answering
            return super().evaluate_batch(recipes, merged, context, *population)

    return CrashOnceWorker


@pytest.mark.parametrize(("merger", "dealing"), [("average", "static"), ("none", "dynamic")])
def test_worker_crash_mid_generation_is_retried_and_nothing_lost(
    small_zoo, pools, ray_local, tmp_path, merger, dealing
):
    from evoray.runlog import RunLog, read_log

    s = EvolverSettings(generations=2, seed=5, merger=merger)
    reference, pop_ref, _ = run(small_zoo, pools, s, workers=2, generations=2)
    inputs, spec = inputs_for(small_zoo)
    marker = tmp_path / "crashed"
    # 0.25 CPU each: the module's other pools hold 1.5 of the 2 CPUs
    crashing = WorkerPool(
        spec, 2, num_cpus=0.25, worker_cls=crash_once_worker(marker), dealing=dealing
    )
    try:
        log = RunLog(tmp_path / "run", run_id="evolver", strategy="evolver")
        r = evolver_run(s, inputs, crashing, run_log=log)
        r.start()
        for _ in range(2):
            r.step()
        state = r.strategy.state
        final = [np.array(ray.get(ref)) for ref in r.refs]
    finally:
        crashing.shutdown()
    assert marker.exists()  # a worker really died mid-batch
    assert state.to_dict() == reference.to_dict()
    assert all(np.array_equal(x, y) for x, y in zip(final, pop_ref, strict=True))
    rows = read_log(tmp_path / "run")
    assert len(rows) == 2 * len(small_zoo.experts)
    assert not rows.duplicated(["generation", "individual"]).any()
