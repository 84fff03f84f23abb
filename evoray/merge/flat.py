"""Merge methods applied to flat weight vectors, tensor by tensor, with mergekit's semantics.

Search strategies keep models as flat vectors (``evoray.weights.flat``), but methods such as
SLERP, TIES and model stock are defined per tensor (norms, top-k and cosines are per tensor).
``merge_flat`` walks the layout's slots and merges each slot's views exactly as ``evoray merge``
merges that tensor from checkpoints, including per-layer gradients and filters, so a recipe
found by search and the mergekit YAML exported from it give the same model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from evoray.config.merge_config import evaluate_setting, tensor_position
from evoray.merge.registry import get_method
from evoray.weights.layout import Layout


def merge_flat(
    method: str,
    layout: Layout,
    members: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_settings: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    *,
    n_layers: int,
    seed: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Merge flat vectors slot by slot; settings may be gradients/filters like in a config.

    ``members`` are the non-base models (what ``MergeMethod.merge`` calls ``tensors``) and
    ``model_settings[i]`` their per-model parameters; ``settings`` the global ones. Returns
    ``out`` (allocated in the members' dtype if not given).
    """
    m = get_method(method)
    if len(model_settings) != len(members):
        raise ValueError(f"{len(model_settings)} parameter sets for {len(members)} models")
    out = torch.empty_like(members[0]) if out is None else out
    scratch = torch.empty(max(s.numel for s in layout.slots))
    for s in layout.slots:
        t = tensor_position(s.name, n_layers)
        per = [_resolve(ms, s.name, t) for ms in model_settings]
        glob = _resolve(settings, s.name, t)
        sl = slice(s.offset, s.offset + s.numel)
        view = scratch[: s.numel].view(s.shape)
        merged = m.merge(
            [x[sl].view(s.shape) for x in members],
            None if base is None or not m.needs_base else base[sl].view(s.shape),
            per,
            glob,
            seed=seed,
            tensor_name=s.name,
            out=view,
        )
        out[sl] = merged.reshape(-1)
    return out


def _resolve(settings: Mapping[str, Any], name: str, t: float) -> dict[str, Any]:
    resolved = {}
    for key, value in settings.items():
        v = evaluate_setting(value, name, t)
        if v is not None:
            resolved[key] = v
    return resolved
