"""Ray Tune drives search runs: one trial per run, one Tune iteration per generation.

Every registered strategy runs in the same trainable (``SearchRun``: start, step, final_ref).
Each trial reserves its workers up front (a ``PlacementGroupFactory``: one bundle for the trial
itself, one per worker) so trials that start actors never deadlock the cluster. A trial's
checkpoint is its strategy's state (a few KB), which is all ``Tuner.restore`` needs to
continue: the population is replayed from the initial models. Rows go to the run's Parquet
log, one file per generation.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray
from ray import tune

from evoray.config.run_config import RunConfig
from evoray.execution.monitoring import RunMetrics
from evoray.execution.pool import WorkerPool, flat_from_ref
from evoray.execution.population import RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import WorkerSpec
from evoray.strategies import get_strategy
from evoray.strategies.base import Problem
from evoray.tasks.evaluation import mean_score
from evoray.tasks.pool import make_task_pool
from evoray.weights.layers import num_layers
from evoray.weights.layout import Layout

log = logging.getLogger(__name__)
STATE_FILE = "strategy_state.json"


@dataclass(frozen=True)
class Shared:
    """What every trial of a search gets, besides its own hyperparameters."""

    inputs: RunInputs
    worker: WorkerSpec
    num_workers: int
    cpus_per_worker: float
    gpus_per_worker: float
    run_dir: str
    fail_once_at_generation: int | None = None  # fault injection for tests of restore


def prepare(config: RunConfig) -> Shared:
    """Resolve models (building the zoo if asked) and the layout, once, on the driver."""
    from evoray.models.pool import ModelPool, zoo_pool

    if config.models.zoo is not None:
        models, tasks = zoo_pool(config.models.zoo)
    else:
        models = ModelPool(members=tuple(config.models.members), base=config.models.base)
        tasks = make_task_pool(config.tasks, config.source)
    layout = models.layout()
    ex = config.execution
    run_dir = config.run_dir.resolve()
    return Shared(
        inputs=RunInputs(
            models=models,
            tasks=tasks,
            stats_examples=ex.stats_examples,
            cache_dir=str(run_dir / "stats-cache"),
        ),
        worker=WorkerSpec(
            model_path=models.members[0],
            layout=layout,
            tasks=tasks,
            device="cuda" if ex.gpus_per_worker > 0 else "cpu",
            torch_threads=ex.torch_threads,
        ),
        num_workers=ex.num_workers,
        cpus_per_worker=ex.cpus_per_worker,
        gpus_per_worker=ex.gpus_per_worker,
        run_dir=str(run_dir),
    )


def make_run(
    strategy: str, values: dict[str, Any], shared: Shared, pool, run_log=None, name=None
) -> SearchRun:
    """A search run of the registered ``strategy`` with these settings."""
    cls = get_strategy(strategy)
    inputs = shared.inputs
    problem = Problem(
        n_members=len(inputs.members),
        has_base=inputs.base is not None,
        members=inputs.members,
        base=inputs.base,
        n_layers=num_layers(None, shared.worker.layout.names),
    )
    return SearchRun(
        cls(cls.make_settings(values), problem), inputs, pool, run_log=run_log, run_id=name
    )


def search_trainable(config: dict[str, Any], shared: Shared) -> None:
    """One search run (any strategy) as a Tune trial: one Tune iteration per generation."""
    from evoray.runlog import RunLog

    strategy = config["strategy"]
    name = tune.get_context().get_trial_id() or strategy
    trial_dir = Path(shared.run_dir) / "runs" / name
    pool = WorkerPool(
        shared.worker,
        shared.num_workers,
        num_cpus=shared.cpus_per_worker,
        num_gpus=shared.gpus_per_worker,
    )
    run_log = RunLog(trial_dir, run_id=name, strategy=strategy)
    run = make_run(strategy, config["settings"], shared, pool, run_log, name)
    live = RunMetrics(name, strategy)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = json.loads((Path(d) / STATE_FILE).read_text())
    resumed = run.start(state)
    if not resumed:
        trial_dir.mkdir(parents=True, exist_ok=True)
        initial, builds = run.strategy.initial()
        for key, build in builds.items():
            initial[key] = run.test_scores(run.population.materialize(build))
        (trial_dir / "initial.json").write_text(json.dumps(initial, indent=2))
    reported = False
    while not run.strategy.done:
        _maybe_fail_for_test(shared, trial_dir, run.strategy.generations_done)
        metrics = run.step()
        live.update(metrics)
        if run.strategy.done:
            metrics.update(_finish(run, trial_dir))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / STATE_FILE).write_text(json.dumps(run.strategy.get_state()))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        reported = True
    if not reported:  # nothing to run (e.g. generations: 0), or restored after the last one
        tune.report(_finish(run, trial_dir))
    pool.shutdown()


def _maybe_fail_for_test(shared: Shared, trial_dir: Path, generation: int) -> None:
    """Fault injection for tests: crash once when generation N is about to run."""
    marker = trial_dir / "failed-once"
    if shared.fail_once_at_generation == generation and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected failure before generation {generation}")


def _finish(run: SearchRun, trial_dir: Path) -> dict:
    """Test scores of the run's answer, the answer as an HF folder, and a summary."""
    strategy = run.strategy
    ref = run.final_ref()
    scores = run.test_scores(ref)
    summary = {
        "strategy": strategy.name,
        "settings": asdict(strategy.settings),
        "generations": strategy.generations_done,
        "best_dev_fitness": strategy.best_fitness,
        "evaluations": strategy.evaluations,
        "test": scores,
    }
    recipe = strategy.mergekit_yaml()
    if recipe is not None:
        summary["mergekit_yaml"] = recipe
        (trial_dir / "recipe.yml").write_text(recipe)
    save_vector(ref, run.layout, run.pool.spec.model_path, trial_dir / "model", summary)
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    tasks = run.pool.spec.tasks
    return {
        "test_mean": _mean(scores["test"], pool=tasks),
        "ood_mean": _mean(scores.get("ood", {}), pool=tasks),
    }


