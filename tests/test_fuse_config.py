"""`evoray fuse` configs: every bad field is a ConfigError naming the file and the field."""

from __future__ import annotations

import pytest
import yaml

from evoray.cli import main
from evoray.errors import ConfigError
from evoray.fusion.fuse_config import FuseConfig

BASE = {"sources": [{"name": "a", "tokenizer": "char"}, {"name": "b", "vocab_size": 90}]}


def test_shipped_config_parses_with_defaults_filled_in():
    cfg = FuseConfig.from_yaml("search_spaces/fusellm.yaml")
    assert [s.name for s in cfg.sources] == ["char", "bpe200", "gpt2"]
    assert cfg.sources[2].arch == "gpt2" and cfg.sources[2].tokenizer == "bytelevel"
    assert cfg.fusion.lam == 0.9 and cfg.fusion.temperature == 1.0 and cfg.fusion.k == 10
    assert cfg.resources.num_gpus == 0 and cfg.fusion.device == "auto"
    minimal = FuseConfig.from_dict(BASE)
    assert minimal.target.vocab_size == 120 and minimal.target.seed == 0
    assert minimal.sources[1].tokenizer == "bpe" and minimal.fusion.method == "avg_ce"
    assert isinstance(FuseConfig.from_dict({**BASE, "fusion": {"lam": 1}}).fusion.lam, float)


@pytest.mark.parametrize(
    ("patch", "needles"),
    [
        ({"fusoin": {}}, ["unknown key 'fusoin'", "did you mean 'fusion'"]),
        ({"fusion": {"temprature": 2}}, ["'fusion.temprature'", "'temperature'"]),
        ({"corpus": {"n_trian": 5}}, ["'corpus.n_trian'", "'n_train'"]),
        ({"target": {"vocab": 5}}, ["'target.vocab'", "vocab_size"]),
        ({"resources": {"gpus": 1}}, ["'resources.gpus'", "num_gpus"]),
        ({"fusion": {"lam": 1.5}}, ["fusion.lam must be in [0, 1]"]),
        ({"fusion": {"method": "max_ce"}}, ["fusion.method", "avg_ce"]),
        ({"fusion": {"kind": "js"}}, ["fusion.kind"]),
        ({"fusion": {"temperature": 0}}, ["fusion.temperature must be > 0"]),
        ({"fusion": {"steps": "ten"}}, ["fusion.steps: expected int, got 'ten'"]),
        ({"fusion": {"k": True}}, ["fusion.k: expected int"]),
        ({"fusion": {"precision": "fp16"}}, ["fusion.precision", "bf16"]),
        ({"fusion": {"device": "tpu"}}, ["fusion.device"]),
        ({"fusion": []}, ["fusion: expected a mapping"]),
        ({"sources": []}, ["sources: list at least one"]),
        ({"sources": [{"name": "a"}, {"name": "a"}]}, ["names must be distinct"]),
        ({"sources": [{"tokenizer": "wordpiece"}]}, ["sources[0].tokenizer", "char"]),
        ({"sources": [{"arch": "mamba"}]}, ["sources[0].arch must be one of"]),
        ({"sources": [{"hidden": 30}]}, ["sources[0].hidden must be a multiple of 4"]),
        ({"build": False}, ["sources[0]: give a path (build is false)"]),
        ({"build": "yes"}, ["build: expected bool"]),
        ({"resources": {"num_gpus": -1}}, ["num_gpus must be >= 0"]),
        ({"resources": {"train_workers": 0}}, ["resources.train_workers must be >= 1"]),
        ({"corpus": {"n_heldout": 0}}, ["corpus.n_heldout must be >= 1"]),
        ({"corpus": {"train": "t.txt"}}, ["give both train and heldout"]),
        ({"corpus": {"text_field": 3}}, ["corpus.text_field: expected str"]),
    ],
)
def test_bad_fuse_configs(patch, needles):
    with pytest.raises(ConfigError) as err:
        FuseConfig.from_dict({**BASE, **patch}, source="f.yaml")
    message = str(err.value)
    assert message.startswith("f.yaml: ")
    for needle in needles:
        assert needle in message


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "fusion": {"lamb": 0.5}}))
    assert main(["fuse", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "fusion.lamb" in err and "Traceback" not in err
    assert main(["fuse", str(tmp_path / "missing.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


def test_cli_names_a_missing_model_before_any_work(tmp_path, capsys):
    cfg = tmp_path / "f.yaml"
    missing = tmp_path / "no_such_model"
    data = {**BASE, "sources": [{"name": "a", "path": str(missing)}], "output_dir": "x"}
    cfg.write_text(yaml.safe_dump({**data, "output_dir": str(tmp_path / "run")}))
    assert main(["fuse", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "no_such_model" in err and "not found" in err
    assert not (tmp_path / "run").exists()  # nothing was built


@pytest.mark.parametrize(
    ("patch", "needle"),
    [
        ({"resources": {"train_workers": 2}}, "train_workers > 1 trains on Ray: set use_ray"),
        (
            {"use_ray": True, "resources": {"train_workers": 3}, "fusion": {"batch_size": 8}},
            "fusion.batch_size 8 must be a multiple of resources.train_workers 3",
        ),
    ],
)
def test_cli_refuses_data_parallel_misfits_before_any_work(tmp_path, capsys, patch, needle):
    cfg = tmp_path / "f.yaml"
    cfg.write_text(yaml.safe_dump({**BASE, **patch, "output_dir": str(tmp_path / "run")}))
    assert main(["fuse", str(cfg)]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
