"""Where a tensor sits in a transformer: its block index, the layer count, and its position
``t`` in [0, 1] for parameter gradients, as mergekit assigns them (merges, kinship groups)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
_PRE_RE = re.compile(r"embed|wte|wpe|word_embeddings|position_embeddings|token_type")
NUM_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def layer_index(tensor_name: str) -> int | None:
    """Index of the transformer block a tensor belongs to, or None for embeddings and heads."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def block_prefix(tensor_name: str) -> str | None:
    """Module path of the block a tensor belongs to (``model.layers.3``), or None outside the
    blocks; unlike the index it tells an encoder's block 0 from a decoder's."""
    m = _LAYER_RE.search(tensor_name)
    return tensor_name[: m.end() - 1] if m else None


def num_layers(config: Mapping[str, Any] | None, tensor_names: list[str]) -> int:
    """Layer count from the HF config, else from the tensor names."""
    for key in NUM_LAYER_KEYS:
        if config and isinstance(config.get(key), int):
            return config[key]
    indices = [i for i in map(layer_index, tensor_names) if i is not None]
    return max(indices) + 1 if indices else 0


def before_blocks(tensor_name: str) -> bool:
    """True for a tensor that sits before the first block (token/position embeddings)."""
    return layer_index(tensor_name) is None and bool(_PRE_RE.search(tensor_name))


def tensor_position(tensor_name: str, n_layers: int) -> float:
    """Gradient position ``t`` of a tensor, as mergekit assigns it.

    Block ``i`` of ``n`` gets ``i / (n - 1)`` (1 when there is a single block). Every tensor
    outside the blocks gets 0: the embeddings, and also the final norm and heads, because
    mergekit's planner reads those with the module's ``ConfigReader`` built at ``t=0``
    (``plan_module`` in mergekit/plan.py), so ``weight: [0.2, 1.0]`` gives lm_head 0.2.
    """
    idx = layer_index(tensor_name)
    if idx is None:
        return 0.0
    if n_layers <= 1:
        return 1.0
    return min(idx, n_layers - 1) / (n_layers - 1)