def _mean(
    scores: dict[str, dict[str, float]], metric: str = "accuracy", pool: Any = None
) -> float | None:
    """Test fitness: the task pool's weighted per-task metrics (``TaskPool.fitness``)."""
    if not scores:
        return None
    return pool.fitness(scores) if pool is not None else mean_score(scores, metric)


def save_vector(ref, layout: Layout, like: str, out_dir: Path, summary: dict) -> Path:
    """Write a population vector as an HF folder, config and tokenizer from ``like``."""
    from evoray.weights.export import write_flat_model

    return write_flat_model(
        flat_from_ref(ref, layout),
        like,
        out_dir,
        recipe_yaml=json.dumps(summary["settings"], indent=2),
        method=summary["strategy"],
    )


def run_search(
    config: RunConfig,
    *,
    shared: Shared | None = None,
    resume: bool = False,
    progress: bool = True,
) -> list[dict]:
    """Run every trial of a search config under Tune; returns the trials' summaries."""
    from ray.tune import PlacementGroupFactory

    shared = shared or prepare(config)
    ex = config.execution
    # The trial itself only waits on workers: an empty head bundle, so 2 workers fit 2 CPUs.
    bundles = [{}] + [
        {"CPU": ex.cpus_per_worker, **({"GPU": ex.gpus_per_worker} if ex.gpus_per_worker else {})}
    ] * ex.num_workers
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, shared=shared), PlacementGroupFactory(bundles)
    )
    storage = str(Path(shared.run_dir) / "tune")
    name = config.strategy
    if resume and tune.Tuner.can_restore(str(Path(storage) / name)):
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable, resume_errored=True)
    else:
        param_space, tune_config = _search_space(config)
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune_config,
            run_config=tune.RunConfig(
                name=name,
                storage_path=storage,
                verbose=1 if progress else 0,
                checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
                failure_config=tune.FailureConfig(max_failures=2),
            ),
        )
    results = tuner.fit()
    summaries = []
    for result in results:
        if result.error:
            raise result.error
        trial = Path(shared.run_dir) / "runs" / result.metrics["trial_id"]
        summaries.append(_collect(trial))
    return summaries


def _search_space(config: RunConfig):
    ex = config.execution
    grid = {k: tune.grid_search(v) for k, v in config.search.grid.items()}
    settings = {**config.settings, **grid}
    tune_config = tune.TuneConfig(max_concurrent_trials=ex.max_concurrent_trials)
    opt = config.search.optuna
    if opt:
        from ray.tune.search.optuna import OptunaSearch

        space = {k: tune.uniform(lo, hi) for k, (lo, hi) in opt.get("space", {}).items()}
        settings.update(space)
        tune_config = tune.TuneConfig(
            search_alg=OptunaSearch(metric="best_fitness", mode="max", seed=opt.get("seed", 0)),
            num_samples=opt.get("num_samples", 4),
            max_concurrent_trials=ex.max_concurrent_trials,
        )
    return {"strategy": config.strategy, "settings": settings}, tune_config


def _collect(trial_dir: Path) -> dict:
    summary = json.loads((trial_dir / "summary.json").read_text())
    initial = trial_dir / "initial.json"
    if initial.is_file():
        summary["initial"] = json.loads(initial.read_text())
    summary["trial"] = trial_dir.name
    summary["trial_dir"] = str(trial_dir)
    return summary


def ensure_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join a cluster (``RAY_ADDRESS``/``address``) or start a local Ray."""
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=num_cpus, include_dashboard=False, log_to_driver=True)
