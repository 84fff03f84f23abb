"""mergekit-evolve configs read as recipe searches, and the best recipe reproduced by a merge."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from evoray.config.evolve_config import evolve_to_run_dict, is_evolve_config
from evoray.errors import ConfigError
from evoray.strategies import get_strategy
from evoray.strategies.base import Problem
from evoray.strategies.recipe import RecipeSearch, RecipeState

REPO = Path(__file__).resolve().parents[1]


def _evolve(**genome) -> dict:
    return {
        "genome": {
            "models": ["m/a", "m/b", "m/c"],
            "merge_method": "ties",
            "base_model": "m/base",
            **genome,
        },
        "tasks": [
            "evoray_sort",
            {"name": "evoray_reverse", "weight": 2, "metric": "exact_match,strip"},
            {"name": "arc_easy", "metric": "acc_norm,none"},
        ],
        "limit": 50,
    }


def test_evolve_config_becomes_a_recipe_search_on_lm_eval_tasks() -> None:
    data = _evolve(layer_granularity=1, allow_negative_weights=True)
    data["evoray"] = {"include_path": "lm_eval_tasks", "recipe_search": {"rounds": 3}}
    assert is_evolve_config(data) and not is_evolve_config({"strategy": "evolver"})
    run = evolve_to_run_dict(data, "evo.yml")
    assert run["strategy"] == "recipe_search"
    assert run["models"] == {"members": ["m/a", "m/b", "m/c"], "base": "m/base"}
    rs = run["recipe_search"]
    assert rs["method"] == "ties" and rs["per_layer"] is True and rs["rounds"] == 3
    assert rs["weight_range"] == [-1.0, 1.0] and rs["sampler"] == "cmaes"
    assert run["tasks"] == [
        {
            "name": "evoray_sort",
            "kind": "lm_eval",
            "task": "evoray_sort",
            "weight": 1.0,
            "metric": "acc",  # mergekit-evolve's default 'acc,none'
            "include_path": "lm_eval_tasks",
            "limit": 50,
        },
        {
            "name": "evoray_reverse",
            "kind": "lm_eval",
            "task": "evoray_reverse",
            "weight": 2.0,
            "metric": "exact_match_strip",  # how evoray's lm_eval tasks name it
            "include_path": "lm_eval_tasks",
            "limit": 50,
        },
        {
            "name": "arc_easy",
            "kind": "lm_eval",
            "task": "arc_easy",
            "weight": 1.0,
            "metric": "acc_norm",
            "include_path": "lm_eval_tasks",
            "limit": 50,
        },
    ]
    # The settings are valid recipe_search settings.
    get_strategy("recipe_search").make_settings(rs)
    # The base listed among the models (allowed by mergekit-evolve) is not a member twice.
    same = evolve_to_run_dict(_evolve(models=["m/base", "m/a", "m/b"]), "evo.yml")
    assert same["models"]["members"] == ["m/a", "m/b"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerp"}, "genome.merge_method"),
        ({"layer_granularity": 4}, "genome.layer_granularity"),
        ({"filters": ["mlp"]}, "genome.filters"),
        ({"base_model": None}, "genome.base_model"),
        ({"models": ["m/a"]}, "genome.models"),
        ({"models": ["m/a", {"x": 1}]}, r"genome.models\[1\]"),
        ({"model": ["m/a"]}, "genome.model"),  # a typo: unknown key, with did-you-mean
    ],
)
def test_evolve_genome_errors_name_the_field(change: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        evolve_to_run_dict(_evolve(**change), "evo.yml")


def test_evolve_task_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"tasks\[0\]\.weight"):
        evolve_to_run_dict({**_evolve(), "tasks": [{"name": "t", "weight": "high"}]}, "e.yml")
    with pytest.raises(ConfigError, match="num_fewshot"):
        evolve_to_run_dict({**_evolve(), "num_fewshot": 5}, "e.yml")
    with pytest.raises(ConfigError, match=r"evoray\.recipe_search\.method"):
        evolve_to_run_dict({**_evolve(), "evoray": {"recipe_search": {"method": "x"}}}, "e.yml")


def test_shipped_mergekit_evolve_example_translates() -> None:
    data = yaml.safe_load((REPO / "search_spaces" / "mergekit_evolve_lm.yaml").read_text())
    run = evolve_to_run_dict(data, "mergekit_evolve_lm.yaml")
    assert len(run["models"]["members"]) == 4 and run["models"]["base"].endswith("/base")
    assert run["tasks"][0]["include_path"] == "lm_eval_tasks"  # beside this config
    assert [t["task"] for t in run["tasks"]] == [
        "evoray_arithmetic",
        "evoray_reverse",
        "evoray_sort",
        "evoray_colors",
    ]
    if importlib.util.find_spec("evoray.tasks.kinds") is None:
        pytest.skip("the lm_eval task kind (the other issue-11 part) is not merged yet")
    from evoray.config.run_config import RunConfig

    config = RunConfig.from_yaml(REPO / "search_spaces" / "mergekit_evolve_lm.yaml")
    assert config.strategy == "recipe_search" and config.settings["rounds"] == 6


@pytest.mark.parametrize("granularity", [0, 1])
def test_best_recipe_is_a_mergekit_yaml_evoray_merge_reproduces(
    granularity: int, tiny_base: Path, tiny_finetunes: list[Path], tmp_path: Path
) -> None:
    from evoray.config.merge_config import MergeConfig
    from evoray.merge.streaming import merge_to_folder

    members = [str(p) for p in tiny_finetunes]
    data = {
        "genome": {
            "models": members,
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_base),
            "layer_granularity": granularity,
        },
        "tasks": ["evoray_sort"],
    }
    run = evolve_to_run_dict(data, "evo.yml")
    settings = get_strategy("recipe_search").make_settings(run["recipe_search"])
    n_layers = 2
    problem = Problem(len(members), True, tuple(members), str(tiny_base), n_layers)
    search = RecipeSearch(settings, problem)
    weights = [[0.7, 0.2], [0.1, 0.5], [0.4, 0.3]]  # per member, per layer
    if granularity:
        params = {f"w{i}_l{j}": w[j] for i, w in enumerate(weights) for j in range(n_layers)}
    else:
        params = {f"w{i}": w[0] for i, w in enumerate(weights)}
    state = RecipeState(settings, 1, [{"params": params, "fitness": 0.5}])
    search.set_state(state.to_dict())
    recipe = tmp_path / "recipe.yml"
    recipe.write_text(search.mergekit_yaml())
    out = merge_to_folder(MergeConfig.from_yaml(recipe), tmp_path / "merged")
    merged = load_file(out / "model.safetensors")
    base = load_file(tiny_base / "model.safetensors")
    experts = [load_file(p / "model.safetensors") for p in tiny_finetunes]
    for layer in range(n_layers):
        key = f"model.layers.{layer}.mlp.up_proj.weight"
        ws = [w[layer if granularity else 0] for w in weights]
        want = base[key] + sum(w * (e[key] - base[key]) for w, e in zip(ws, experts, strict=True))
        assert torch.allclose(merged[key], want, atol=1e-5), (granularity, layer)
    # The same file through the real peer, as the README tells users: `mergekit-yaml` from
    # another working directory with a relative recipe path, offline.
    mergekit_yaml = shutil.which("mergekit-yaml", path=str(Path(sys.executable).parent))
    if mergekit_yaml is None:
        pytest.skip("mergekit is not installed (pip install 'evoray[peer]')")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [mergekit_yaml, "../recipe.yml", "../by-mergekit"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = load_file(tmp_path / "by-mergekit" / "model.safetensors")
    assert theirs.keys() == merged.keys()
    for name, t in merged.items():
        torch.testing.assert_close(theirs[name], t, rtol=1e-6, atol=1e-7, msg=name)


def test_run_config_takes_a_list_of_task_entries() -> None:
    from evoray.config.run_config import RunConfig

    entries = [{"name": "sort", "kind": "qa", "data": {"dev": "d.jsonl"}}]
    config = RunConfig.from_dict({"models": {"zoo": {}}, "tasks": entries}, source="r.yml")
    assert config.tasks == entries
    assert RunConfig.from_dict({"models": {"zoo": {}}}, source="r.yml").tasks == {"kind": "zoo"}
    with pytest.raises(ConfigError, match=r"r\.yml: tasks\[1\]: expected a mapping"):
        RunConfig.from_dict({"models": {"zoo": {}}, "tasks": [entries[0], "x"]}, source="r.yml")
    with pytest.raises(ConfigError, match="tasks: list at least one task"):
        RunConfig.from_dict({"models": {"zoo": {}}, "tasks": []}, source="r.yml")


def test_cli_run_takes_a_mergekit_evolve_file_with_overrides(tmp_path, monkeypatch) -> None:
    """--run-dir / --generations apply to the translated config; the snapshot is evoray's form
    (so `evoray resume` reads it back)."""
    import evoray.cli as cli
    from evoray.config.run_config import RunConfig

    seen = []
    monkeypatch.setattr(cli, "_run", lambda config, args, resume: seen.append(config) or 0)
    path = tmp_path / "evolve.yml"
    data = _evolve()  # lm-eval tasks are looked up when the config loads: ship the folder
    shipped = Path(__file__).resolve().parents[1] / "search_spaces" / "lm_eval_tasks"
    data["evoray"] = {"include_path": str(shipped)}
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "out"
    assert cli.main(["run", str(path), "--run-dir", str(out), "--generations", "2"]) == 0
    (config,) = seen
    assert config.strategy == "recipe_search" and config.settings["rounds"] == 2
    assert config.run_dir == out
    snap = yaml.safe_load((out / "config.yml").read_text())
    assert snap["strategy"] == "recipe_search" and "genome" not in snap
    assert snap["recipe_search"]["rounds"] == 2
    if importlib.util.find_spec("evoray.tasks.kinds") is not None:
        assert RunConfig.from_yaml(out / "config.yml").settings["rounds"] == 2
