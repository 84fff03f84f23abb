"""mergekit-evolve configs, read as evoray recipe searches.

mergekit-evolve (deprecated in mergekit) takes ``genome:`` (models, merge_method, base_model,
layer_granularity, allow_negative_weights, ...) and ``tasks:`` (lm-eval task names, or
``{name, weight, metric}``). ``evoray run`` accepts that file as it is and runs it as
``strategy: recipe_search`` over the same method's per-model weights (and densities), scored by
the same lm-eval tasks; the best recipe is written as a mergekit YAML (``recipe.yml``) that
``evoray merge`` reproduces. What mergekit-evolve sets on its command line (``--task-search-path``,
storage, Ray) goes in an optional ``evoray:`` section, which mergekit-evolve itself ignores.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from evoray.config.reading import check_keys
from evoray.errors import ConfigError

log = logging.getLogger(__name__)

GENOME_KEYS = (
    "models",
    "merge_method",
    "base_model",
    "tokenizer_source",
    "layer_granularity",
    "normalize",
    "allow_negative_weights",
    "filters",
    "smooth",
)
TOP_KEYS = (
    "genome",
    "tasks",
    "limit",
    "num_fewshot",
    "shuffle",
    "random_init",
    "apply_chat_template",
    "fewshot_as_multiturn",
    "evoray",
)
EVORAY_KEYS = ("recipe_search", "execution", "output", "include_path", "splits")
# mergekit-evolve's methods (METHOD_PARAM_MAPS) that recipe search can search.
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties")
DEFAULT_METRIC = "acc,none"  # mergekit-evolve's TaskConfiguration default


def is_evolve_config(data: Any) -> bool:
    """A mergekit-evolve file: ``genome`` and ``tasks`` at the top, no evoray ``strategy``."""
    return isinstance(data, Mapping) and "genome" in data and "strategy" not in data


def _metric(value: Any, where: str) -> str:
    """lm-eval's ``metric,filter`` key as evoray's lm_eval tasks name their scores: the
    default filter ``none`` dropped (``acc``), another joined by ``_`` (``exact_match_strip``)."""
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected an lm-eval metric such as 'acc' or 'acc,none'")
    name, _, filt = value.partition(",")
    return name if filt in ("", "none") else f"{name}_{filt}"


def _tasks(data: Mapping, extra: Mapping, source: str) -> list[dict[str, Any]]:
    tasks = data.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{source}: tasks: list lm-eval task names (or {{name, weight, metric}})")
    if data.get("num_fewshot") not in (None, 0):
        raise ConfigError(
            f"{source}: num_fewshot: few-shot prompts are not supported by evoray's lm_eval tasks "
            "yet; put the examples in the task YAML's prompt, or remove the field"
        )
    out = []
    for i, task in enumerate(tasks):
        where = f"{source}: tasks[{i}]"
        if isinstance(task, str):
            task = {"name": task}
        if not isinstance(task, Mapping) or not isinstance(task.get("name"), str):
            raise ConfigError(f"{where}: expected a task name or {{name, weight, metric}}")
        check_keys(task, ("name", "weight", "metric"), source, f"tasks[{i}].")
        weight = task.get("weight", 1.0)
        if not isinstance(weight, int | float) or isinstance(weight, bool):
            raise ConfigError(f"{where}.weight: expected a number, got {weight!r}")
        entry: dict[str, Any] = {
            "name": task["name"],
            "kind": "lm_eval",
            "task": task["name"],
            "weight": float(weight),
            "metric": _metric(task.get("metric", DEFAULT_METRIC), f"{where}.metric"),
        }
        if extra.get("include_path") is not None:
            entry["include_path"] = extra["include_path"]
        if extra.get("splits") is not None:
            entry["splits"] = dict(extra["splits"])
        if data.get("limit") is not None:
            entry["limit"] = data["limit"]
        out.append(entry)
    return out


def _model_ref(value: Any, where: str) -> str:
    if isinstance(value, Mapping) and isinstance(value.get("model"), str):
        value = value["model"]
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: expected a model path or hub id")
    if "+" in value:
        raise ConfigError(f"{where}: {value!r}: LoRA references (model+lora) are not supported")
    return value


def _genome(genome: Mapping, source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(models section, recipe_search settings)`` of a genome."""
    check_keys(genome, GENOME_KEYS, source, "genome.")
    method = genome.get("merge_method")
    if method not in METHODS:
        raise ConfigError(
            f"{source}: genome.merge_method: {method!r} cannot be searched as per-model weights; "
            f"use one of {', '.join(METHODS)} (slerp: use strategy kinship_greedy)"
        )
    members = genome.get("models")
    if not isinstance(members, list) or len(members) < 2:
        raise ConfigError(f"{source}: genome.models: list at least 2 models")
    models: dict[str, Any] = {
        "members": [_model_ref(m, f"{source}: genome.models[{i}]") for i, m in enumerate(members)]
    }
    if genome.get("base_model") is not None:
        models["base"] = _model_ref(genome["base_model"], f"{source}: genome.base_model")
    elif method != "linear":
        raise ConfigError(f"{source}: genome.base_model: {method} needs a base model")
    if models.get("base") in models["members"]:
        # mergekit-evolve lets the base be one of the models; evoray's members are deltas on it.
        models["members"].remove(models["base"])
        if len(models["members"]) < 2:
            raise ConfigError(f"{source}: genome.models: list at least 2 models besides the base")
    granularity = genome.get("layer_granularity", 0)
    if granularity not in (0, 1):
        raise ConfigError(
            f"{source}: genome.layer_granularity: {granularity!r}: recipe search takes 0 (one "
            "value per model) or 1 (one value per model and layer, as a mergekit gradient)"
        )
    if genome.get("filters"):
        raise ConfigError(
            f"{source}: genome.filters: per-tensor-name parameter sets are not supported; remove "
            "the field (one set of values for all tensors is searched)"
        )
    if genome.get("normalize") not in (None, genome.get("merge_method") in ("ties", "dare_ties")):
        log.warning("%s: genome.normalize is not searched; the method's default is used", source)
    negative = bool(genome.get("allow_negative_weights", False))
    settings: dict[str, Any] = {
        "method": method,
        "per_layer": granularity == 1,
        "weight_range": [-1.0, 1.0] if negative else [0.0, 1.0],
    }
    return models, settings


