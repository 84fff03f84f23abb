"""Tests for ``evoray report`` (evoray.report) on small synthetic run directories."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from evoray.errors import EvorayError
from evoray.report import (
    PLOTS,
    SUMMARY,
    ReportError,
    add_report_parser,
    generation_table,
    load_run_dir,
    start_fitness,
    write_report,
)
from evoray.runlog import RunLog

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
RECIPE_YAML = (
    "merge_method: task_arithmetic\nbase_model: /zoo/base\nmodels:\n"
    "- model: /zoo/expert-a\n  parameters:\n    weight: 0.4533\n"
    "- model: /zoo/expert-b\n  parameters:\n    weight: 0.2171\n"
)


def _row(individual: int, fitness: float, accepted: bool, **kw: Any) -> dict[str, Any]:
    # the strategy's per-row settings (F, CR, ...) go in the log's settings map
    settings = {**kw.pop("settings", {}), **{k: kw.pop(k) for k in ("F", "CR") if k in kw}}
    return {
        "settings": settings,
        "individual": individual,
        "parents": kw.pop("parents", [individual]),
        "operator": kw.pop("operator", "evolver+binomial"),
        "seed": individual,
        "fitness": fitness,
        "accepted": accepted,
        "wall_time_s": 0.5,
        "eval_time_s": 0.4,
        "device": "cpu",
        "scores": {"books/accuracy": fitness, "food/accuracy": fitness},
        **kw,
    }


def _write_log(trial: Path, strategy: str, generations: list[list[dict[str, Any]]]) -> None:
    log = RunLog(trial, run_id=trial.name, strategy=strategy)
    for g, rows in enumerate(generations):
        for r in rows:
            log.append(r)
        log.commit_generation(g)


def _summary(strategy: str, settings: dict, gens: int, best: float, evals: int, **kw) -> dict:
    test = {
        "test": {"books": {"accuracy": 0.70}, "food": {"accuracy": 0.80}},
        "ood": {"sports": {"accuracy": 0.50}, "music": {"accuracy": 0.54}},
    }
    return {
        "strategy": strategy,
        "settings": {**settings, "metric": "accuracy"},
        "generations": gens,
        "best_dev_fitness": best,
        "evaluations": evals,
        "test": test,
        **kw,
    }


def _put(trial: Path, name: str, obj: Any) -> None:
    trial.mkdir(parents=True, exist_ok=True)
    (trial / name).write_text(obj if isinstance(obj, str) else json.dumps(obj))


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Four trials: Evolver individual, Evolver +fisher, recipe search, a crashed greedy run."""
    root = tmp_path / "run"
    runs = root / "runs"

    ev = runs / "aaa_00000"  # individual mode: initial best 0.60
    f = {"F": 0.5, "CR": 0.5}
    _write_log(
        ev,
        "evolver",
        [
            [_row(0, 0.62, True, **f, kinship_to_parent=0.8), _row(1, 0.50, False, **f)],
            [_row(0, 0.61, False, **f), _row(1, 0.58, True, **f, kinship_to_parent=0.9)],
            [_row(0, 0.70, True, **f), _row(1, 0.55, False, **f)],
        ],
    )
    _put(ev, "initial.json", {"fitness": [0.60, 0.55], "merged_fitness": None})
    settings = {"generations": 3, **f, "merger": "none", "mutation": "evolver"}
    _put(ev, "summary.json", _summary("evolver", settings, 3, 0.70, 8))
    (ev / "model").mkdir()

    fi = runs / "aaa_00001"  # merger mode: starts from the initial merge at 0.75
    op = {"operator": "evolver+binomial", "settings": {"merger": "fisher"}, **f}
    _write_log(
        fi,
        "evolver",
        [
            [_row(0, 0.74, False, **op), _row(1, 0.77, True, **op)],
            [_row(0, 0.76, False, **op), _row(1, 0.70, False, **op)],
        ],
    )
    _put(fi, "initial.json", {"fitness": [0.60, 0.55], "merged_fitness": 0.75})
    settings = {"generations": 2, **f, "merger": "fisher", "mutation": "evolver"}
    _put(fi, "summary.json", _summary("evolver", settings, 2, 0.77, 7))

    rs = runs / "bbb_00000"
    rop = {
        "operator": "task_arithmetic",
        "settings": {"method": "task_arithmetic", "sampler": "cmaes"},
        "parents": [0, 1],
    }
    _write_log(
        rs,
        "recipe_search",
        [
            [_row(0, 0.40, False, **rop), _row(1, 0.52, True, **rop)],
            [_row(2, 0.49, False, **rop), _row(3, 0.51, False, **rop)],
            [_row(4, 0.66, True, **rop), _row(5, 0.30, False, **rop)],
        ],
    )
    _put(rs, "initial.json", {})
    _put(rs, "recipe.yml", RECIPE_YAML)
    settings = {"method": "task_arithmetic", "sampler": "cmaes", "per_layer": False}
    _put(rs, "summary.json", _summary("recipe_search", settings, 3, 0.66, 6))

    gr = runs / "ccc_00000"  # crashed after two generations: no summary.json
    gop = {"operator": "slerp", "settings": {"operator": "slerp"}, "parents": [0, 1]}
    _write_log(
        gr,
        "kinship_greedy",
        [
            [_row(4, 0.63, True, **gop, kinship_to_parent=0.1), _row(5, 0.5, False, **gop)],
            [_row(6, 0.64, True, **gop, kinship_to_parent=0.5)],
        ],
    )
    _put(gr, "initial.json", {})
    return root


