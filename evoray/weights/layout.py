"""One tensor layout shared by a set of checkpoints.

Merging only makes sense between models of one architecture: same floating tensor names, shapes
and (up to precision) dtypes. ``Layout`` records that shape of a model once, with element offsets
so a model's floating parameters can live in one flat vector (the weight space), and checks other
checkpoints against it with errors that name the first offending tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from math import prod
from typing import Any, Protocol

import torch

from evoray.errors import LayoutError

# Config fields that must agree for two checkpoints to be merge-compatible.
ARCH_KEYS = (
    "model_type",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
    "vocab_size",
    "n_embd",
    "n_layer",
    "n_head",
)

# Input-embedding tensors an output head may be tied to (``tie_word_embeddings``).
_EMBEDDING_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "embed_in.weight",
    "shared.weight",
)
_HEAD_NAMES = ("lm_head.weight", "embed_out.weight")


class TensorSource(Protocol):
    """What a layout needs from a checkpoint (``evoray.weights.checkpoint.Checkpoint`` fits)."""

    source: str
    config: dict | None

    def names(self) -> list[str]: ...
    def info(self, name: str) -> Any: ...


@dataclass(frozen=True)
class Slot:
    """Where one tensor lives in the flat vector."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int

    @property
    def numel(self) -> int:
        return prod(self.shape)


@dataclass(frozen=True)
class Layout:
    """Names, shapes, dtypes and flat offsets of a model's floating tensors.

    ``storage_dtype`` is the one dtype of the flat vector: the checkpoint's float dtype, or
    float32 if it mixes several (so nothing is rounded when flattening).
    """

    slots: tuple[Slot, ...]
    storage_dtype: torch.dtype
    source: str = ""
    # (head, embedding) pairs that the config ties: the head is the embedding, so it is not a
    # slot of its own (counted once, and kept tied when bound to a model or exported).
    tied: tuple[tuple[str, str], ...] = ()

    @property
    def numel(self) -> int:
        return self.slots[-1].offset + self.slots[-1].numel if self.slots else 0

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    @property
    def nbytes(self) -> int:
        return self.numel * self.storage_dtype.itemsize

    @cached_property
    def _by_name(self) -> dict[str, Slot]:
        return {s.name: s for s in self.slots}

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def slot(self, name: str) -> Slot:
        try:
            return self._by_name[name]
        except KeyError:
            raise LayoutError(f"tensor {name!r} is not in the layout of {self.source}") from None

    @classmethod
    def from_infos(cls, infos: Iterable[Any], *, source: str = "") -> Layout:
        """Build from ``TensorInfo``-like objects (name, shape, dtype); non-floats are skipped."""
        slots, offset, dtypes = [], 0, set()
        for info in infos:
            if not info.dtype.is_floating_point:
                continue
            slots.append(Slot(info.name, tuple(info.shape), info.dtype, offset))
            offset += prod(info.shape)
            dtypes.add(info.dtype)
        if not slots:
            raise LayoutError(f"{source}: no floating-point tensors to merge")
        storage = dtypes.pop() if len(dtypes) == 1 else torch.float32
        return cls(tuple(slots), storage, source)

    @classmethod
    def from_checkpoint(cls, ckpt: TensorSource) -> Layout:
        return cls.from_infos((ckpt.info(n) for n in ckpt.names()), source=ckpt.source)

    @classmethod
    def for_model(cls, ckpt: TensorSource) -> Layout:
        """The weight space of a whole model: every floating tensor of the checkpoint (heads
        included), except an output head its config ties to the input embedding, which
        would otherwise be evolved as a second, diverging copy."""
        names = ckpt.names()
        tied = tied_pairs(ckpt.config, names)
        heads = {h for h, _ in tied}
        layout = cls.from_infos((ckpt.info(n) for n in names if n not in heads), source=ckpt.source)
        return cls(layout.slots, layout.storage_dtype, layout.source, tied)

    @property
    def tied_names(self) -> set[str]:
        """Tensor names that are views of another slot (not stored, not written)."""
        return {h for h, _ in self.tied}

    def check(self, ckpt: TensorSource) -> None:
        """Raise ``LayoutError`` naming the first tensor where ``ckpt`` differs from this layout."""
        names = set(ckpt.names())
        skip = self.tied_names
        for s in self.slots:
            if s.name not in names:
                raise LayoutError(
                    f"tensor {s.name!r} of {self.source} is missing from {ckpt.source}: "
                    "models to merge must share one architecture"
                )
            info = ckpt.info(s.name)
            if tuple(info.shape) != s.shape:
                raise LayoutError(
                    f"tensor {s.name!r} has shape {list(info.shape)} in {ckpt.source} but "
                    f"{list(s.shape)} in {self.source}: models to merge must share one architecture"
                )
            if not info.dtype.is_floating_point:
                raise LayoutError(
                    f"tensor {s.name!r} is {info.dtype} in {ckpt.source} but {s.dtype} in "
                    f"{self.source}"
                )
        own = {s.name for s in self.slots}
        for name in ckpt.names():
            if name not in own and name not in skip and ckpt.info(name).dtype.is_floating_point:
                raise LayoutError(
                    f"tensor {name!r} of {ckpt.source} is missing from {self.source}: "
                    "models to merge must share one architecture"
                )


def ties_embeddings(config: Mapping[str, Any]) -> bool:
    """``tie_word_embeddings`` of a config.json: its value, else its model type's default in
    transformers (Llama's is False, GPT-2's True), else transformers' general default (True)."""
    if "tie_word_embeddings" in config:
        return bool(config["tie_word_embeddings"])
    try:
        from transformers import CONFIG_MAPPING

        return bool(getattr(CONFIG_MAPPING[config["model_type"]](), "tie_word_embeddings", True))
    except Exception:  # unknown or custom model type: transformers' PretrainedConfig default
        return True


def tied_pairs(
    config: Mapping[str, Any] | None, names: Iterable[str]
) -> tuple[tuple[str, str], ...]:
    """``(head, embedding)`` pairs of ``names`` that ``config`` ties (``tie_word_embeddings``,
    True when absent, as in transformers). Checkpoints saved by transformers already leave the
    tied head out; some exporters write both copies."""
    if config is None or not ties_embeddings(config):
        return ()
    names = list(names)
    embeddings = [n for n in names if n.endswith(_EMBEDDING_SUFFIXES)]
    if not embeddings:
        return ()
    return tuple((h, embeddings[0]) for h in _HEAD_NAMES if h in names)


def check_same_architecture(configs: Mapping[str, Mapping[str, Any] | None]) -> None:
    """Compare HF configs (label -> config.json dict); raise naming the field that differs."""
    items = [(label, cfg) for label, cfg in configs.items() if cfg]
    if len(items) < 2:
        return
    ref_label, ref = items[0]
    for label, cfg in items[1:]:
        for key in ARCH_KEYS:
            if key in ref and key in cfg and ref[key] != cfg[key]:
                raise LayoutError(
                    f"config field {key!r} is {cfg[key]!r} in {label} but {ref[key]!r} in "
                    f"{ref_label}: models to merge must share one architecture"
                )
