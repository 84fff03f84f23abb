"""Ray Tune drives search runs: one trial per run, one Tune iteration per generation.

All strategies (Evolver, kinship-guided greedy merging, recipe search) share one trainable: a
run object with ``start(state)``, ``step(state)``, ``final_ref(state)`` and ``test_scores``.

Each trial reserves its workers up front (a ``PlacementGroupFactory``: one bundle for the trial
itself, one per worker) so trials that start actors never deadlock the cluster. A trial's
checkpoint is its ``EvolverState`` (fitness and accepted recipes, a few KB), which is all
``Tuner.restore`` needs to continue: the population is replayed from the initial models.
Per-offspring rows go to the run's Parquet log, one file per generation.
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
from typing import Any, ClassVar

import ray
from ray import tune

from evoray.evaluation import mean_score
from evoray.evolution.evolver import EvolverState
from evoray.execution.evolver_run import EvolverRun
from evoray.execution.monitoring import RunMetrics
from evoray.execution.pool import WorkerPool, flat_from_ref
from evoray.execution.search_run import RunInputs
from evoray.execution.worker import TaskSpec, WorkerSpec
from evoray.layout import Layout
from evoray.run_config import RunConfig

log = logging.getLogger(__name__)
STATE_FILE = "evolver_state.json"


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


def prepare(config: RunConfig, *, allow_pickle: bool = False) -> Shared:
    """Resolve models (building the zoo if asked) and the layout, once, on the driver.
    ``allow_pickle`` lets members and base be pickle (.bin/.pt) checkpoints."""
    from evoray.checkpoint import open_checkpoint

    tasks = TaskSpec(**config.tasks) if config.tasks.get("kind", "zoo") != "zoo" else None
    member_tasks = None
    if config.models.zoo is not None:
        from evoray.zoo import ZooSpec, build_zoo

        zoo_args = dict(config.models.zoo)
        root = zoo_args.pop("root", None)
        zoo = build_zoo(root, ZooSpec(**zoo_args))
        # absolute: Tune runs each trial in a working directory of its own
        members = tuple(os.path.abspath(p) for p in zoo.experts.values())
        base = os.path.abspath(zoo.base)
        member_tasks = tuple(zoo.experts)
        tasks = TaskSpec(
            kind="zoo", seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood
        )
    else:
        members, base = config.models.members, config.models.base
        tasks = tasks or TaskSpec(**config.tasks)
    with open_checkpoint(members[0], allow_pickle=allow_pickle) as first:
        layout = Layout.from_checkpoint(first)
    for m in [*members[1:], *([base] if base else [])]:
        with open_checkpoint(m, allow_pickle=allow_pickle) as ckpt:
            layout.check(ckpt)
    ex = config.execution
    run_dir = config.run_dir.resolve()
    return Shared(
        inputs=RunInputs(
            members=tuple(members),
            base=base,
            tasks=tasks,
            member_tasks=member_tasks,
            stats_examples=ex.stats_examples,
            cache_dir=str(run_dir / "stats-cache"),
            allow_pickle=allow_pickle,
        ),
        worker=WorkerSpec(
            model_path=members[0],
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


def _make_run(strategy: str, values: dict[str, Any], shared: Shared, pool, run_log, name):
    """The run object and state class of a strategy (same start/step/final_ref interface)."""
    from evoray.run_config import settings_class

    settings = settings_class(strategy)(**values)
    if strategy == "evolver":
        return EvolverRun(settings, shared.inputs, pool, run_log=run_log, run_id=name), EvolverState
    if strategy == "kinship_greedy":
        from evoray.evolution.greedy import GreedyState
        from evoray.execution.greedy_run import GreedyRun

        return GreedyRun(settings, shared.inputs, pool, run_log=run_log, run_id=name), GreedyState
    from evoray.execution.recipe_run import RecipeRun, RecipeState

    return RecipeRun(settings, shared.inputs, pool, run_log=run_log, run_id=name), RecipeState


def search_trainable(config: dict[str, Any], shared: Shared) -> None:
    """One search run (any strategy) as a Tune trial: one Tune iteration per generation."""
    from evoray.run_config import _tuples
    from evoray.runlog import RunLog

    if shared.quiet:  # "Checkpoint successfully created", "Restored on ...": INFO chatter
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        logging.getLogger("ray.tune").setLevel(logging.WARNING)
    strategy = config["strategy"]
    values = _tuples(config["settings"])
    name = tune.get_context().get_trial_id() or strategy
    trial_dir = Path(shared.run_dir) / "runs" / name
    pool = WorkerPool(
        shared.worker,
        shared.num_workers,
        num_cpus=shared.cpus_per_worker,
        num_gpus=shared.gpus_per_worker,
    )
    run_log = RunLog(trial_dir, run_id=name, strategy=strategy)
    run, state_cls = _make_run(strategy, values, shared, pool, run_log, name)
    live = RunMetrics(name, strategy)
    state = None
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = state_cls.from_dict(json.loads((Path(d) / STATE_FILE).read_text()))
    resumed = state is not None
    state = run.start(state)
    if not resumed:
        trial_dir.mkdir(parents=True, exist_ok=True)
        initial: dict[str, Any] = {}
        if strategy == "evolver":
            initial = {"fitness": state.fitness, "merged_fitness": state.merged_fitness}
            if run.settings.merger_mode:
                initial["merged_scores"] = run.test_scores(run.merged_ref)
        elif strategy == "kinship_greedy":
            initial = {"fitness": [c.fitness for c in state.candidates]}
        (trial_dir / "initial.json").write_text(json.dumps(initial, indent=2))
    reported = False
    while not state.done:
        _maybe_fail_for_test(shared, trial_dir, _generation(state))
        metrics = run.step(state)
        live.update(metrics)
        if state.done:
            metrics.update(_finish(run, state, trial_dir))
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / STATE_FILE).write_text(json.dumps(state.to_dict()))
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        reported = True
    if not reported:  # nothing to run (e.g. generations: 0), or restored after the last one
        tune.report(_finish(run, state, trial_dir))
    pool.shutdown()


def _generation(state) -> int:
    return getattr(state, "generation", getattr(state, "round", 0))


def _maybe_fail_for_test(shared: Shared, trial_dir: Path, generation: int) -> None:
    """Fault injection for tests: crash once when generation N is about to run."""
    marker = trial_dir / "failed-once"
    if shared.fail_once_at_generation == generation and not marker.exists():
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()
        raise RuntimeError(f"injected failure before generation {generation}")


def _finish(run, state, trial_dir: Path) -> dict:
    """Test scores of the run's answer, the answer as an HF folder, and a summary."""
    ref = run.final_ref(state)
    scores = run.test_scores(ref)
    summary = {
        "strategy": run.strategy,
        "settings": asdict(run.settings),
        "generations": _generation(state),
        "best_dev_fitness": state.best_fitness,
        "evaluations": _evaluations(run, state),
        "test": scores,
    }
    if hasattr(run, "mergekit_yaml"):
        summary["mergekit_yaml"] = run.mergekit_yaml(state)
        (trial_dir / "recipe.yml").write_text(summary["mergekit_yaml"])
    save_vector(
        ref,
        run.layout,
        run.pool.spec.model_path,
        trial_dir / "model",
        summary,
        allow_pickle=run.inputs.allow_pickle,
    )
    (trial_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return {"test_mean": _mean(scores["test"]), "ood_mean": _mean(scores.get("ood", {}))}


def _evaluations(run, state) -> int:
    """Dev evaluations a run used (the budget the strategies are compared on)."""
    if run.strategy == "evolver":
        n = state.pop_size
        return n * (state.generation + 1) + (1 if run.settings.merger_mode else 0)
    if run.strategy == "kinship_greedy":
        return len(state.candidates)
    return len(state.trials)


def _mean(scores: dict[str, dict[str, float]], metric: str = "accuracy") -> float | None:
    return mean_score(scores, metric) if scores else None


def save_vector(
    ref, layout: Layout, like: str, out_dir: Path, summary: dict, *, allow_pickle: bool = False
) -> Path:
    """Write a population vector as an HF folder, config and tokenizer from ``like``."""
    from evoray.checkpoint import open_checkpoint
    from evoray.export import ModelFolderWriter

    flat = flat_from_ref(ref, layout)
    with (
        open_checkpoint(like, allow_pickle=allow_pickle) as ckpt,
        ModelFolderWriter(out_dir, overwrite=True) as w,
    ):
        for name in ckpt.names():
            w.add(name, flat.tensor(name) if name in layout._by_name else ckpt.get(name))
        w.copy_support_files(ckpt.folder, dtype=layout.storage_dtype)
        w.write_card(
            recipe_yaml=json.dumps(summary["settings"], indent=2),
            base_model=None,
            models=[],
            method="evolver",
        )
        return w.commit()


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

    shared = shared or prepare(config)
    ex = config.execution
    check_trial_capacity(  # a request no node can hold would wait forever
        ex.num_workers,
        ex.cpus_per_worker,
        ex.gpus_per_worker,
        ex.max_concurrent_trials,
        source=config.source,
    )
    # The trial itself only waits on workers: an empty head bundle, so 2 workers fit 2 CPUs.
    bundles = [{}] + [
        {"CPU": ex.cpus_per_worker, **({"GPU": ex.gpus_per_worker} if ex.gpus_per_worker else {})}
    ] * ex.num_workers
    shared = replace(shared, quiet=not progress)
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

    TOTAL_KEY: ClassVar[dict[str, str]] = {
        "evolver": "generations",
        "kinship_greedy": "max_generations",
    }

    def __init__(self) -> None:
        self.trials: list[str] = []  # no stream kept: Tune pickles its callbacks

    @property
    def stream(self):
        return sys.stderr

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        strategy = trial.config.get("strategy", "")
        total = trial.config.get("settings", {}).get(self.TOTAL_KEY.get(strategy, "rounds"))
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