def test_writes_pngs_and_summary(run_dir: Path) -> None:
    out = write_report(run_dir)
    assert out == run_dir / "report"
    for name in PLOTS:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name
    md = (out / SUMMARY).read_text()
    for name in PLOTS:
        assert f"]({name})" in md


def test_summary_numbers_and_recipes(run_dir: Path, tmp_path: Path) -> None:
    md = (write_report(run_dir, tmp_path / "out") / SUMMARY).read_text()
    rows = {line.split(" | ")[1]: line for line in md.splitlines() if line.startswith("| ")}
    ind = rows["`aaa_00000`"]
    assert "Evolver F=0.5 CR=0.5 individual" in ind
    # generations, dev evals, best dev fitness, test in-domain / OOD means, acceptance, time
    assert "| complete | 3 | 8 | 0.7000 | 0.750 | 0.520 | 3/6 (50%) | 3.0 |" in ind
    assert "`runs/aaa_00000/model`" in ind
    assert "| 2 | 7 | 0.7700 | 0.750 | 0.520 | 1/4 (25%) |" in rows["`aaa_00001`"]
    assert "recipe search task_arithmetic cmaes" in rows["`bbb_00000`"]
    assert "| 3 | 6 | 0.6600 |" in rows["`bbb_00000`"]
    crashed = rows["`ccc_00000`"]
    assert "**incomplete**" in crashed and "0.6400 (log)" in crashed
    assert "| - | - |" in crashed  # no test scores
    assert "1 incomplete" in md
    assert "no summary.json in" in md
    # the recipe search's YAML block; the others say why they have none
    assert f"```yaml\n{RECIPE_YAML.rstrip()}\n```" in md
    assert md.count("```yaml") == 1
    assert md.count("not expressible as one mergekit recipe") == 3  # Evolver x2, greedy


def test_recipe_from_summary_when_no_recipe_file(run_dir: Path, tmp_path: Path) -> None:
    trial = run_dir / "runs" / "bbb_00000"
    (trial / "recipe.yml").unlink()
    summary = json.loads((trial / "summary.json").read_text())
    summary["mergekit_yaml"] = RECIPE_YAML.replace("0.4533", "0.9")
    (trial / "summary.json").write_text(json.dumps(summary))
    md = (write_report(run_dir, tmp_path / "out") / SUMMARY).read_text()
    assert "weight: 0.9" in md


def test_best_so_far_per_strategy(run_dir: Path) -> None:
    data = load_run_dir(run_dir)
    runs = {r.trial: r for r in data.runs}
    tables = {t: generation_table(r) for t, r in runs.items()}
    for t, table in tables.items():
        best = table["best_so_far"].dropna().to_numpy()
        assert len(best) and np.all(np.diff(best) >= 0), t
    # individual: max(initial best 0.60, accepted); a rejected 0.61 in gen 1 does not count
    assert start_fitness(runs["aaa_00000"]) == pytest.approx(0.60)
    assert tables["aaa_00000"]["best_so_far"].tolist() == pytest.approx([0.62, 0.62, 0.70])
    # merger mode: starts from the initial merge; a rejected 0.76 stays out
    assert start_fitness(runs["aaa_00001"]) == pytest.approx(0.75)
    assert tables["aaa_00001"]["best_so_far"].tolist() == pytest.approx([0.77, 0.77])
    # recipe search: running max of new bests, no start
    assert start_fitness(runs["bbb_00000"]) is None
    assert tables["bbb_00000"]["best_so_far"].tolist() == pytest.approx([0.52, 0.52, 0.66])
    t = tables["aaa_00000"]
    assert t["acceptance_rate"].tolist() == pytest.approx([0.5, 0.5, 0.5])
    assert t["mean_fitness"].tolist() == pytest.approx([0.56, 0.595, 0.625])
    assert t["kinship_mean"].iloc[:2].tolist() == pytest.approx([0.8, 0.9])
    assert np.isnan(t["kinship_mean"].iloc[2])


def test_best_so_far_waits_for_a_known_value(tmp_path: Path) -> None:
    """Greedy without expert fitness and nothing accepted yet: unknown, not zero."""
    trial = tmp_path / "run" / "runs" / "t0"
    gop = {"operator": "slerp", "settings": {"operator": "slerp"}, "parents": [0, 1]}
    _write_log(trial, "kinship_greedy", [[_row(3, 0.4, False, **gop)], [_row(4, 0.6, True, **gop)]])
    (run,) = load_run_dir(tmp_path / "run").runs
    best = generation_table(run)["best_so_far"]
    assert np.isnan(best.iloc[0]) and best.iloc[1] == pytest.approx(0.6)


