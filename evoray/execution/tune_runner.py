"""Ray Tune drives search runs: one trial per run, one Tune iteration per generation.

Every registered strategy runs in the same trainable (``SearchRun``: start, step, final_ref).
Each trial reserves its workers up front (a ``PlacementGroupFactory``: one bundle for the trial
itself, one per worker) so trials that start actors never deadlock the cluster. A trial's
checkpoint is its strategy's state (a few KB), which is all ``Tuner.restore`` needs to
continue: the population is replayed from the initial models. Rows go to the run's Parquet
log, one file per generation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
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
    quiet: bool = False  # trials keep Tune's per-checkpoint INFO lines to themselves


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C stopped the search; Tune saved its state, ``evoray resume RUN_DIR`` continues."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__(str(run_dir))
        self.run_dir = Path(run_dir)


def prepare(
    config: RunConfig, *, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Shared:
    """Resolve models (building the zoo if asked) and the layout, once, on the driver: other
    architectures, vocabularies or a model unfit for the tasks fail here, before Ray starts.
    ``allow_pickle`` / ``trust_remote_code`` are ``evoray run``'s checkpoint safety flags."""
    from evoray.models.pool import ModelPool, zoo_pool

    if config.models.zoo is not None:
        models, tasks = zoo_pool(config.models.zoo)
    else:
        models = ModelPool(
            members=tuple(config.models.members),
            base=config.models.base,
            allow_pickle=allow_pickle,
            trust_remote_code=trust_remote_code,
        )
        tasks = make_task_pool(config.tasks, config.source)
    layout = models.layout()
    models.check_tasks(tasks)
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
            num_devices=ex.devices_per_worker,
            torch_threads=ex.torch_threads,
            allow_pickle=models.allow_pickle,
            trust_remote_code=models.trust_remote_code,
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

    if shared.quiet:  # "Checkpoint successfully created", "Restored on ...": INFO chatter
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
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
    spec = run.pool.spec
    save_vector(ref, run.layout, spec.model_path, trial_dir / "model", summary, spec.allow_pickle)
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


def save_vector(
    ref, layout: Layout, like: str, out_dir: Path, summary: dict, allow_pickle: bool = False
) -> Path:
    """Write a population vector as an HF folder, config and tokenizer from ``like``."""
    from evoray.weights.export import write_flat_model

    return write_flat_model(
        flat_from_ref(ref, layout),
        like,
        out_dir,
        recipe_yaml=json.dumps(summary["settings"], indent=2),
        method=summary["strategy"],
        allow_pickle=allow_pickle,
    )


def _warn_idle_workers(config: RunConfig, members: int) -> None:
    """An Evolver generation has ``offspring_per_member x N`` builds to score: workers beyond
    that wait (reserved, idle)."""
    if config.strategy != "evolver":
        return
    k = config.settings.get("offspring_per_member", 1)
    busy = members * (k if isinstance(k, int) else 1)
    if config.execution.num_workers > busy:
        log.warning(
            "%s: execution.num_workers is %d but a generation scores %d offspring "
            "(%d members x evolver.offspring_per_member %d), so %d workers idle; raise "
            "evolver.offspring_per_member or lower execution.num_workers",
            config.source,
            config.execution.num_workers,
            busy,
            members,
            busy // members,
            config.execution.num_workers - busy,
        )