def evolve_to_run_dict(data: Mapping, source: str = "<config>") -> dict[str, Any]:
    """The evoray run-config mapping (``strategy: recipe_search``) of a mergekit-evolve file."""
    check_keys(data, TOP_KEYS, source, "")
    genome = data.get("genome")
    if not isinstance(genome, Mapping):
        raise ConfigError(f"{source}: genome: expected a mapping (models, merge_method, ...)")
    extra = data.get("evoray") or {}
    if not isinstance(extra, Mapping):
        raise ConfigError(f"{source}: evoray: expected a mapping")
    check_keys(extra, EVORAY_KEYS, source, "evoray.")
    models, settings = _genome(genome, source)
    if data.get("apply_chat_template", True) is not False:
        log.info("%s: apply_chat_template is not applied by evoray's lm_eval tasks", source)
    own = dict(extra.get("recipe_search") or {})
    for key in ("method", "per_layer", "weight_range"):
        if key in own:
            raise ConfigError(f"{source}: evoray.recipe_search.{key}: set by genome; remove it")
    out: dict[str, Any] = {
        "strategy": "recipe_search",
        "models": models,
        "tasks": _tasks(data, extra, source),
        "recipe_search": {"sampler": "cmaes", **settings, **own},
    }
    for key in ("execution", "output"):
        if extra.get(key) is not None:
            out[key] = dict(extra[key])
    return out
