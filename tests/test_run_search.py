"""`evoray run`: a search config through Ray Tune, its outputs, and restore from checkpoints."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import yaml
from transformers import AutoModelForSequenceClassification

from evoray.config.run_config import RunConfig
from evoray.errors import ConfigError
from evoray.runlog import read_log
from tests.conftest import SMALL_ZOO


def small_config(tmp_path, zoo_root, **evolver) -> dict:
    return {
        "strategy": "evolver",
        "models": {"zoo": {**SMALL_ZOO, "root": str(zoo_root)}},
        "evolver": {"generations": 2, "seed": 4, **evolver},
        "execution": {"num_workers": 1},
        "output": {"run_dir": str(tmp_path / "run")},
    }


def test_search_run_writes_log_model_and_table(tmp_path, small_zoo, ray_local):
    from evoray.execution.tune_runner import prepare, run_search
    from evoray.report.results import run_table

    data = small_config(tmp_path, small_zoo.root.parent, merger="average")
    config = RunConfig.from_dict(data, source="t.yml")
    # The trial crashes once, after generation 0's checkpoint: Tune restores it from there.
    shared = replace(prepare(config), fail_once_at_generation=1)
    (summary,) = run_search(config, shared=shared, progress=False)
    trial = tmp_path / "run" / "runs" / summary["trial"]
    assert (trial / "failed-once").exists()  # the injected failure happened
    log = read_log(trial)
    assert sorted(log.generation.unique()) == [0, 1]
    assert len(log) == 2 * len(small_zoo.experts)  # no row lost or duplicated by the restart
    assert {"dev/books/accuracy", "fitness", "accepted", "kinship_to_parent"} <= set(log.columns)
    model = AutoModelForSequenceClassification.from_pretrained(trial / "model")
    assert model.config.num_labels == 2
    assert summary["generations"] == 2 and summary["settings"]["merger"] == "average"
    assert set(summary["test"]) == {"test", "ood"}
    assert summary["initial"]["merged_scores"]["test"]
    table = run_table(shared.inputs.members, shared.inputs.tasks, [summary])
    assert "average merge (no evolution)" in table and "Evolver" in table

    # Restoring a finished search is a no-op that returns the same result.
    (again,) = run_search(config, shared=shared, resume=True, progress=False)
    assert again["best_dev_fitness"] == summary["best_dev_fitness"]


def test_uninterrupted_run_matches_restored_one(tmp_path, small_zoo, ray_local):
    from evoray.execution.tune_runner import prepare, run_search

    config = RunConfig.from_dict(small_config(tmp_path, small_zoo.root.parent, merger="none"))
    (plain,) = run_search(config, progress=False)
    config2 = RunConfig.from_dict(
        small_config(tmp_path / "b", small_zoo.root.parent, merger="none")
    )
    shared = replace(prepare(config2), fail_once_at_generation=1)
    (restored,) = run_search(config2, shared=shared, progress=False)
    assert plain["best_dev_fitness"] == restored["best_dev_fitness"]
    assert plain["test"] == restored["test"]


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"strategy": "magic"}, "strategy"),
        ({"evolver": {"FF": 0.5}}, "did you mean 'F'"),
        ({"evolver": {"CR": 0}}, "CR"),
        ({"search": {"grid": {"merger": ["ties"]}}}, "merger"),
        ({"search": {"grid": {"F": []}}}, "non-empty"),
        ({"models": {"members": ["a"]}}, "at least 2"),
        ({"models": {"zoo": {}, "base": "x"}}, "either"),
        ({"execution": {"workers": 2}}, "num_workers"),
        ({"outputs": {}}, "output"),
        ({"search": {"optuna": {"space": {"G": [0, 1]}}}}, "optuna.space.G"),
        ({"search": {"optuna": {"space": {"F": [0.9, 0.1]}}}}, "low < high"),
        ({"search": {"optuna": {"num_samples": 0, "space": {"F": [0, 1]}}}}, "num_samples"),
        # types and ranges name the dotted field and the expected type (issue 13, items 5-6)
        ({"execution": {"num_workers": "two"}}, "execution.num_workers: expected an integer"),
        ({"execution": {"num_workers": 0}}, "execution.num_workers must be >= 1"),
        ({"execution": {"cpus_per_worker": -3}}, "execution.cpus_per_worker must be > 0"),
        ({"execution": {"gpus_per_worker": 1.5}}, "execution.gpus_per_worker: Ray takes"),
        ({"execution": {"torch_threads": 0}}, "execution.torch_threads"),
        ({"execution": {"max_concurrent_trials": True}}, "max_concurrent_trials: expected an"),
        ({"evolver": {"generations": "two"}}, "evolver.generations: expected an integer"),
        ({"evolver": {"F": "0.5"}}, "evolver.F: expected a number, got '0.5' (a string)"),
        ({"evolver": {"fisher_smoothing": "1e-10"}}, "write 1.0e-10"),
        ({"evolver": {"regmean_alpha": 3}}, "evolver.regmean_alpha must be in [0, 1]"),
        ({"search": {"grid": {"generations": [1, "2"]}}}, "search.grid.generations[1]"),
        (
            {"strategy": "kinship_greedy", "kinship_greedy": {"explore": "yes"}},
            "kinship_greedy.explore: expected true or false",
        ),
        ({"strategy": "kinship_greedy", "kinship_greedy": {"t": 2}}, "kinship_greedy.t"),
        (
            {"strategy": "recipe_search", "recipe_search": {"weight_range": [0, "a"]}},
            "recipe_search.weight_range: expected a list of 2 numbers",
        ),
        ({"tasks": {"n_domains": "3"}}, "tasks.n_domains: expected an integer"),
        ({"tasks": {"domains": 3}}, "did you mean 'n_domains'"),
        ({"models": {"zoo": {"seed": "a"}}}, "models.zoo.seed: expected an integer"),
        ({"models": {"zoo": None, "members": ["a", 2]}}, "models.members: expected a list of"),
        ({"output": {"run_dir": 3}}, "output.run_dir: expected a string"),
    ],
)
def test_bad_run_configs(tmp_path, patch, needle):
    data = {"strategy": "evolver", "models": {"zoo": {}}, **patch}
    if data["models"].get("zoo", {}) is None:  # the members case
        data["models"] = {"members": data["models"]["members"]}
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(data, source="s.yml")
    assert needle in str(err.value) and "s.yml" in str(err.value)


def test_shipped_search_spaces_parse():
    from pathlib import Path

    from evoray.config.evolve_config import is_evolve_config

    paths = sorted(Path("search_spaces").glob("*.yaml"))
    raw = {p: yaml.safe_load(p.read_text()) for p in paths}
    fuse = [p for p in paths if "strategy" not in raw[p] and not is_evolve_config(raw[p])]
    # `evoray fuse`, not `evoray run`
    assert [p.name for p in fuse] == ["fusellm.yaml", "fusellm_domains.yaml"]
    for path in paths:
        if path not in fuse:
            assert RunConfig.from_yaml(path).trial_settings()
    grid = RunConfig.from_yaml("search_spaces/evolver.yaml").trial_settings()
    assert [t["merger"] for t in grid] == ["none", "average", "fisher", "regmean"]
    assert yaml.safe_load(json.dumps(grid))


def test_optuna_searches_F_and_CR_across_runs(tmp_path, small_zoo, ray_local):
    from evoray.execution.tune_runner import run_search

    data = small_config(tmp_path, small_zoo.root.parent)
    data["evolver"]["generations"] = 1
    data["search"] = {"optuna": {"num_samples": 2, "seed": 1, "space": {"F": [0.3, 0.9]}}}
    summaries = run_search(RunConfig.from_dict(data), progress=False)
    values = [s["settings"]["F"] for s in summaries]
    assert len(values) == 2 and all(0.3 <= v <= 0.9 for v in values)
    assert values[0] != values[1]


def test_kinship_greedy_run(tmp_path, small_zoo, ray_local):
    from evoray.execution.tune_runner import run_search

    data = small_config(tmp_path, small_zoo.root.parent)
    del data["evolver"]
    data["strategy"] = "kinship_greedy"
    data["kinship_greedy"] = {"k": 2, "operator": "slerp", "max_generations": 2}
    (summary,) = run_search(RunConfig.from_dict(data), progress=False)
    log = read_log(tmp_path / "run" / "runs" / summary["trial"])
    n = len(small_zoo.experts)
    first = log[log.generation == 0]
    assert len(first) == n * (n - 1) // 2  # every pair of experts
    assert all(len(p) == 2 for p in log.parents)
    assert log.kinship_to_parent.between(-1, 1).all()
    assert summary["evaluations"] == n + len(log)
    assert summary["strategy"] == "kinship_greedy"


def test_recipe_search_exports_a_mergekit_recipe_that_reproduces_the_model(
    tmp_path, small_zoo, ray_local
):
    from safetensors.torch import load_file

    from evoray.config.merge_config import MergeConfig
    from evoray.execution.tune_runner import run_search
    from evoray.merge.streaming import merge_to_folder

    data = small_config(tmp_path, small_zoo.root.parent)
    del data["evolver"]
    data["strategy"] = "recipe_search"
    data["recipe_search"] = {"method": "ties", "sampler": "tpe", "rounds": 2, "batch_size": 2}
    (summary,) = run_search(RunConfig.from_dict(data), progress=False)
    trial = tmp_path / "run" / "runs" / summary["trial"]
    assert len(read_log(trial)) == 4 and summary["evaluations"] == 4
    recipe = yaml.safe_load((trial / "recipe.yml").read_text())
    assert recipe["merge_method"] == "ties" and len(recipe["models"]) == len(small_zoo.experts)
    again = merge_to_folder(MergeConfig.from_yaml(trial / "recipe.yml"), tmp_path / "again")
    found = load_file(str(trial / "model" / "model.safetensors"))
    rebuilt = load_file(str(again / "model.safetensors"))
    assert found.keys() == rebuilt.keys()
    for name in found:
        torch.testing.assert_close(found[name], rebuilt[name])


def test_cli_run_reports_a_corrupt_member_before_starting_ray(tmp_path, small_zoo, capsys):
    import shutil

    from evoray.cli import main

    members = []
    for name, path in small_zoo.experts.items():
        members.append(tmp_path / name)
        shutil.copytree(path, members[-1])
    weights = members[1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated download
    cfg = tmp_path / "s.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "strategy": "evolver",
                "models": {"base": str(small_zoo.base), "members": [str(m) for m in members]},
                "tasks": {"kind": "zoo", "n_domains": 3},
                "output": {"run_dir": str(tmp_path / "run")},
            }
        )
    )
    assert main(["run", str(cfg), "--gpus-per-worker", "0"]) == 2
    err = capsys.readouterr().err
    assert "model.safetensors" in err and str(members[1]) in err
    snapshot = yaml.safe_load((tmp_path / "run" / "config.yml").read_text())
    assert snapshot["execution"]["gpus_per_worker"] == 0


def test_a_request_the_cluster_cannot_hold_fails_before_tune(
    tmp_path, small_zoo, ray_local, monkeypatch
):
    import evoray.execution.capacity as capacity
    from evoray.execution.capacity import CapacityError
    from evoray.execution.tune_runner import prepare, run_search

    def config(**execution):
        data = small_config(tmp_path, small_zoo.root.parent)
        data["execution"] = execution
        return RunConfig.from_dict(data, source="s.yml")

    shared = prepare(config())
    # ray_local has 2 CPUs: without the check these runs wait forever for their workers
    with pytest.raises(CapacityError, match=r"s\.yml: execution\.cpus_per_worker: .*cpus=64"):
        run_search(config(num_workers=1, cpus_per_worker=64), shared=shared, progress=False)
    with pytest.raises(CapacityError, match=r"execution\.num_workers: a trial's 3 workers"):
        run_search(config(num_workers=3), shared=shared, progress=False)
    with pytest.raises(CapacityError, match=r"execution\.gpus_per_worker: .*gpus=1"):
        run_search(config(num_workers=1, gpus_per_worker=1), shared=shared, progress=False)
    assert not (tmp_path / "run" / "tune").exists()  # Tune never started
    warnings = []
    capacity.check_trial_capacity(1, 1, 0, 4, warn=warnings.append)
    assert "holds 2 trial(s)" in warnings[0]
    # `--num-cpus 0`: a local Ray without CPUs
    monkeypatch.setattr(capacity, "cluster_resources", lambda: [{"CPU": 0.0}])
    with pytest.raises(CapacityError, match=r"cluster has 0 .*--num-cpus"):
        capacity.check_trial_capacity(2, 1, 0)
