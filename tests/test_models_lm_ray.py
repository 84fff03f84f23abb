"""Evolver's merger mode with Fisher / RegMean statistics on a tiny causal-LM population,
through ``SearchRun`` on a local Ray, scored by mean token log-likelihood on a few texts."""

from __future__ import annotations

import time
from pathlib import Path

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
        assert not np.allclose(merger_obj.coef, 1 / 3)
    else:
        assert any(s.name == "lm_head.weight" for s, _ in merger_obj.linear)
    pop = [torch.from_numpy(np.array(ray.get(ref))) for ref in r.refs]
    incremental = torch.from_numpy(np.array(ray.get(r.merged_ref)))
    torch.testing.assert_close(merger_obj.merge(pop), incremental, rtol=1e-4, atol=1e-5)


STRATEGIES = {
    "evolver": {"generations": 1, "seed": 2, "merger": "fisher", "metric": "loglik"},
    "kinship_greedy": {"k": 2, "operator": "slerp", "max_generations": 1, "metric": "loglik"},
    "recipe_search": {"method": "ties", "rounds": 1, "batch_size": 2, "metric": "loglik"},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_every_strategy_runs_on_causal_lms_through_tune(lm_run, tmp_path, strategy: str) -> None:
    """The Tune path end to end on Llama members: the causal-LM members are refused with the
    classification zoo's tasks before Ray work starts; with a log-likelihood task every
    strategy runs, and the exported answer reloads as a causal LM that the flat answer is."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from evoray.config.run_config import RunConfig
    from evoray.errors import ConfigError
    from evoray.execution.tune_runner import prepare, run_search

    models, tasks, pool, _ = lm_run
    data = {
        "strategy": strategy,
        "models": {"base": models.base, "members": list(models.members)},
        strategy: STRATEGIES[strategy],
        "execution": {"num_workers": 1, "stats_examples": 6},
        "output": {"run_dir": str(tmp_path / "run")},
    }
    config = RunConfig.from_dict(data)
    with pytest.raises(ConfigError, match=r"ft0 is a causal LM but task kind 'zoo'"):
        prepare(config)
    shared = _shared_for(config, models, tasks, pool.spec)
    t0 = time.perf_counter()
    (summary,) = run_search(config, shared=shared, progress=False)
    print(f"{strategy} through Tune: {time.perf_counter() - t0:.1f}s")
    assert summary["test"]["test"]["texts"]["loglik"] < 0
    out = Path(summary["trial_dir"]) / "model"
    reloaded = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    assert type(reloaded).__name__ == "LlamaForCausalLM"
    written = load_file(str(out / "model.safetensors"))
    assert set(written) == set(pool.spec.layout.names)  # lm_head included
    score = tasks.evaluate(reloaded, tasks.encode(_tokenizer(out), "test"))
    assert score["texts"]["loglik"] == pytest.approx(summary["test"]["test"]["texts"]["loglik"])
    if strategy == "recipe_search":
        from evoray.config.merge_config import MergeConfig
        from evoray.merge.streaming import merge_to_folder

        trial = Path(summary["trial_dir"])
        again = merge_to_folder(MergeConfig.from_yaml(trial / "recipe.yml"), tmp_path / "again")
        rebuilt = load_file(str(again / "model.safetensors"))
        assert rebuilt.keys() == written.keys()
        for name in written:
            torch.testing.assert_close(written[name], rebuilt[name])


def _tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _shared_for(config, models, tasks, spec):
    from evoray.execution.tune_runner import Shared

    run_dir = config.run_dir.resolve()
    return Shared(
        inputs=RunInputs(
            models, tasks=tasks, stats_examples=6, cache_dir=str(run_dir / "stats-cache")
        ),
        worker=spec,
        num_workers=1,
        cpus_per_worker=1,
        gpus_per_worker=0,
        run_dir=str(run_dir),
    )
