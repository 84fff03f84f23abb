"""Config parsing and mergekit-style parameter evaluation."""

from __future__ import annotations

import pytest
import torch
import yaml

from evoray.config.merge_config import MergeConfig, evaluate_setting, parse_dtype
from evoray.errors import ConfigError
from evoray.weights.layers import layer_index, num_layers, tensor_position


def cfg(**kw):
    data = {"merge_method": "ties", "base_model": "b", "models": [{"model": "m1"}]}
    data.update(kw)
    return MergeConfig.from_dict(data, source="t.yml")


def test_scalar_and_gradient_settings():
    assert evaluate_setting(0.3, "x", 0.7) == 0.3
    # gradient [0, 1, 0] at t=0.25: scaled 0.5 between 0 and 1 -> 0.5
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.25) == pytest.approx(0.5)
    # at t=0.75: scaled 1.5 between 1 and 0 -> 0.5; endpoints exact
    assert evaluate_setting([0.0, 1.0, 0.0], "x", 0.75) == pytest.approx(0.5)
    assert evaluate_setting([0.2, 0.8], "x", 1.0) == pytest.approx(0.8)
    assert evaluate_setting([0.2, 0.8], "x", 0.0) == pytest.approx(0.2)
    # non-numeric lists are indexed, not interpolated
    assert evaluate_setting(["a", "b", "c"], "x", 0.6) == "b"


def test_filtered_settings_first_match_wins():
    setting = [
        {"filter": "self_attn", "value": [0.0, 1.0]},
        {"filter": "mlp", "value": 0.25},
        {"value": 0.5},
    ]
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 0.5) == 0.5
    assert evaluate_setting(setting, "model.layers.1.self_attn.q_proj.weight", 1.0) == 1.0
    assert evaluate_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.0) == 0.25
    assert evaluate_setting(setting, "model.norm.weight", 1.0) == 0.5
    assert evaluate_setting([{"filter": "mlp", "value": 1}], "lm_head.weight", 1.0) is None


def test_tensor_position_matches_mergekit_layout():
    # Block i of n at i/(n-1); everything outside the blocks (embeddings, final norm, head)
    # at t=0, as mergekit's planner reads them (issue 13).
    assert tensor_position("model.embed_tokens.weight", 4) == 0.0
    assert tensor_position("model.layers.0.mlp.up_proj.weight", 4) == 0.0
    assert tensor_position("model.layers.2.mlp.up_proj.weight", 4) == pytest.approx(2 / 3)
    assert tensor_position("model.layers.3.input_layernorm.weight", 4) == 1.0
    assert tensor_position("model.norm.weight", 4) == 0.0
    assert tensor_position("lm_head.weight", 4) == 0.0
    assert tensor_position("transformer.h.1.attn.c_attn.weight", 3) == 0.5
    assert tensor_position("bert.encoder.layer.0.output.dense.weight", 1) == 1.0
    assert tensor_position("bert.embeddings.LayerNorm.weight", 2) == 0.0


def test_layer_helpers():
    assert layer_index("model.layers.11.self_attn.o_proj.weight") == 11
    assert layer_index("lm_head.weight") is None
    assert num_layers({"num_hidden_layers": 7}, []) == 7
    assert num_layers({"n_layer": 3}, []) == 3
    assert num_layers(None, ["model.layers.0.a", "model.layers.4.a", "x"]) == 5


def test_model_parameters_fall_back_to_global():
    c = cfg(
        models=[
            {"model": "m1", "parameters": {"weight": 0.7, "density": [0.2, 0.8]}},
            {"model": "m2"},
        ],
        parameters={"weight": 0.1, "normalize": False},
    )
    assert c.model_parameter("weight", 0, "model.layers.0.x", 0.5) == 0.7
    assert c.model_parameter("weight", 1, "model.layers.0.x", 0.5) == 0.1
    assert c.model_parameter("density", 0, "model.layers.0.x", 0.5) == pytest.approx(0.5)
    assert c.model_parameter("density", 1, "model.layers.0.x", 0.5) is None
    assert c.global_parameter("normalize", "x", 0.0) is False


