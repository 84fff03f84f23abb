"""Tests for lazy checkpoint reading (evoray.weights.checkpoint)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import evoray.weights.checkpoint as ckpt_mod
from evoray.errors import CheckpointError, EvorayError
from evoray.weights.checkpoint import Checkpoint, open_checkpoint
from evoray.weights.loading import load_model
from evoray.weights.tensor_files import TensorInfo
from tests.factories import make_fake_hub_cache, make_tiny_model


def _all_tensors(c: Checkpoint) -> dict[str, torch.Tensor]:
    return {n: c.get(n) for n in c.names()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as tiny_base (same seed), saved in several shards."""
    return make_tiny_model(tmp_path_factory.mktemp("sharded") / "m", seed=0, max_shard_size="20KB")


@pytest.fixture(scope="module")
def pickled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Same weights as tiny_base, saved as pytorch_model.bin."""
    return make_tiny_model(
        tmp_path_factory.mktemp("pickled") / "m", seed=0, safe_serialization=False
    )


@pytest.fixture
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tiny_base: Path) -> Path:
    """An offline HF cache holding tiny_base as ``org/tiny`` (branch main and tag v1)."""
    cache = tmp_path / "hub"
    make_fake_hub_cache(cache, "org/tiny", tiny_base, commit="a" * 40)
    make_fake_hub_cache(cache, "org/tiny", tiny_base, commit="b" * 40, ref="v1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


# -- sources ----------------------------------------------------------------------------------


def test_folder(tiny_base: Path) -> None:
    expected = load_file(str(tiny_base / "model.safetensors"))
    with open_checkpoint(tiny_base) as c:
        assert c.path == tiny_base
        assert c.folder == tiny_base
        assert c.source == str(tiny_base)
        assert c.config is not None and c.config["model_type"] == "llama"
        assert c.format == "safetensors"
        assert len(c) == len(expected)
        assert set(c.names()) == set(expected)
        assert "model.embed_tokens.weight" in c
        assert "nope" not in c
        assert c.nbytes == sum(t.numel() * t.element_size() for t in expected.values())
        _assert_same(_all_tensors(c), expected)


def test_str_source_and_names_in_header_order(tiny_base: Path) -> None:
    file = tiny_base / "model.safetensors"
    (n,) = struct.unpack("<Q", file.read_bytes()[:8])
    header = json.loads(file.read_bytes()[8 : 8 + n])
    order = [k for k in header if k != "__metadata__"]
    assert open_checkpoint(str(tiny_base)).names() == order


def test_sharded_folder(sharded: Path, tiny_base: Path) -> None:
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    c = open_checkpoint(sharded)
    assert c.names() == list(index["weight_map"])
    assert len(c.files) == len(set(index["weight_map"].values()))
    _assert_same(_all_tensors(c), _all_tensors(open_checkpoint(tiny_base)))


def test_single_file(tiny_base: Path) -> None:
    file = tiny_base / "model.safetensors"
    c = open_checkpoint(file)
    assert c.path == file
    assert c.folder is None
    assert c.config is None
    _assert_same(_all_tensors(c), load_file(str(file)))


def test_folder_of_loose_safetensors_files(tmp_path: Path) -> None:
    save_file({"b": torch.ones(2), "a": torch.zeros(3)}, str(tmp_path / "part1.safetensors"))
    save_file({"c": torch.arange(4)}, str(tmp_path / "part2.safetensors"))
    c = open_checkpoint(tmp_path)
    assert set(c.names()) == {"a", "b", "c"}
    assert c.names()[-1] == "c"  # files in name order
    assert c.info("c") == TensorInfo("c", (4,), torch.int64)  # non-float tensors kept
    assert torch.equal(c.get("c"), torch.arange(4))


def test_duplicate_name_across_loose_files(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, str(tmp_path / "x.safetensors"))
    save_file({"a": torch.ones(2)}, str(tmp_path / "y.safetensors"))
    with pytest.raises(CheckpointError, match=r"'a'.*x\.safetensors.*y\.safetensors"):
        open_checkpoint(tmp_path)


# -- laziness ---------------------------------------------------------------------------------


class _SpyHandle:
    def __init__(self, handle, log: list[str]) -> None:
        self._handle = handle
        self._log = log

    def get_tensor(self, name: str) -> torch.Tensor:
        self._log.append(name)
        return self._handle.get_tensor(name)


def test_lazy_reads_one_tensor(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[str] = []
    reads: list[str] = []
    real = ckpt_mod.safe_open

    def spy(path, *args, **kwargs):
        opened.append(Path(path).name)
        return _SpyHandle(real(path, *args, **kwargs), reads)

    monkeypatch.setattr(ckpt_mod, "safe_open", spy)
    c = open_checkpoint(sharded)
    infos = {n: c.info(n) for n in c.names()}
    assert opened == [] and reads == []  # names and infos come from headers alone

    name = "model.layers.1.mlp.down_proj.weight"
    t = c.get(name)
    assert reads == [name]
    assert len(opened) == 1
    assert (tuple(t.shape), t.dtype) == (infos[name].shape, infos[name].dtype)

    c.get(name)
    assert len(opened) == 1  # handle kept
    c.close()
    c.get(name)
    assert len(opened) == 2  # reopened after close


def test_info_matches_get(tiny_gpt2: Path) -> None:
    c = open_checkpoint(tiny_gpt2)
    for name in c.names():
        info = c.info(name)
        t = c.get(name)
        assert info.name == name
        assert info.shape == tuple(t.shape)
        assert info.dtype == t.dtype
        assert info.nbytes == t.numel() * t.element_size()


def test_unknown_tensor_names_source(tiny_base: Path) -> None:
    c = open_checkpoint(tiny_base)
    with pytest.raises(CheckpointError, match=r"'missing\.weight'.*base"):
        c.info("missing.weight")
    with pytest.raises(CheckpointError, match=r"missing\.weight"):
        c.get("missing.weight")


def test_bf16_dtype_from_header(tmp_path: Path) -> None:
    save_file({"w": torch.ones(3, 2, dtype=torch.bfloat16)}, str(tmp_path / "w.safetensors"))
    c = open_checkpoint(tmp_path / "w.safetensors")
    assert c.info("w") == TensorInfo("w", (3, 2), torch.bfloat16)
    assert c.nbytes == 12


# -- pickle -----------------------------------------------------------------------------------


def test_pickle_folder_refused(pickled: Path) -> None:
    with pytest.raises(CheckpointError, match="--allow-pickle") as err:
        open_checkpoint(pickled)
    assert "pytorch_model.bin" in str(err.value)
    assert "arbitrary code" in str(err.value)


def test_pickle_file_refused(pickled: Path) -> None:
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(pickled / "pytorch_model.bin")


def test_pickle_allowed(pickled: Path, tiny_base: Path) -> None:
    expected = _all_tensors(open_checkpoint(tiny_base))
    for source in (pickled, pickled / "pytorch_model.bin"):
        c = open_checkpoint(source, allow_pickle=True)
        assert c.format == "pickle"
        assert c.info("lm_head.weight").shape == tuple(expected["lm_head.weight"].shape)
        _assert_same(_all_tensors(c), expected)
        # get() hands out copies: editing one must not change the next read.
        c.get("lm_head.weight").zero_()
        assert torch.equal(c.get("lm_head.weight"), expected["lm_head.weight"])


def test_sharded_pickle_allowed(tmp_path: Path, tiny_base: Path) -> None:
    folder = make_tiny_model(
        tmp_path / "m", seed=0, max_shard_size="20KB", safe_serialization=False
    )
    assert (folder / "pytorch_model.bin.index.json").is_file()
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        open_checkpoint(folder)
    c = open_checkpoint(folder, allow_pickle=True)
    _assert_same(_all_tensors(c), _all_tensors(open_checkpoint(tiny_base)))


# -- damaged or missing -----------------------------------------------------------------------


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_header(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    garbage = b"{not json"
    bad.write_bytes(struct.pack("<Q", len(garbage)) + garbage + b"\0" * 16)
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*not valid JSON.*download"):
        open_checkpoint(bad)


def test_header_length_beyond_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", 10_000) + b"{}")
    with pytest.raises(CheckpointError, match=r"bad\.safetensors.*header length"):
        open_checkpoint(bad)


def test_too_short_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\1\2")
    with pytest.raises(CheckpointError, match="too short"):
        open_checkpoint(bad)


def test_unknown_dtype(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0")
    with pytest.raises(CheckpointError, match=r"'w'.*'Q7'"):
        open_checkpoint(bad)


def test_size_mismatch(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 8]}}).encode()
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"'w'.*16 bytes.*spans 8"):
        open_checkpoint(bad)


def test_truncated_file(tmp_path: Path, tiny_base: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "m")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*truncated or corrupt"):
        open_checkpoint(folder)


def test_missing_shard(tmp_path: Path, sharded: Path) -> None:
    folder = _copy(sharded, tmp_path / "m")
    (folder / "model-00002-of-00006.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model-00002-of-00006\.safetensors.*missing"):
        open_checkpoint(folder)


def test_index_names_tensor_absent_from_shard(tmp_path: Path, sharded: Path) -> None:
    folder = _copy(sharded, tmp_path / "m")
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    index["weight_map"]["ghost.weight"] = "model-00001-of-00006.safetensors"
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"ghost\.weight"):
        open_checkpoint(folder)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="No weights found"):
        open_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "source", ["./nope", "/definitely/not/here", "a/b/c", "model.safetensors", "~/nope.bin"]
)
def test_missing_path(source: str) -> None:
    with pytest.raises(CheckpointError, match="not found") as err:
        open_checkpoint(source)
    assert source in str(err.value)


def test_missing_path_object(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        open_checkpoint(tmp_path / "org" / "name")


def test_errors_are_evoray_errors() -> None:
    assert issubclass(CheckpointError, EvorayError)


# -- hub --------------------------------------------------------------------------------------


def test_hub_id_from_offline_cache(hub_cache: Path, tiny_base: Path) -> None:
    c = open_checkpoint("org/tiny")
    assert c.source == "org/tiny"
    assert c.path == hub_cache / "models--org--tiny" / "snapshots" / ("a" * 40)
    assert c.folder == c.path
    assert c.config is not None and c.config["model_type"] == "llama"
    _assert_same(_all_tensors(c), _all_tensors(open_checkpoint(tiny_base)))


def test_hub_revision_from_offline_cache(hub_cache: Path) -> None:
    c = open_checkpoint("org/tiny", revision="v1")
    assert c.path.name == "b" * 40


def test_hub_unknown_id_offline(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match="'org/unknown-model'") as err:
        open_checkpoint("org/unknown-model")
    msg = str(err.value)
    assert "huggingface-cli download org/unknown-model" in msg
    assert "HF_HUB_OFFLINE" in msg


def test_hub_unknown_revision_offline(hub_cache: Path) -> None:
    with pytest.raises(CheckpointError, match=r"'org/tiny'.*'nope'"):
        open_checkpoint("org/tiny", revision="nope")


def test_hub_snapshot_without_safetensors(hub_cache: Path, pickled: Path) -> None:
    make_fake_hub_cache(hub_cache, "org/pickled", pickled, commit="c" * 40)
    # Pickle weights are not fetched without allow_pickle; the message says how to proceed.
    snapshot = hub_cache / "models--org--pickled" / "snapshots" / ("c" * 40)
    (snapshot / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match=r"'org/pickled'.*--allow-pickle"):
        open_checkpoint("org/pickled")


# -- load_model -------------------------------------------------------------------------------


def test_load_model(tiny_base: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = load_model(tiny_base, model_cls=AutoModelForCausalLM)
    c = open_checkpoint(tiny_base)
    state = model.state_dict()
    for name in c.names():
        assert torch.equal(state[name], c.get(name)), name


def test_load_model_from_hub_cache(hub_cache: Path) -> None:
    model = load_model("org/tiny")
    assert type(model).__name__ == "LlamaModel"


def test_load_model_auto_map_refused(tmp_path: Path, tiny_base: Path) -> None:
    folder = _copy(tiny_base, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="--trust-remote-code") as err:
        load_model(folder)
    assert str(folder) in str(err.value)
    assert "only if you trust" in str(err.value)


def test_load_model_pickle_refused(pickled: Path) -> None:
    with pytest.raises(CheckpointError, match="--allow-pickle"):
        load_model(pickled)
    model = load_model(pickled, allow_pickle=True)
    assert type(model).__name__ == "LlamaModel"


def test_load_model_needs_folder(tiny_base: Path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json"):
        load_model(tiny_base / "model.safetensors")


# -- factories (shared by other test modules) -------------------------------------------------


def test_finetunes_share_layout_and_differ(tiny_base: Path, tiny_finetunes: list[Path]) -> None:
    base = open_checkpoint(tiny_base)
    assert len(tiny_finetunes) == 3
    seen = []
    for folder in tiny_finetunes:
        ft = open_checkpoint(folder)
        assert ft.names() == base.names()
        assert all(ft.info(n) == base.info(n) for n in base.names())
        delta = ft.get("model.layers.0.self_attn.q_proj.weight") - base.get(
            "model.layers.0.self_attn.q_proj.weight"
        )
        assert 0 < delta.abs().max() < 1
        seen.append(delta)
    assert not torch.equal(seen[0], seen[1])


def test_factory_is_deterministic(tmp_path: Path, tiny_base: Path) -> None:
    again = make_tiny_model(tmp_path / "a", seed=0)
    _assert_same(_all_tensors(open_checkpoint(again)), _all_tensors(open_checkpoint(tiny_base)))
    ft1 = make_tiny_model(tmp_path / "f1", base=tiny_base, seed=5, steps=1, noise=0.01)
    ft2 = make_tiny_model(tmp_path / "f2", base=tiny_base, seed=5, steps=1, noise=0.01)
    _assert_same(_all_tensors(open_checkpoint(ft1)), _all_tensors(open_checkpoint(ft2)))


def test_other_archs_open(tiny_gpt2: Path, tiny_bert: Path) -> None:
    assert open_checkpoint(tiny_gpt2).config["model_type"] == "gpt2"
    bert = open_checkpoint(tiny_bert)
    assert bert.config["model_type"] == "bert"
    assert "bert.embeddings.word_embeddings.weight" in bert
