"""End to end: mergekit-format configs -> merged HF folders, and every bad input on the way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from evoray.cli import main, parse_size
from evoray.config.merge_config import MergeConfig
from evoray.errors import CheckpointError, ConfigError, LayoutError
from evoray.merge import get_method
from evoray.merge.streaming import merge_to_folder, plan_merge
from evoray.weights import checkpoint as checkpoint_mod
from evoray.weights.checkpoint import open_checkpoint
from tests.factories import make_tiny_model, sample_ids


def write_config(tmp_path: Path, data: dict, name: str = "merge.yml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def state(folder: Path) -> dict[str, torch.Tensor]:
    with open_checkpoint(folder) as ckpt:
        return {n: ckpt.get(n) for n in ckpt.names()}


def test_linear_merge_is_weighted_average_and_loads(tmp_path, tiny_finetunes):
    weights = [1.0, 2.0, 1.0]
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(p), "parameters": {"weight": w}}
                for p, w in zip(tiny_finetunes, weights, strict=True)
            ],
            "dtype": "float32",
        },
    )
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    out = tmp_path / "out"
    merged = tensors_of(out)
    inputs = [state(p) for p in tiny_finetunes]
    for name, tensor in merged.items():
        expected = sum(w * s[name] for w, s in zip(weights, inputs, strict=True)) / sum(weights)
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-6)
    assert set(merged) == set(inputs[0])
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("the cat")["input_ids"]
    assert model(sample_ids(0)).logits.shape[-1] == 64
    card = (out / "README.md").read_text()
    assert "merge_method: linear" in card and "evoray" in card


def test_every_method_matches_its_operator_tensor_by_tensor(tmp_path, tiny_base, tiny_finetunes):
    base = state(tiny_base)
    inputs = [state(p) for p in tiny_finetunes]
    cases = {
        "task_arithmetic": ({"weight": 0.5}, {"lambda": 0.8}),
        "ties": ({"weight": 1.0, "density": 0.5}, {}),
        "dare_linear": ({"weight": 0.7, "density": 0.6}, {}),
        "dare_ties": ({"weight": 0.7, "density": 0.6}, {}),
        "breadcrumbs": ({"weight": 1.0, "density": 0.8, "gamma": 0.05}, {}),
        "model_stock": ({}, {}),
    }
    for method_name, (per_model, params) in cases.items():
        cfg = MergeConfig.from_dict(
            {
                "merge_method": method_name,
                "base_model": str(tiny_base),
                "models": [{"model": str(p), "parameters": per_model} for p in tiny_finetunes],
                "parameters": params,
            }
        )
        out = merge_to_folder(cfg, tmp_path / method_name, seed=3)
        merged = tensors_of(out)
        method = get_method(method_name)
        for name in merged:
            expected = method.merge(
                [s[name] for s in inputs],
                base[name],
                [dict(per_model) for _ in inputs],
                dict(params),
                seed=3,
                tensor_name=name,
            )
            torch.testing.assert_close(merged[name], expected, msg=f"{method_name} {name}")


def test_slerp_with_filtered_and_gradient_t(tmp_path, tiny_base, tiny_finetunes):
    other = tiny_finetunes[0]
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "slerp",
            "base_model": str(tiny_base),
            "models": [{"model": str(tiny_base)}, {"model": str(other)}],
            "parameters": {"t": [{"filter": "self_attn", "value": 0.0}, {"value": [0.0, 1.0]}]},
        },
    )
    out = tmp_path / "slerp"
    assert main(["merge", str(cfg), str(out), "-q"]) == 0
    merged, base, ft = tensors_of(out), state(tiny_base), state(other)
    for name, tensor in merged.items():
        outside_blocks = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
        if "self_attn" in name or name in outside_blocks or ".layers.0." in name:
            # t = 0; mergekit also evaluates the final norm and head at t = 0
            torch.testing.assert_close(tensor, base[name])
        elif ".layers.1." in name:
            torch.testing.assert_close(tensor, ft[name])  # t = 1 (last layer)
        else:
            pytest.fail(f"unexpected tensor {name}")


def test_task_arithmetic_gradient_weights(tmp_path, tiny_base, tiny_finetunes):
    ft = tiny_finetunes[0]
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_base),
            "models": [{"model": str(ft), "parameters": {"weight": [0.0, 1.0]}}],
        }
    )
    merged = tensors_of(merge_to_folder(cfg, tmp_path / "o"))
    base, tuned = state(tiny_base), state(ft)
    torch.testing.assert_close(
        merged["model.embed_tokens.weight"], base["model.embed_tokens.weight"]
    )
    # mergekit evaluates the final norm and lm_head at t = 0 too (like the embeddings)
    for name in ("model.norm.weight", "lm_head.weight"):
        torch.testing.assert_close(merged[name], base[name])
    torch.testing.assert_close(
        merged["model.layers.1.mlp.up_proj.weight"], tuned["model.layers.1.mlp.up_proj.weight"]
    )


def test_post_block_tensors_take_the_gradient_start_like_mergekit(
    tmp_path, tiny_base, tiny_finetunes
):
    # issue 13: weight [0.2, 1.0] -> lm_head and the final norm at 0.2, not 1.0
    ft = tiny_finetunes[0]
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_base),
            "models": [{"model": str(ft), "parameters": {"weight": [0.2, 1.0]}}],
        }
    )
    merged = tensors_of(merge_to_folder(cfg, tmp_path / "o"))
    base, tuned = state(tiny_base), state(ft)
    for name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        expected = base[name] + 0.2 * (tuned[name] - base[name])
        torch.testing.assert_close(merged[name], expected, msg=name)


def test_dtypes_and_dare_seed(tmp_path, tiny_base, tiny_finetunes):
    data = {
        "merge_method": "dare_ties",
        "base_model": str(tiny_base),
        "models": [
            {"model": str(p), "parameters": {"weight": 1, "density": 0.5}} for p in tiny_finetunes
        ],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    cfg = MergeConfig.from_dict(data)
    a = merge_to_folder(cfg, tmp_path / "a", seed=1)
    b = merge_to_folder(cfg, tmp_path / "b", seed=1)
    c = merge_to_folder(cfg, tmp_path / "c", seed=2)
    ta, tb, tc = tensors_of(a), tensors_of(b), tensors_of(c)
    assert all(t.dtype == torch.bfloat16 for t in ta.values())
    assert all(torch.equal(ta[n], tb[n]) for n in ta)
    assert any(not torch.equal(ta[n], tc[n]) for n in ta)
    conf = json.loads((a / "config.json").read_text())
    assert conf.get("dtype", conf.get("torch_dtype")) == "bfloat16"
    AutoModelForCausalLM.from_pretrained(a)


def test_tokenizer_source_and_chat_template(tmp_path, tiny_base, tiny_finetunes):
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(tok_dir)
    cfg_json = json.loads((tok_dir / "tokenizer_config.json").read_text())
    cfg_json["model_max_length"] = 77
    (tok_dir / "tokenizer_config.json").write_text(json.dumps(cfg_json))
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1}} for p in tiny_finetunes],
            "tokenizer_source": str(tok_dir),
            "chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}",
        }
    )
    out = merge_to_folder(cfg, tmp_path / "out")
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.model_max_length == 77
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_hub_id_resolves_from_offline_cache(tmp_path, tiny_finetunes, monkeypatch):
    from tests.factories import make_fake_hub_cache

    cache = tmp_path / "hub"
    make_fake_hub_cache(cache, "someone/tiny-ft", tiny_finetunes[1])
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny_finetunes[0]), "parameters": {"weight": 1}},
                {"model": "someone/tiny-ft", "parameters": {"weight": 1}},
            ],
        }
    )
    merged = tensors_of(merge_to_folder(cfg, tmp_path / "out"))
    a, b = state(tiny_finetunes[0]), state(tiny_finetunes[1])
    torch.testing.assert_close(
        merged["lm_head.weight"], (a["lm_head.weight"] + b["lm_head.weight"]) / 2
    )


def test_streaming_holds_one_tensor_per_input(tmp_path, tiny_base, tiny_finetunes, tensor_reads):
    """Peak memory: at most one live tensor per input at any time, each tensor read once."""
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "ties",
            "base_model": str(tiny_base),
            "models": [
                {"model": str(p), "parameters": {"weight": 1, "density": 0.5}}
                for p in tiny_finetunes
            ],
            "dtype": "float32",
        }
    )
    out = merge_to_folder(cfg, tmp_path / "out", max_shard_bytes=20_000)
    n_tensors = len(tensors_of(out))
    assert len(list(out.glob("model-*.safetensors"))) > 1  # streamed into several shards
    assert tensor_reads.reads == 4 * n_tensors  # base + 3 models, each tensor read exactly once
    assert tensor_reads.peak <= 4


# --- mergekit slices and parameters copied between methods (issue 13) ------------------------


def test_slices_of_whole_models_give_the_models_merge(tmp_path, tiny_base, tiny_finetunes):
    # what mergekit-evolve writes: every model under slices with the whole layer_range
    per = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": 0.8}]
    models = [str(p) for p in tiny_finetunes[:2]]
    common = {"merge_method": "ties", "base_model": str(tiny_base), "parameters": {"lambda": 0.9}}
    as_models = MergeConfig.from_dict(
        {
            **common,
            "models": [{"model": m, "parameters": q} for m, q in zip(models, per, strict=True)],
        }
    )
    sources = [{"model": str(tiny_base), "layer_range": [0, 2]}]
    sources += [
        {"model": m, "layer_range": [0, 2], "parameters": q}
        for m, q in zip(models, per, strict=True)
    ]
    as_slices = MergeConfig.from_dict({**common, "slices": [{"sources": sources}]})
    a = tensors_of(merge_to_folder(as_models, tmp_path / "models"))
    b = tensors_of(merge_to_folder(as_slices, tmp_path / "slices"))
    assert set(a) == set(b)
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)
    card = (tmp_path / "slices" / "README.md").read_text()
    assert "layer_range" in card  # the recipe as the user wrote it


def test_per_slice_parameters_follow_mergekit(tmp_path, tiny_base, tiny_finetunes):
    # one slice per layer (mergekit-evolve's layer_granularity): slice 0 weight [0.2, 1.0] is
    # evaluated at t = 1 in a one-layer slice and at t = 0 for the embeddings; slice 1's
    # weight comes from the slice's own parameters, and the final norm and head use it
    ft = str(tiny_finetunes[0])
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(tiny_base),
            "slices": [
                {
                    "sources": [
                        {"model": ft, "layer_range": [0, 1], "parameters": {"weight": [0.2, 1.0]}}
                    ]
                },
                {"sources": [{"model": ft, "layer_range": [1, 2]}], "parameters": {"weight": 0.5}},
            ],
        }
    )
    merged = tensors_of(merge_to_folder(cfg, tmp_path / "o"))
    base, tuned = state(tiny_base), state(tiny_finetunes[0])
    for name, tensor in merged.items():
        if ".layers.0." in name:
            w = 1.0
        elif name == "model.embed_tokens.weight":
            w = 0.2
        else:  # layer 1, final norm, lm_head
            w = 0.5
        torch.testing.assert_close(tensor, base[name] + w * (tuned[name] - base[name]), msg=name)


def test_slices_that_drop_layers_are_refused(tmp_path, tiny_base, tiny_finetunes):
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "slices": [
                {"sources": [{"model": str(p), "layer_range": [0, 1]} for p in tiny_finetunes[:2]]}
            ],
            "parameters": {"weight": 1.0},
        },
        source="short.yml",
    )
    with pytest.raises(ConfigError, match=r"short.yml: slices cover layers 0-1 .* 2 layers"):
        plan_merge(cfg)


def test_parameter_of_another_method_is_a_warning(tmp_path, tiny_base, tiny_finetunes, caplog):
    ft = str(tiny_finetunes[0])
    plain = {"merge_method": "task_arithmetic", "base_model": str(tiny_base)}
    ref = MergeConfig.from_dict({**plain, "models": [{"model": ft, "parameters": {"weight": 0.7}}]})
    copied = MergeConfig.from_dict(
        {
            **plain,
            "models": [{"model": ft, "parameters": {"weight": 0.7, "gamma": 0.05}}],
            "parameters": {"filter_wise": True, "t": 0.3},
        },
        source="copied.yml",
    )
    with caplog.at_level("WARNING", logger="evoray.merge.streaming"):
        out = merge_to_folder(copied, tmp_path / "copied")
    text = caplog.text
    for field in ("models[0].parameters.gamma", "parameters.filter_wise", "parameters.t"):
        assert f"copied.yml: {field}" in text
    assert "task_arithmetic does not use 'gamma'" in text and "ignored" in text
    expected = tensors_of(merge_to_folder(ref, tmp_path / "ref"))
    for name, tensor in tensors_of(out).items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=0)


def test_unknown_parameter_is_an_error_with_did_you_mean(tmp_path, tiny_base, tiny_finetunes):
    cfg = bad(tmp_path, tiny_base, tiny_finetunes, merge_method="task_arithmetic")
    cfg = MergeConfig.from_dict(
        {**cfg.raw, "models": [{"model": str(tiny_finetunes[0]), "parameters": {"wieght": 1}}]},
        source="bad.yml",
    )
    with pytest.raises(ConfigError, match=r"models\[0\].parameters.wieght.*did you mean 'weight'"):
        plan_merge(cfg)


# --- bad input ------------------------------------------------------------------------------


def bad(tmp_path, tiny_base, tiny_finetunes, **overrides):
    data = {
        "merge_method": "ties",
        "base_model": str(tiny_base),
        "models": [
            {"model": str(p), "parameters": {"weight": 1, "density": 0.5}} for p in tiny_finetunes
        ],
    }
    data.update(overrides)
    return MergeConfig.from_dict(data, source="bad.yml")


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        ({"merge_method": "tiess"}, ConfigError, "ties"),
        ({"parameters": {"densty": 0.5}}, ConfigError, "densty"),
        ({"parameters": {"density": 1.5}}, ConfigError, "density"),
        ({"base_model": None}, ConfigError, "base_model"),
        ({"models": [{"model": "X", "parameters": {"normalize": True}}]}, ConfigError, "global"),
        ({"models": [{"model": "X", "parameters": {"density": 0.5}}]}, ConfigError, "weight"),
    ],
)
def test_bad_parameters_fail_before_reading(
    tmp_path, tiny_base, tiny_finetunes, overrides, error, needle, monkeypatch
):
    if overrides.get("models") and overrides["models"][0]["model"] == "X":
        overrides["models"][0]["model"] = str(tiny_finetunes[0])
    monkeypatch.setattr(
        checkpoint_mod.Checkpoint, "get", lambda *a: pytest.fail("read weights before validating")
    )
    cfg = bad(tmp_path, tiny_base, tiny_finetunes, **overrides)
    with pytest.raises(error) as exc:
        merge_to_folder(cfg, tmp_path / "out")
    assert needle in str(exc.value)
    assert not (tmp_path / "out").exists()


def test_slerp_needs_exactly_one_other_model(tmp_path, tiny_base, tiny_finetunes):
    cfg = bad(
        tmp_path,
        tiny_base,
        tiny_finetunes,
        merge_method="slerp",
        models=[{"model": str(p)} for p in tiny_finetunes[:2]],
        parameters={"t": 0.5},
    )
    with pytest.raises(ConfigError, match="slerp"):
        plan_merge(cfg)


def test_architecture_mismatch_names_field(tmp_path, tiny_base, tiny_gpt2):
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny_base), "parameters": {"weight": 1}},
                {"model": str(tiny_gpt2), "parameters": {"weight": 1}},
            ],
        }
    )
    with pytest.raises(LayoutError, match="model_type"):
        plan_merge(cfg)


def test_shape_mismatch_names_tensor(tmp_path, tiny_base):
    wider = make_tiny_model(tmp_path / "wide", arch="llama", seed=5, intermediate_size=48)
    cfg = MergeConfig.from_dict(
        {
            "merge_method": "linear",
            "models": [
                {"model": str(tiny_base), "parameters": {"weight": 1}},
                {"model": str(wider), "parameters": {"weight": 1}},
            ],
        }
    )
    with pytest.raises(LayoutError, match=r"mlp\..*shape|intermediate_size"):
        plan_merge(cfg)


def test_pickle_refused_unless_allowed(tmp_path, tiny_base, tiny_finetunes):
    pickled = make_tiny_model(
        tmp_path / "pkl", base=tiny_base, seed=9, noise=0.01, safe_serialization=False
    )
    cfg = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [
                {"model": str(pickled), "parameters": {"weight": 1}},
                {"model": str(tiny_finetunes[0]), "parameters": {"weight": 1}},
            ],
        },
    )
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        merge_to_folder(MergeConfig.from_yaml(cfg), tmp_path / "out")
    assert main(["merge", str(cfg), str(tmp_path / "out"), "-q", "--allow-pickle"]) == 0


def test_cli_errors_are_one_line_exit_2(tmp_path, tiny_finetunes, capsys):
    cfg = write_config(
        tmp_path, {"merge_method": "linear", "models": [{"model": str(tmp_path / "nope")}]}
    )
    assert main(["merge", str(cfg), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("evoray merge: error:") and "nope" in err
    ok = write_config(
        tmp_path,
        {
            "merge_method": "linear",
            "models": [{"model": str(p), "parameters": {"weight": 1}} for p in tiny_finetunes],
        },
        "ok.yml",
    )
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert main(["merge", str(ok), str(tmp_path / "taken"), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    # --overwrite replaces only an earlier merge's output (issue 13): refused here, then fine
    # once the folder is one an evoray merge wrote
    assert main(["merge", str(ok), str(tmp_path / "taken"), "-q", "--overwrite"]) == 2
    assert "does not look like an earlier merge" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "x"
    assert main(["merge", str(ok), str(tmp_path / "merged"), "-q"]) == 0
    assert main(["merge", str(ok), str(tmp_path / "merged"), "-q", "--overwrite"]) == 0


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("2GiB") == 2 * 2**30
    assert parse_size("1500") == 1500
    assert parse_size("0.5 MB") == 500_000
    import argparse

    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
