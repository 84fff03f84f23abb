"""Search strategies: pure ask/tell decision logic (no Ray, no weights), one module each.

Adding a strategy: write ``strategies/<name>.py`` with a ``Strategy`` subclass and its settings
dataclass, and register it below. Config files, the runner, the log and the report find it here.
"""

from __future__ import annotations

from importlib import import_module

from evoray.errors import ConfigError
from evoray.strategies.base import Strategy

# name -> "module:class", imported on first use (recipe search pulls in Optuna).
REGISTRY: dict[str, str] = {
    "evolver": "evoray.strategies.evolver:Evolver",
    "kinship_greedy": "evoray.strategies.greedy:KinshipGreedy",
    "recipe_search": "evoray.strategies.recipe:RecipeSearch",
}


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def get_strategy(name: str) -> type[Strategy]:
    """The strategy class registered as ``name``."""
    try:
        module, cls = REGISTRY[name].split(":")
    except KeyError:
        raise ConfigError(f"unknown strategy {name!r}; supported: {', '.join(REGISTRY)}") from None
    return getattr(import_module(module), cls)


__all__ = ["REGISTRY", "Strategy", "get_strategy", "names"]