def test_crashed_run_settings_come_from_the_log(run_dir: Path) -> None:
    runs = {r.trial: r for r in load_run_dir(run_dir).runs}
    crashed = runs["ccc_00000"]
    assert not crashed.complete and crashed.strategy == "kinship_greedy"
    assert crashed.settings == {"operator": "slerp"}
    assert crashed.label == "kinship greedy k=? slerp"
    assert runs["aaa_00001"].label == "Evolver F=0.5 CR=0.5 +fisher"


def test_run_with_summary_but_no_log_and_empty_log(tmp_path: Path) -> None:
    root = tmp_path / "run"
    done = root / "runs" / "t0"
    _put(
        done,
        "summary.json",
        _summary("evolver", {"F": 0.5, "CR": 0.5, "merger": "none"}, 0, 0.6, 2),
    )
    (root / "runs" / "t1" / "log").mkdir(parents=True)  # crashed before generation 0
    out = write_report(root)
    md = (out / SUMMARY).read_text()
    assert "| complete | 0 | 2 | 0.6000 |" in md
    assert "**incomplete**" in md
    assert all((out / p).read_bytes().startswith(PNG_SIGNATURE) for p in PLOTS)


def test_same_label_runs_are_told_apart(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for trial, seed in (("t0", 0), ("t1", 1)):
        _write_log(root / "runs" / trial, "evolver", [[_row(0, 0.5, True, F=0.5, CR=0.5)]])
        settings = {"F": 0.5, "CR": 0.5, "merger": "none", "seed": seed}
        _put(root / "runs" / trial, "summary.json", _summary("evolver", settings, 1, 0.5, 3))
    labels = [r.label for r in load_run_dir(root).runs]
    assert labels == [
        "Evolver F=0.5 CR=0.5 individual (seed=0)",
        "Evolver F=0.5 CR=0.5 individual (seed=1)",
    ]


def test_kinship_json_matrix(run_dir: Path, tmp_path: Path) -> None:
    labels = ["a", "b", "c"]
    matrix = [[1.0, 0.2, None], [0.2, 1.0, 0.1], [None, 0.1, 1.0]]
    (run_dir / "kinship.json").write_text(
        json.dumps({"labels": labels, "models": labels, "metrics": {"pearson": matrix}})
    )
    data = load_run_dir(run_dir)
    assert data.kinship is not None and data.kinship.labels == tuple(labels)
    assert np.isnan(data.kinship.values[0, 2])
    plain = (write_report(load_run_dir(run_dir).run_dir, tmp_path / "a") / "kinship.png").stat()
    assert plain.st_size > 10_000
    (run_dir / "kinship.json").write_text(json.dumps({"labels": labels, "metrics": {}}))
    with pytest.raises(ReportError, match=r"kinship\.json"):
        load_run_dir(run_dir)


def test_output_is_deterministic(run_dir: Path, tmp_path: Path) -> None:
    a = write_report(run_dir, tmp_path / "a")
    b = write_report(run_dir, tmp_path / "b")
    for name in (*PLOTS, SUMMARY):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_bad_run_dirs(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    with pytest.raises(ReportError, match=r"nope does not exist"):
        load_run_dir(missing)
    empty = tmp_path / "empty"
    (empty / "runs" / "stray").mkdir(parents=True)
    with pytest.raises(ReportError, match=r"no runs in .*empty.*runs/<trial>"):
        load_run_dir(empty)
    trial = tmp_path / "x" / "runs" / "t0"
    _write_log(trial, "evolver", [[_row(0, 0.5, True)]])
    with pytest.raises(ReportError, match="single trial's folder"):
        load_run_dir(trial)
    _put(tmp_path / "x" / "runs" / "t0", "summary.json", "{not json")
    with pytest.raises(ReportError, match=r"summary\.json"):
        load_run_dir(tmp_path / "x")
    assert issubclass(ReportError, EvorayError)


def test_cli_registration(run_dir: Path, tmp_path: Path, capsys) -> None:
    parser = argparse.ArgumentParser(prog="evoray")
    add_report_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["report", str(run_dir)])
    assert args.out is None
    args = parser.parse_args(["report", str(run_dir), "--out", str(tmp_path / "r")])
    assert args.func(args) == 0
    assert (tmp_path / "r" / SUMMARY).is_file()
    assert str(tmp_path / "r" / "fitness.png") in capsys.readouterr().out


def test_identical_settings_get_the_trial_id(tmp_path: Path) -> None:
    root = tmp_path / "run"
    for trial in ("t0", "t1"):
        _write_log(root / "runs" / trial, "evolver", [[_row(0, 0.5, True, F=0.5, CR=0.5)]])
    labels = [r.label for r in load_run_dir(root).runs]
    assert labels == [
        "Evolver F=0.5 CR=0.5 individual [t0]",
        "Evolver F=0.5 CR=0.5 individual [t1]",
    ]