def check_memory(config: RunConfig, shared: Shared, *, progress: bool = True) -> None:
    """Print the run's memory estimate (``evoray.execution.memory``) and warn when it exceeds
    a node's object store, where Ray would spill the population to disk (slow, not fatal)."""
    import ray

    from evoray.execution.memory import GIB, MemoryModel

    merger = config.settings.get("merger", "none")
    ex = config.execution
    model = MemoryModel.for_run(
        shared.worker.layout,
        len(shared.inputs.members),
        merger=merger if isinstance(merger, str) else "fisher",  # a searched merger: the largest
        has_base=shared.inputs.base is not None,
        device="cuda" if ex.gpus_per_worker > 0 else "cpu",
        merge_inputs=get_strategy(config.strategy).merge_inputs(
            len(shared.inputs.members), shared.inputs.base is not None
        ),
    )
    nodes = [n for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    per_node = -(-ex.num_workers // max(1, len(nodes)))
    if progress:
        print(model.summary(ex.num_workers, per_node), flush=True)
    smallest = min((n["Resources"].get("object_store_memory", 0.0) for n in nodes), default=0.0)
    if 0 < smallest < model.store_peak_bytes:
        log.warning(
            "%s: the population and merger statistics need %.2f GiB of object store per node "
            "(%.2f GiB while a generation's keeps are written) but a node has %.2f GiB, so Ray "
            "will spill to disk; start Ray with a larger --object-store-memory or use fewer "
            "members",
            config.source,
            model.store_bytes / GIB,
            model.store_peak_bytes / GIB,
            smallest / GIB,
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

    from evoray.execution.capacity import check_trial_capacity
    from evoray.execution.node_paths import check_paths_on_nodes, config_paths

    shared = shared or prepare(config)
    ex = config.execution
    check_trial_capacity(  # a request no node can hold would wait forever
        ex.num_workers,
        ex.cpus_per_worker,
        ex.gpus_per_worker,
        ex.max_concurrent_trials,
        source=config.source,
    )
    # Workers read the members, data and run dir on their own nodes: check them there now.
    check_paths_on_nodes(config_paths(config, shared.inputs.models), source=config.source)
    check_memory(config, shared, progress=progress)
    _warn_idle_workers(config, len(shared.inputs.members))
    # The trial itself only waits on workers: an empty head bundle, so 2 workers fit 2 CPUs.
    bundles = [{}] + [
        {"CPU": ex.cpus_per_worker, **({"GPU": ex.gpus_per_worker} if ex.gpus_per_worker else {})}
    ] * ex.num_workers
    quiet = not progress
    shared = replace(shared, quiet=quiet, worker=replace(shared.worker, quiet=quiet))
    trainable = tune.with_resources(
        tune.with_parameters(search_trainable, shared=shared), PlacementGroupFactory(bundles)
    )
    callbacks = [] if progress else [ProgressLine()]
    storage = str(Path(shared.run_dir) / "tune")
    name = config.strategy
    if resume and tune.Tuner.can_restore(str(Path(storage) / name)):
        tuner = tune.Tuner.restore(str(Path(storage) / name), trainable, resume_errored=True)
        run_config = getattr(getattr(tuner, "_local_tuner", None), "_run_config", None)
        if run_config is not None:  # restore takes no callbacks; the progress line is ours
            kept = [c for c in run_config.callbacks or [] if not isinstance(c, ProgressLine)]
            run_config.callbacks = [*kept, *callbacks]
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
                callbacks=callbacks,
            ),
        )
    with _tune_output(quiet=not progress):
        results = tuner.fit()
    summaries = []
    for result in results:
        if result.error:
            raise _user_error(result.error)
        trial_id = (result.metrics or {}).get("trial_id")
        trial = Path(shared.run_dir) / "runs" / str(trial_id)
        if trial_id is None or not (trial / "summary.json").is_file():
            raise RunInterrupted(shared.run_dir)  # Ctrl-C: Tune stopped before the trial ended
        summaries.append(_collect(trial))
    return summaries


def _user_error(error: BaseException) -> BaseException:
    """The EvorayError inside a trial's error (Ray and Tune wrap it), so the CLI prints its
    one line; any other error unchanged."""
    from evoray.errors import EvorayError

    seen = error
    for _ in range(10):
        cause = getattr(seen, "cause", None) or seen.__cause__
        if isinstance(seen, EvorayError) and type(seen).__module__.startswith("evoray"):
            return seen
        if cause is None:
            break
        seen = cause
    return error


class _DropTuneHints(logging.Filter):
    """Tune's hints name its Python API (``Tuner.restore(...)``); evoray prints its own."""

    NOISE = ("Tuner.restore", "Stop signal received", "Trials did not complete")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


@contextlib.contextmanager
def _tune_output(*, quiet: bool) -> Iterator[None]:
    """Tune's driver-side output during ``fit``: its restore hints always replaced by evoray's
    (``evoray resume RUN_DIR``); with ``quiet`` also its tables and INFO/WARNING chatter
    (checkpoint and snapshot messages), errors kept."""
    hints = _DropTuneHints()
    loggers = [logging.getLogger(n) for n in ("ray.tune", "ray.train", "ray.air")]
    levels = [lg.level for lg in loggers]
    env = os.environ.get("RAY_AIR_NEW_OUTPUT")
    for lg in loggers:
        lg.addFilter(hints)
        if quiet:
            lg.setLevel(logging.ERROR)
    if quiet:  # the new output engine prints its config table even at verbose=0
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeFilter(hints)
            lg.setLevel(level)
        if quiet:
            if env is None:
                os.environ.pop("RAY_AIR_NEW_OUTPUT", None)
            else:
                os.environ["RAY_AIR_NEW_OUTPUT"] = env


class ProgressLine(tune.Callback):
    """``-q``'s one progress line: trial, generation out of total, best dev fitness so far.
    Rewritten in place on a terminal, one line per generation otherwise."""

    def __init__(self) -> None:
        self.trials: list[str] = []  # no stream kept: Tune pickles its callbacks

    @property
    def stream(self):
        return sys.stderr

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        strategy = trial.config.get("strategy", "")
        key = get_strategy(strategy).generations_key if strategy else ""
        total = trial.config.get("settings", {}).get(key)
        if trial.trial_id not in self.trials:
            self.trials.append(trial.trial_id)
        best = result.get("best_fitness")
        gen = result.get("generation")
        if gen is None:
            return
        text = (
            f"evoray: trial {self.trials.index(trial.trial_id) + 1} ({trial.trial_id}) "
            f"generation {gen}/{total if total is not None else '?'}"
        )
        if isinstance(best, int | float):
            text += f", best dev fitness {best:.4f}"
        tty = getattr(self.stream, "isatty", lambda: False)()
        self.stream.write(f"\r\033[K{text}" if tty else text + "\n")
        self.stream.flush()

    def on_experiment_end(self, trials, **info) -> None:
        if getattr(self.stream, "isatty", lambda: False)():
            self.stream.write("\n")
            self.stream.flush()


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


def ensure_ray(
    address: str | None = None,
    num_cpus: int | None = None,
    *,
    dashboard: bool = True,
    quiet: bool = False,
    report=print,
) -> str | None:
    """Join a cluster (``RAY_ADDRESS``/``address``) or start a local Ray, with its dashboard
    bound to 127.0.0.1 (not reachable from other machines) unless ``dashboard`` is False;
    ``report`` gets the dashboard's URL.  Returns the URL (None without a dashboard)."""
    if ray.is_initialized():
        return None
    joining = address is not None or bool(os.environ.get("RAY_ADDRESS"))
    kwargs: dict[str, Any] = {"log_to_driver": True}
    if quiet:
        kwargs["logging_level"] = logging.ERROR
    if not joining:  # a cluster's dashboard is the cluster's business
        kwargs.update(include_dashboard=dashboard, num_cpus=num_cpus)
        if dashboard:
            kwargs["dashboard_host"] = "127.0.0.1"
    ray_log = logging.getLogger("ray")
    level = ray_log.level
    if quiet:  # "Started a local Ray instance", token notices: evoray prints the URL itself
        ray_log.setLevel(logging.ERROR)
    try:
        ctx = ray.init(address=address, **kwargs)
    finally:
        ray_log.setLevel(level)
    url = getattr(ctx, "dashboard_url", None)
    if url and (dashboard or joining):
        url = url if "://" in url else f"http://{url}"
        report(f"Ray dashboard: {url}")
        return url
    return None
