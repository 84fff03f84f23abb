"""Tests for writing merged models as HF folders (evoray.weights.export)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from evoray.errors import CheckpointError
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.export import ModelFolderWriter
from tests.factories import make_tokenizer, sample_ids

RECIPE = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n"


def _write(
    source: Path,
    out: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 2**30,
    card: bool = True,
) -> Path:
    """Copy a model through the writer, as the merge executor would."""
    with open_checkpoint(source) as c, ModelFolderWriter(out, max_shard_bytes=max_shard_bytes) as w:
        for name in c.names():
            t = c.get(name)
            w.add(name, t.to(dtype) if dtype is not None and t.is_floating_point() else t)
        w.copy_support_files(c.folder, dtype=dtype)
        if card:
            w.write_card(
                recipe_yaml=RECIPE,
                base_model="org/base",
                models=["org/a", "org/b"],
                method="linear",
            )
        return w.commit()


def _logits(folder: Path, **kwargs) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    with torch.no_grad():
        return model(input_ids=sample_ids(123)).logits


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_round_trip(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    out = _write(tiny_base, tmp_path / "out")
    assert out == tmp_path / "out"
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(
        [
            "README.md",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
    assert torch.equal(_logits(out), _logits(tiny_base))

    tok_src = AutoTokenizer.from_pretrained(str(tiny_base))
    tok_out = AutoTokenizer.from_pretrained(str(out))
    text = "the cat will run to the river"
    assert tok_out(text)["input_ids"] == tok_src(text)["input_ids"]
    assert tok_out.pad_token == "[PAD]"
    assert _leftovers(tmp_path) == []


def test_tied_embeddings_round_trip(tmp_path: Path, tiny_gpt2: Path) -> None:
    # GPT-2 stores only the input embedding; the output head must be re-tied on load.
    assert "lm_head.weight" not in open_checkpoint(tiny_gpt2)
    out = _write(tiny_gpt2, tmp_path / "out")
    assert torch.equal(_logits(out), _logits(tiny_gpt2))


def test_sharding(tmp_path: Path, tiny_base: Path) -> None:
    src = open_checkpoint(tiny_base)
    limit = 20_000
    out = _write(tiny_base, tmp_path / "out", max_shard_bytes=limit)
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    n = len(shards)
    assert n > 2
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert set(index["weight_map"]) == set(src.names())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == src.nbytes
    for shard in shards:
        with safe_open(str(out / shard), "pt") as f:
            keys = list(f.keys())
            assert f.metadata() == {"format": "pt"}
            size = sum(f.get_tensor(k).nbytes for k in keys)
        # Every shard respects the limit unless it holds a single oversized tensor.
        assert size <= limit or len(keys) == 1
        assert all(index["weight_map"][k] == shard for k in keys)
    assert torch.equal(_logits(out), _logits(tiny_base))
    # The sharded output reads back through evoray too.
    back = open_checkpoint(out)
    for name in src.names():
        assert torch.equal(back.get(name), src.get(name))


def test_bf16(tmp_path: Path, tiny_base: Path) -> None:
    out = _write(tiny_base, tmp_path / "out", dtype=torch.bfloat16)
    config = json.loads((out / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert config["torch_dtype"] == "bfloat16"
    assert open_checkpoint(out).info("lm_head.weight").dtype == torch.bfloat16
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype="auto")
    assert model.dtype == torch.bfloat16
    logits = _logits(out, dtype=torch.float32)
    assert torch.allclose(logits, _logits(tiny_base), atol=0.05)


def test_nested_config_dtype(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    config = {"model_type": "x", "torch_dtype": "float32", "text_config": {"dtype": "float32"}}
    (src / "config.json").write_text(json.dumps(config))
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.copy_support_files(src, dtype=torch.float16)
        out = w.commit()
    written = json.loads((out / "config.json").read_text())
    assert written["torch_dtype"] == written["dtype"] == "float16"
    assert written["text_config"]["dtype"] == "float16"


def test_support_files_copied(tmp_path: Path) -> None:
    src = make_tokenizer(tmp_path / "src")
    for name in ("vocab.txt", "merges.txt", "special_tokens_map.json", "chat_template.jinja"):
        (src / name).write_text(name)
    (src / "tokenizer.model").write_bytes(b"spm")
    (src / "training_args.bin").write_bytes(b"not copied")
    (src / "modeling_custom.py").write_text("# not copied without auto_map")
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.copy_support_files(src, dtype=None)
        out = w.commit()
    names = {p.name for p in out.iterdir()}
    assert {"vocab.txt", "merges.txt", "special_tokens_map.json", "chat_template.jinja"} <= names
    assert {"tokenizer.model", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "training_args.bin" not in names
    assert "modeling_custom.py" not in names
    assert "config.json" not in names


def test_remote_code_travels_with_auto_map(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"auto_map": {"AutoModel": "modeling_x.X"}}))
    (src / "modeling_x.py").write_text("# custom")
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.copy_support_files(src, dtype=None)
        out = w.commit()
    assert (out / "modeling_x.py").is_file()


def test_shared_and_strided_tensors(tmp_path: Path) -> None:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    tensors = {
        "a": base,
        "tied": base,  # same storage as "a"
        "t": base.t(),  # non-contiguous view
        "row": base[1],  # view into a larger storage
    }
    with ModelFolderWriter(tmp_path / "out") as w:
        for name, t in tensors.items():
            w.add(name, t)
        base.zero_()  # the writer holds its own copies
        out = w.commit()
    back = open_checkpoint(out)
    expected = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    assert torch.equal(back.get("a"), expected)
    assert torch.equal(back.get("tied"), expected)
    assert torch.equal(back.get("t"), expected.t())
    assert torch.equal(back.get("row"), expected[1])


def test_oversized_tensor_gets_own_shard(tmp_path: Path) -> None:
    with ModelFolderWriter(tmp_path / "out", max_shard_bytes=64) as w:
        w.add("small1", torch.ones(4))
        w.add("big", torch.ones(100))
        w.add("small2", torch.ones(4))
        out = w.commit()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3
    assert index["metadata"]["total_size"] == 4 * 108


def test_overwrite_refused(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    with pytest.raises(CheckpointError, match="--overwrite") as err:
        ModelFolderWriter(out)
    assert str(out) in str(err.value)
    assert (out / "old.txt").read_text() == "keep"
    assert _leftovers(tmp_path) == []


def test_overwrite_replaces(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("stale")
    (out / "mergekit_config.yml").write_text("merge_method: linear\n")  # a mergekit output
    with ModelFolderWriter(out, overwrite=True) as w:
        w.add("w", torch.ones(2))
        assert (out / "old.txt").exists()  # untouched until commit
        w.commit()
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert _leftovers(tmp_path) == []


def test_empty_existing_folder_is_fine(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    with ModelFolderWriter(out) as w:
        w.add("w", torch.ones(2))
        w.commit()
    assert (out / "model.safetensors").is_file()


def test_exception_leaves_nothing(tmp_path: Path, tiny_base: Path) -> None:
    out = tmp_path / "out"
    with (
        pytest.raises(RuntimeError, match="boom"),
        ModelFolderWriter(out, max_shard_bytes=10_000) as w,
    ):
        c = open_checkpoint(tiny_base)
        for name in c.names():
            w.add(name, c.get(name))  # several shards already flushed to the temp dir
        w.copy_support_files(c.folder, dtype=None)
        assert w.tmp_dir.exists() and any(w.tmp_dir.glob("*.safetensors"))
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_exit_without_commit_discards(tmp_path: Path) -> None:
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
    assert list(tmp_path.iterdir()) == []


def test_misuse(tmp_path: Path) -> None:
    w = ModelFolderWriter(tmp_path / "out")
    with pytest.raises(CheckpointError, match="No tensors"):
        w.commit()
    w.add("w", torch.ones(2))
    with pytest.raises(CheckpointError, match=r"'w'.*twice"):
        w.add("w", torch.ones(2))
    w.commit()
    with pytest.raises(CheckpointError, match="already committed"):
        w.add("v", torch.ones(2))
    w.abort()  # no-op after commit
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_output_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "out").write_text("x")
    with pytest.raises(CheckpointError, match="is a file"):
        ModelFolderWriter(tmp_path / "out")


def test_card(tmp_path: Path, tiny_base: Path) -> None:
    out = _write(tiny_base, tmp_path / "out")
    text = (out / "README.md").read_text()
    assert text.startswith("---\n")
    front = yaml.safe_load(text.split("---\n")[1])
    assert front == {
        "base_model": "org/base",
        "library_name": "transformers",
        "tags": ["merge", "evoray"],
    }
    assert f"```yaml\n{RECIPE}```" in text
    assert "`linear`" in text
    assert "- `org/a`" in text and "- `org/b`" in text


def test_card_local_base_and_fenced_recipe(tmp_path: Path, tiny_base: Path) -> None:
    recipe = "notes: |\n  ```\n  code\n  ```\n"
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.write_card(recipe_yaml=recipe, base_model=str(tiny_base), models=[], method="ties")
        out = w.commit()
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---\n")[1])
    assert "base_model" not in front  # local paths are not hub ids
    assert str(tiny_base) in text
    assert f"````yaml\n{recipe}````" in text


def test_config_and_tokenizer_from_different_folders(tmp_path: Path, tiny_base: Path) -> None:
    tok_src = make_tokenizer(tmp_path / "tok")
    (tok_src / "tokenizer.model").write_bytes(b"spm")
    (tok_src / "config.json").write_text(json.dumps({"model_type": "other"}))
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.copy_support_files(tok_src, dtype=None)  # config + tokenizer from tok_src
        w.copy_support_files(tiny_base, dtype=torch.float16, tokenizer=False)  # config only
        out = w.commit()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["dtype"] == "float16"
    assert (out / "tokenizer.model").read_bytes() == b"spm"

    with ModelFolderWriter(tmp_path / "out2") as w:
        w.add("w", torch.ones(2))
        w.copy_support_files(tok_src, dtype=None)
        w.copy_support_files(tiny_base, dtype=None, config=False)  # replaces the tokenizer
        out2 = w.commit()
    assert json.loads((out2 / "config.json").read_text())["model_type"] == "other"
    assert not (out2 / "tokenizer.model").exists()
    assert (out2 / "tokenizer.json").read_bytes() == (tiny_base / "tokenizer.json").read_bytes()


def test_chat_template(tmp_path: Path, tiny_base: Path) -> None:
    from transformers import AutoTokenizer

    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    with ModelFolderWriter(tmp_path / "out") as w:
        w.add("w", torch.ones(2))
        w.set_chat_template(template)  # before the copy: still wins
        w.copy_support_files(tiny_base, dtype=None)
        out = w.commit()
    assert (out / "chat_template.jinja").read_text() == template
    assert json.loads((out / "tokenizer_config.json").read_text())["chat_template"] == template
    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "user", "content": "the cat"}, {"role": "assistant", "content": "run"}]
    assert tok.apply_chat_template(messages, tokenize=False) == "the cat run "