def test_relative_model_paths_resolve_against_config_folder(tmp_path):
    (tmp_path / "models" / "a").mkdir(parents=True)
    path = tmp_path / "c.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "merge_method": "linear",
                "models": [{"model": "models/a", "parameters": {"weight": 1}}, "org/hub-id"],
                "dtype": "bfloat16",
            }
        )
    )
    c = MergeConfig.from_yaml(path)
    assert c.models[0].model == str(tmp_path / "models" / "a")
    assert c.models[1].model == "org/hub-id"  # not a local path: left for hub resolution
    assert c.dtype == torch.bfloat16
    assert "merge_method: linear" in c.to_yaml()


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"merge_method": "ties", "models": [{"model": "a"}], "paramters": {}}, "did you mean"),
        ({"merge_method": "ties", "slices": []}, "'slices' must be a non-empty list"),
        ({"merge_method": "ties", "models": [{"model": "a"}], "tokenizer": {}}, "tokenizer"),
        ({"models": [{"model": "a"}]}, "merge_method"),
        ({"merge_method": "ties"}, "models"),
        ({"merge_method": "ties", "models": []}, "models"),
        ({"merge_method": "ties", "models": [{"modle": "a"}]}, "models[0]"),
        ({"merge_method": "ties", "models": [{"model": "a", "params": {}}]}, "models[0]"),
        ({"merge_method": "ties", "models": [{"model": 3}]}, "models[0].model"),
        ({"merge_method": "ties", "models": ["a"], "dtype": "int8"}, "dtype"),
        ({"merge_method": "ties", "models": ["a"], "tokenizer_source": "union"}, "union"),
        ({"merge_method": "ties", "models": ["a"], "parameters": [1]}, "parameters"),
        (
            {"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": {}}}]},
            "models[0].parameters.weight",
        ),
        (
            {"merge_method": "ties", "models": ["a"], "parameters": {"t": [{"filter": "x"}]}},
            "parameters.t[0]",
        ),
        (
            {"merge_method": "ties", "models": ["a"], "parameters": {"t": [{"value": 1, "f": 2}]}},
            "unknown keys",
        ),
        ({"merge_method": "ties", "models": ["a"], "parameters": {"t": float("nan")}}, "finite"),
        ([1, 2], "mapping"),
    ],
)
def test_bad_configs_name_the_field(data, needle):
    with pytest.raises(ConfigError) as err:
        MergeConfig.from_dict(data, source="bad.yml")
    assert needle in str(err.value)
    assert "bad.yml" in str(err.value)


