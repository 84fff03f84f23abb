"""Search-run configs (``search_spaces/*.yaml``): which models, which tasks, which strategy,
which hyperparameters to try, and how to execute.

A config names one strategy and its defaults; ``search.grid`` lists values to try for any of the
strategy's settings (one Tune trial per combination); ``search.optuna`` samples them instead.
Every field is checked on load and errors name the file and the field.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from evoray.config.evolve_config import evolve_to_run_dict, is_evolve_config
from evoray.config.reading import check_keys, read_yaml, unknown_key
from evoray.errors import ConfigError
from evoray.strategies import get_strategy
from evoray.strategies import names as strategy_names

# Each registered strategy's settings live in the config section of the same name.
STRATEGIES = strategy_names()
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
        return cls.from_dict(read_yaml(path, "run config"), source=str(path))

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<config>") -> RunConfig:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping at the top level")
        if is_evolve_config(data):  # a mergekit-evolve file: run it as a recipe search
            data = evolve_to_run_dict(data, source)
        check_keys(data, TOP_KEYS, source, "")
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
        search = _section(data, "search", source)
        check_keys(search, ("grid", "optuna"), source, "search.")
        grid = dict(search.get("grid") or {})
        for key, values in grid.items():
            if key not in names:
                _unknown(key, names, source, "search.grid.")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"{source}: search.grid.{key}: expected a non-empty list")
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
        output = _section(data, "output", source)
        check_keys(output, ("run_dir",), source, "output.")
        tasks = _tasks_section(data.get("tasks"), source)
        return cls(
            strategy=strategy,
            models=models_spec,
            tasks=tasks,
            settings=dict(own),
            search=SearchSpec(grid=grid, optuna=optuna),
            execution=ExecutionSpec(**execution),
            run_dir=Path(output.get("run_dir", "runs/evolver")),
            source=source,
        )

    def trial_settings(self) -> list[dict[str, Any]]:
        """The strategy settings of every grid trial (defaults merged with each combination)."""
        return [{**self.settings, **combo} for combo in (_grid(self.search.grid) or [{}])]

    def make_settings(self, values: dict[str, Any]) -> Any:
        """The strategy's settings object from a trial's values."""
        return get_strategy(self.strategy).make_settings(values)


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
