"""Layouts and flat task vectors, on in-memory stand-ins for checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch

from evoray.errors import LayoutError
from evoray.weights.flat import FlatWeights, flatten, task_vectors
from evoray.weights.layout import Layout, check_same_architecture


@dataclass(frozen=True)
class Info:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


class DictCheckpoint:
    """Minimal Checkpoint protocol over a dict, counting reads."""

    def __init__(self, tensors: dict[str, torch.Tensor], source: str = "mem", config=None):
        self.tensors, self.source, self.config = tensors, source, config
        self.reads: list[str] = []

    def names(self):
        return list(self.tensors)

    def info(self, name):
        t = self.tensors[name]
        return Info(name, tuple(t.shape), t.dtype)

    def get(self, name):
        self.reads.append(name)
        return self.tensors[name].clone()


def model(seed: int, dtype=torch.float32) -> DictCheckpoint:
    g = torch.Generator().manual_seed(seed)
    return DictCheckpoint(
        {
            "emb.weight": torch.randn(5, 3, generator=g).to(dtype),
            "position_ids": torch.arange(4),
            "layers.0.w": torch.randn(3, 3, generator=g).to(dtype),
            "norm.weight": torch.randn(3, generator=g).to(dtype),
        },
        source=f"model{seed}",
    )


def test_layout_offsets_skip_non_float():
    layout = Layout.from_checkpoint(model(0))
    assert layout.names == ["emb.weight", "layers.0.w", "norm.weight"]
    assert [s.offset for s in layout.slots] == [0, 15, 24]
    assert layout.numel == 27
    assert layout.storage_dtype == torch.float32
    assert layout.nbytes == 27 * 4


def test_mixed_dtypes_store_as_float32():
    ckpt = model(0)
    ckpt.tensors["norm.weight"] = ckpt.tensors["norm.weight"].half()
    assert Layout.from_checkpoint(ckpt).storage_dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_task_vector_is_difference_in_source_dtype(dtype):
    base, ft = model(0, dtype), model(1, dtype)
    (tv,) = task_vectors([ft], base, chunk_elems=4)  # chunks smaller than tensors
    assert tv.as_tensor().dtype == dtype
    for name in ["emb.weight", "layers.0.w", "norm.weight"]:
        expected = (ft.tensors[name].float() - base.tensors[name].float()).to(dtype)
        assert torch.equal(tv.tensor(name), expected)


def test_bf16_storage_is_zero_copy_numpy():
    tv = flatten(model(0, torch.bfloat16))
    assert tv.data.dtype == np.uint16
    tv.tensor("norm.weight")[0] = 2.0
    assert tv.as_tensor()[24].item() == 2.0
    assert torch.equal(tv.tensor("emb.weight"), model(0, torch.bfloat16).tensors["emb.weight"])


def test_task_vectors_read_base_once_per_tensor():
    base, fts = model(0), [model(1), model(2), model(3)]
    tvs = task_vectors(fts, base)
    assert base.reads == ["emb.weight", "layers.0.w", "norm.weight"]
    assert len(tvs) == 3
    # base + tv recovers each fine-tune
    for ft, tv in zip(fts, tvs, strict=True):
        rebuilt = flatten(base).as_tensor() + tv.as_tensor()
        assert torch.allclose(rebuilt, flatten(ft).as_tensor(), atol=1e-6)


def test_state_dict_views():
    flat = flatten(model(0))
    sd = flat.state_dict()
    assert set(sd) == {"emb.weight", "layers.0.w", "norm.weight"}
    sd["layers.0.w"].zero_()
    assert flat.as_tensor()[15:24].abs().sum() == 0


def test_mismatches_name_the_tensor():
    base = model(0)
    missing = model(1)
    del missing.tensors["layers.0.w"]
    with pytest.raises(LayoutError, match=r"'layers\.0\.w'.*missing from model1"):
        task_vectors([missing], base)
    reshaped = model(1)
    reshaped.tensors["norm.weight"] = torch.zeros(4)
    with pytest.raises(LayoutError, match=r"'norm\.weight' has shape \[4\]"):
        task_vectors([reshaped], base)
    extra = model(1)
    extra.tensors["head.weight"] = torch.zeros(2)
    with pytest.raises(LayoutError, match=r"'head\.weight' of model1 is missing from model0"):
        task_vectors([extra], base)
    assert base.reads == []  # failed before reading any data


def test_architecture_mismatch_names_field():
    with pytest.raises(LayoutError, match="hidden_size"):
        check_same_architecture(
            {"a": {"model_type": "llama", "hidden_size": 8}, "b": {"hidden_size": 16}}
        )
    with pytest.raises(LayoutError, match="model_type"):
        check_same_architecture({"a": {"model_type": "llama"}, "b": {"model_type": "gpt2"}})
    check_same_architecture({"a": {"model_type": "llama"}, "b": None})


def test_flat_buffer_validation():
    layout = Layout.from_checkpoint(model(0))
    with pytest.raises(LayoutError, match="needs"):
        FlatWeights(layout, np.zeros(3, dtype=np.float32))
    with pytest.raises(LayoutError, match="no floating-point"):
        Layout.from_checkpoint(DictCheckpoint({"ids": torch.arange(3)}))