def test_bad_yaml_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        MergeConfig.from_yaml(tmp_path / "nope.yml")
    p = tmp_path / "broken.yml"
    p.write_text("merge_method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        MergeConfig.from_yaml(p)


def test_parse_dtype():
    assert parse_dtype("bf16", field_name="x") == torch.bfloat16
    assert parse_dtype(None, field_name="x") is None
    with pytest.raises(ConfigError, match="out_dtype"):
        parse_dtype("float8", field_name="out_dtype")


# --- slices: whole-model merges written as mergekit slices (issue 13, item 14) ---------------


def src(model, rng, **params):
    out = {"model": model, "layer_range": list(rng)}
    if params:
        out["parameters"] = params
    return out


def test_slices_of_whole_models_are_read_per_slice():
    c = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": "base",
            "slices": [
                {"sources": [src("a", (0, 2), weight=0.3), src("base", (0, 2))]},
                {
                    "sources": [src("base", (2, 4)), src("a", (2, 4), weight=[0.0, 1.0])],
                    "parameters": {"lambda": 0.5},
                },
            ],
            "parameters": {"lambda": 2.0},
        }
    )
    assert [m.model for m in c.models] == ["a", "base"]
    assert [(s.start, s.end) for s in c.slices] == [(0, 2), (2, 4)]
    # t within the slice, as mergekit's plan_slice; embeddings in slice 0, head in the last
    assert c.locate("model.layers.1.mlp.up_proj.weight", 4) == (1.0, 0)
    assert c.locate("model.layers.2.mlp.up_proj.weight", 4) == (0.0, 1)
    assert c.locate("model.layers.3.mlp.up_proj.weight", 4) == (1.0, 1)
    assert c.locate("model.embed_tokens.weight", 4) == (0.0, 0)
    assert c.locate("lm_head.weight", 4) == (0.0, 1)
    name = "model.layers.3.x"
    assert c.model_parameter("weight", 0, name, 1.0, fallback=False, slice_index=1) == 1.0
    assert c.model_parameter("weight", 0, name, 1.0, fallback=False, slice_index=0) == 0.3
    assert c.model_parameter("weight", 1, name, 1.0, fallback=False, slice_index=0) is None
    assert c.global_parameter("lambda", name, 1.0, slice_index=1) == 0.5
    assert c.global_parameter("lambda", name, 1.0, slice_index=0) == 2.0
    c.check_slices_cover(4)
    with pytest.raises(ConfigError, match="frankenmerge"):
        c.check_slices_cover(6)


@pytest.mark.parametrize(
    ("slices", "needle"),
    [
        # layers 0-2 of one model with layers 2-4 of another: a frankenmerge
        ([{"sources": [src("a", (0, 2)), src("b", (2, 4))]}], "slices[0].sources[1].layer_range"),
        ([{"sources": [src("a", (0, 2))]}, {"sources": [src("a", (3, 4))]}], "slices[1]"),
        ([{"sources": [src("a", (0, 2))]}, {"sources": [src("a", (0, 2))]}], "slices[1]"),
        ([{"sources": [src("a", (2, 4))]}], "expected 0"),
        ([{"sources": [src("a", (0, 2))]}, {"sources": [src("b", (2, 4))]}], "same models"),
        ([{"sources": [src("a", (0, 2)), src("a", (0, 2))]}], "twice"),
        ([{"sources": [{"model": "a"}]}], "slices[0].sources[0].layer_range"),
        ([{"sources": [src("a", (2, 1))]}], "layer_range"),
        ([{"sources": [src("a", (0, 2))], "residual_weight": 0.5}], "residual_weight"),
        ([{"sources": [src("a", (0, 2)) | {"layers": 1}]}], "unknown keys"),
        ([{"sourcs": []}], "slices[0]"),
    ],
)
def test_frankenmerge_slices_are_refused_by_name(slices, needle):
    with pytest.raises(ConfigError) as err:
        MergeConfig.from_dict({"merge_method": "linear", "slices": slices}, source="bad.yml")
    assert needle in str(err.value) and "bad.yml" in str(err.value)


def test_models_and_slices_together_are_refused():
    with pytest.raises(ConfigError, match="either 'models' or 'slices'"):
        MergeConfig.from_dict(
            {"merge_method": "linear", "models": ["a"], "slices": [{"sources": [src("a", (0, 1))]}]}
        )


def test_more_workers_than_a_generation_has_offspring_is_a_warning(caplog):
    """Workers beyond offspring_per_member x N would sit reserved and idle."""
    import logging

    from evoray.config.run_config import RunConfig
    from evoray.execution.tune_runner import _warn_idle_workers

    def config(workers: int, k: int) -> RunConfig:
        return RunConfig.from_dict(
            {
                "models": {"zoo": {}},
                "evolver": {"offspring_per_member": k},
                "execution": {"num_workers": workers},
            },
            source="r.yml",
        )

    with caplog.at_level(logging.WARNING):
        _warn_idle_workers(config(8, 1), members=4)
    assert "4 workers idle" in caplog.text and "offspring_per_member" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _warn_idle_workers(config(8, 2), members=4)
    assert caplog.text == ""
