"""Search-run configs (``search_spaces/*.yaml``): which models, which tasks, which strategy,
which hyperparameters to try, and how to execute.

A config names one strategy and its defaults; ``search.grid`` lists values to try for any of the
strategy's settings (one Tune trial per combination); ``search.optuna`` samples them instead.
Every field is checked on load and errors name the file and the field.
"""

from __future__ import annotations

import os
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from evoray.config.evolve_config import evolve_to_run_dict, is_evolve_config
from evoray.config.reading import check_keys, read_yaml, unknown_key
from evoray.errors import ConfigError
from evoray.strategies import get_strategy
from evoray.strategies import names as strategy_names
from evoray.typecheck import check_fields, check_value

# Each registered strategy's settings live in the config section of the same name.
STRATEGIES = strategy_names()
DEFAULT_RUN_DIR = "runs/evolver"
TOP_KEYS = ("strategy", "models", "tasks", *STRATEGIES, "search", "execution", "output")


@dataclass(frozen=True)
class ModelsSpec:
    """Either the embedded zoo (``zoo: {seed, n_domains}``) or explicit base + members."""

    zoo: dict[str, Any] | None = None
    base: str | None = None
    members: tuple[str, ...] = ()


@dataclass(frozen=True)
class ExecutionSpec:
    num_workers: int = 2
    cpus_per_worker: float = 1
    gpus_per_worker: float = 0
    max_concurrent_trials: int = 1
    torch_threads: int | None = 1
    stats_examples: int = 256

    def __post_init__(self) -> None:
        """Ranges Ray would otherwise reject mid-run (or wait on forever)."""
        for name in ("num_workers", "max_concurrent_trials", "stats_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"execution.{name} must be >= 1, got {getattr(self, name)}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(
                f"execution.torch_threads must be >= 1 or null, got {self.torch_threads}"
            )
        if not self.cpus_per_worker > 0:
            raise ValueError(f"execution.cpus_per_worker must be > 0, got {self.cpus_per_worker}")
        if self.gpus_per_worker < 0:
            raise ValueError(f"execution.gpus_per_worker must be >= 0, got {self.gpus_per_worker}")
        for name in ("cpus_per_worker", "gpus_per_worker"):
            value = getattr(self, name)
            if value > 1 and value != int(value):  # Ray's rule for resource amounts
                raise ValueError(
                    f"execution.{name}: Ray takes fractions only below 1; got {value:g}, "
                    "use a whole number"
                )

    @property
    def devices_per_worker(self) -> int:
        """GPUs one worker spreads its model over: ``gpus_per_worker`` when 2 or more; a
        fraction or 1 means one device (a fraction shares it with other workers)."""
        return int(self.gpus_per_worker) if self.gpus_per_worker >= 2 else 1


@dataclass(frozen=True)
class SearchSpec:
    grid: dict[str, list[Any]] = field(default_factory=dict)
    optuna: dict[str, Any] | None = None


@dataclass(frozen=True)
class RunConfig:
    strategy: str
    models: ModelsSpec
    tasks: dict[str, Any] | list[dict[str, Any]]  # legacy {kind: zoo, ...} or task entries
    settings: dict[str, Any]  # the strategy's section
    search: SearchSpec
    execution: ExecutionSpec
    run_dir: Path
    source: str = "<config>"

    @classmethod
    def from_yaml(cls, path: str | Path) -> RunConfig:
        data = read_yaml(path, "run config")
        return cls.from_dict(data, source=str(path), config_dir=Path(path).parent)

    @classmethod
    def from_dict(
        cls,
        data: Any,
        *,
        source: str = "<config>",
        cwd: str | Path | None = None,
        config_dir: str | Path | None = None,
    ) -> RunConfig:
        """Check ``data`` and resolve its relative paths against ``cwd`` (default: the current
        directory): Tune runs each trial in a working directory of its own."""
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        if is_evolve_config(data):  # a mergekit-evolve file: run it as a recipe search
            data = evolve_to_run_dict(data, source)
        check_keys(data, TOP_KEYS, source, "")
        data = resolve_paths(data, cwd, config_dir=config_dir)
        strategy = data.get("strategy", "evolver")
        if strategy not in STRATEGIES:
            raise ConfigError(
                f"{source}: strategy: unknown {strategy!r}; supported: {', '.join(STRATEGIES)}"
            )
        for other in STRATEGIES:
            if other != strategy and other in data:
                raise ConfigError(
                    f"{source}: '{other}' settings given but strategy is {strategy!r}"
                )
        models = _section(data, "models", source)
        check_keys(models, ("zoo", "base", "members"), source, "models.")
        if "zoo" in models and ("members" in models or "base" in models):
            raise ConfigError(f"{source}: models: give either 'zoo' or 'base' + 'members'")
        if "zoo" not in models and len(models.get("members") or []) < 2:
            raise ConfigError(
                f"{source}: models.members: list at least 2 fine-tuned models (or use 'zoo: {{}}')"
            )
        if "zoo" in models:
            _check_zoo(models["zoo"], source)
        if models.get("base") is not None:
            check_value(models["base"], str, "models.base", source)
        if "members" in models:
            check_value(models["members"], list[str], "models.members", source)
        models_spec = ModelsSpec(
            zoo=dict(models["zoo"] or {}) if "zoo" in models else None,
            base=models.get("base"),
            members=tuple(models.get("members") or ()),
        )
        strat = get_strategy(strategy)
        cls_ = strat.settings_cls
        own = _section(data, strategy, source)
        names = [f.name for f in fields(cls_)]
        check_keys(own, names, source, f"{strategy}.")
        check_fields(cls_, own, f"{strategy}.", source)
        search = _section(data, "search", source)
        check_keys(search, ("grid", "optuna"), source, "search.")
        grid = dict(search.get("grid") or {})
        hints = typing.get_type_hints(cls_)
        for key, values in grid.items():
            if key not in names:
                _unknown(key, names, source, "search.grid.")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: search.grid.{key}: expected a non-empty list")
            for i, value in enumerate(values):
                check_value(value, hints[key], f"search.grid.{key}[{i}]", source)
        optuna = search.get("optuna")
        if optuna is not None:
            _check_optuna(optuna, strat.searchable, source)
        for combo in _grid(grid) or [{}]:
            try:
                strat.make_settings({**own, **combo})
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{source}: {strategy}: {exc}") from None
        execution = _section(data, "execution", source)
        exec_names = [f.name for f in fields(ExecutionSpec)]
        check_keys(execution, exec_names, source, "execution.")
        check_fields(ExecutionSpec, execution, "execution.", source)
        try:
            execution_spec = ExecutionSpec(**execution)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        output = _section(data, "output", source)
        check_keys(output, ("run_dir",), source, "output.")
        if "run_dir" in output:
            check_value(output["run_dir"], str, "output.run_dir", source)
        tasks = _tasks_section(data.get("tasks"), source)
        pool = None
        if isinstance(tasks, list):  # files and fields checked now, before Ray starts
            from evoray.tasks.pool import make_task_pool

            pool = make_task_pool(tasks, source)
        else:
            _check_tasks(tasks, source)
        if pool is not None and any({**own, **c}.get("racing") for c in _grid(grid) or [{}]):
            problems = pool.racing_problems()
            if problems:
                raise ConfigError(
                    f"{source}: {strategy}.racing: racing bounds only means of per-example "
                    f"scores in [0, 1] (accuracy, exact_match), but {'; '.join(problems)}. "
                    "Set racing: false, or score those tasks with such a metric"
                )
        return cls(
            strategy=strategy,
            models=models_spec,
            tasks=tasks,
            settings=dict(own),
            search=SearchSpec(grid=grid, optuna=optuna),
            execution=execution_spec,
            run_dir=Path(
                output.get("run_dir") or _abspath(DEFAULT_RUN_DIR, Path(cwd or Path.cwd()))
            ),
            source=source,
        )

    def trial_settings(self) -> list[dict[str, Any]]:
        """The strategy settings of every grid trial (defaults merged with each combination)."""
        return [{**self.settings, **combo} for combo in (_grid(self.search.grid) or [{}])]

    def make_settings(self, values: dict[str, Any]) -> Any:
        """The strategy's settings object from a trial's values."""
        return get_strategy(self.strategy).make_settings(values)


def resolve_paths(
    data: Mapping[str, Any],
    cwd: str | Path | None = None,
    *,
    config_dir: str | Path | None = None,
) -> dict[str, Any]:
    """A copy of a raw run config whose local paths are absolute, against ``cwd`` (default:
    the current directory): ``models.base``, ``models.members``, ``models.zoo.root`` and
    ``output.run_dir``; and the data paths of a ``tasks:`` list against ``config_dir`` (the
    config file's folder, as merge configs and lm-eval include paths are). A member that is
    not a local path (a hub id ``org/name``) stays as given. Values of the wrong type are
    left for the field checks to name."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    out = dict(data)
    if isinstance(out.get("tasks"), list):
        from evoray.tasks.pool import resolve_task_paths

        tasks_dir = Path(config_dir) if config_dir is not None else base
        out["tasks"] = resolve_task_paths(out["tasks"], tasks_dir.resolve())
    models = out.get("models")
    if isinstance(models, Mapping):
        models = out["models"] = dict(models)
        if isinstance(models.get("base"), str):
            models["base"] = _model_path(models["base"], base)
        if isinstance(models.get("members"), list):
            models["members"] = [
                _model_path(m, base) if isinstance(m, str) else m for m in models["members"]
            ]
        zoo = models.get("zoo")
        if isinstance(zoo, Mapping) and isinstance(zoo.get("root"), str):
            models["zoo"] = {**zoo, "root": _abspath(zoo["root"], base)}
    output = out.get("output")
    if isinstance(output, Mapping) and isinstance(output.get("run_dir"), str):
        out["output"] = {**output, "run_dir": _abspath(output["run_dir"], base)}
    return out


def _abspath(text: str, base: Path) -> str:
    path = Path(text).expanduser()
    return os.path.normpath(path if path.is_absolute() else base / path)


def _model_path(text: str, base: Path) -> str:
    """A local model path made absolute; a hub id (``org/name``, no such local path) kept."""
    from evoray.weights.sources import _looks_like_path

    local = Path(text).expanduser()
    if local.is_absolute() or (base / local).exists() or _looks_like_path(text):
        return _abspath(text, base)
    return text


def _check_tasks(tasks: dict, source: str) -> None:
    """``tasks``: a registered task kind and that kind's fields."""
    from evoray.tasks.pool import TASK_KINDS

    kind = tasks.get("kind", "zoo")
    if kind not in TASK_KINDS:
        raise ConfigError(f"{source}: tasks.kind: unknown {kind!r}; supported: {list(TASK_KINDS)}")
    cls = TASK_KINDS[kind]
    check_keys(tasks, ["kind", *(f.name for f in fields(cls))], source, "tasks.")
    check_fields(cls, {k: v for k, v in tasks.items() if k != "kind"}, "tasks.", source)


def _check_zoo(zoo: Any, source: str) -> None:
    """``models.zoo``: ``kind`` (classifier or causal_lm), ``root`` (where to build it) plus
    the fields of that zoo's spec."""
    from evoray.models.lm_zoo import LMZooSpec
    from evoray.models.zoo import ZooSpec

    if zoo is None:
        return
    if not isinstance(zoo, Mapping):
        raise ConfigError(f"{source}: models.zoo: expected a mapping (or {{}} for the defaults)")
    specs = {"classifier": ZooSpec, "causal_lm": LMZooSpec}
    kind = zoo.get("kind", "classifier")
    if kind not in specs:
        raise ConfigError(
            f"{source}: models.zoo.kind: unknown {kind!r}; supported: {', '.join(specs)}"
        )
    spec = specs[kind]
    names = ["kind", "root", *(f.name for f in fields(spec))]
    check_keys(zoo, names, source, "models.zoo.")
    if zoo.get("root") is not None:
        check_value(zoo["root"], str, "models.zoo.root", source)
    check_fields(spec, {k: v for k, v in zoo.items() if k != "kind"}, "models.zoo.", source)


def _check_optuna(optuna: Any, searchable: tuple[str, ...], source: str) -> None:
    """``search.optuna``: {num_samples, seed, space: {setting: [low, high]}} (uniform ranges)."""
    if not isinstance(optuna, Mapping):
        raise ConfigError(f"{source}: search.optuna: expected a mapping")
    check_keys(optuna, ("num_samples", "seed", "space"), source, "search.optuna.")
    n = optuna.get("num_samples", 4)
    if not isinstance(n, int) or n < 1:
        raise ConfigError(f"{source}: search.optuna.num_samples: expected a positive integer")
    space = optuna.get("space")
    if not isinstance(space, Mapping) or not space:
        raise ConfigError(f"{source}: search.optuna.space: map settings to [low, high] ranges")
    for key, rng in space.items():
        if key not in searchable:
            raise ConfigError(
                f"{source}: search.optuna.space.{key}: only numeric settings are searched "
                f"({', '.join(searchable)})"
            )
        ok = isinstance(rng, list) and len(rng) == 2
        if not ok or not all(isinstance(v, int | float) for v in rng) or rng[0] >= rng[1]:
            raise ConfigError(
                f"{source}: search.optuna.space.{key}: expected [low, high] with low < high"
            )


def _grid(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    combos: list[dict[str, Any]] = [{}]
    for key, values in grid.items():
        combos = [{**c, key: v} for c in combos for v in values]
    return combos if grid else []


def _tasks_section(value: Any, source: str) -> dict[str, Any] | list[dict[str, Any]]:
    """``tasks:``: the legacy mapping (``{kind: zoo, ...}``) or a list of task entries, each
    checked by ``make_task_pool`` when the run starts."""
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{source}: tasks: list at least one task")
        for i, entry in enumerate(value):
            if not isinstance(entry, Mapping):
                raise ConfigError(f"{source}: tasks[{i}]: expected a mapping (name, kind, ...)")
        return [dict(entry) for entry in value]
    return _section({"tasks": value}, "tasks", source) or {"kind": "zoo"}


def _section(data: Mapping, key: str, source: str) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{source}: {key}: expected a mapping")
    return dict(value)


def _unknown(key: str, allowed, source: str, prefix: str) -> None:
    raise unknown_key(key, allowed, f"{source}: unknown key '{prefix}{key}'")
