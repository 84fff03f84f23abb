"""The one per-tensor merge walker: a merge config's parameters resolved for each tensor, and
the registered method applied to that tensor's inputs.

``evoray merge`` streams tensors from checkpoints through it (``merge.streaming``); search
strategies merge flat population vectors through it slot by slot (``merge_slots``), their
recipes turned into the same ``MergeConfig`` a YAML file gives. So gradients, filters and
slices mean one thing everywhere, and a recipe found by search and the mergekit YAML exported
from it give the same model.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from evoray.config.merge_config import MergeConfig
from evoray.merge.method import MergeMethod
from evoray.merge.registry import get_method
from evoray.weights.layout import Layout, Slot


@dataclass(frozen=True)
class TensorMerge:
    """How every tensor of one merge is merged: the method, the config that holds the
    parameters (gradients, filters, slices) and which config models are the method's inputs."""

    config: MergeConfig
    method: MergeMethod
    n_layers: int
    model_indices: tuple[int, ...]  # config.models index of each input (the base excluded)
    seed: int = 0

    def parameters(self, tensor_name: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """Per-model and global parameter values for one tensor (gradients and filters
        applied). Global values go to the method as defaults, so it validates them even where
        every model overrides them (a typo there should not pass silently)."""
        t, k = self.config.locate(tensor_name, self.n_layers)
        model_params: list[dict[str, Any]] = [{} for _ in self.model_indices]
        params: dict[str, Any] = {}
        for p in self.method.params:
            value = self.config.global_parameter(p.name, tensor_name, t, slice_index=k)
            if value is not None:
                params[p.name] = value
            if p.per_model:
                for j, i in enumerate(self.model_indices):
                    value = self.config.model_parameter(
                        p.name, i, tensor_name, t, fallback=False, slice_index=k
                    )
                    if value is not None:
                        model_params[j][p.name] = value
        return model_params, params

    def merge(
        self,
        name: str,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        out: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Merge one tensor's inputs (the base only where the method uses one)."""
        model_params, params = self.parameters(name)
        return self.method.merge(
            list(tensors),
            base if self.method.needs_base else None,
            model_params,
            params,
            seed=self.seed,
            tensor_name=name,
            out=out,
        )


def recipe_config(
    method: str, model_settings: Sequence[Mapping[str, Any]], settings: Mapping[str, Any]
) -> MergeConfig:
    """A search recipe (per-model and global parameters over unnamed models) as the merge
    config the same YAML would give."""
    return MergeConfig.from_dict(
        {
            "merge_method": method,
            "models": [
                {"model": f"member-{i}", "parameters": dict(p)}
                for i, p in enumerate(model_settings)
            ],
            "parameters": dict(settings),
        },
        source=f"{method} recipe",
    )


def merge_slots(
    method: str,
    layout: Layout,
    members: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    model_settings: Sequence[Mapping[str, Any]],
    settings: Mapping[str, Any],
    *,
    n_layers: int,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> Iterator[tuple[Slot, torch.Tensor]]:
    """Merge flat vectors slot by slot, yielding ``(slot, merged)``; settings may be
    gradients/filters like in a config.

    ``members`` are the non-base models (what ``MergeMethod.merge`` calls ``tensors``) and
    ``model_settings[i]`` their per-model parameters; ``settings`` the global ones. Each slot's
    inputs are moved to ``device`` (the members' own by default) and merged there into one
    float32 scratch of the largest tensor, so a merge needs the inputs and one tensor of
    memory, never a whole model: ``merged`` is that scratch, valid until the next slot.
    """
    if len(model_settings) != len(members):
        raise ValueError(f"{len(model_settings)} parameter sets for {len(members)} models")
    walker = TensorMerge(
        config=recipe_config(method, model_settings, settings),
        method=get_method(method),
        n_layers=n_layers,
        model_indices=tuple(range(len(members))),
        seed=seed,
    )
    device = members[0].device if device is None else torch.device(device)
    scratch = torch.empty(max(s.numel for s in layout.slots), device=device)
    for s in layout.slots:
        sl = slice(s.offset, s.offset + s.numel)
        merged = walker.merge(
            s.name,
            [x[sl].view(s.shape).to(device) for x in members],
            None if base is None else base[sl].view(s.shape).to(device),
            out=scratch[: s.numel].view(s.shape),
        )
        yield s, merged


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
    """``merge_slots`` gathered into one flat vector: ``out`` (allocated in the members'
    dtype if not given)."""
    out = torch.empty_like(members[0]) if out is None else out
    for s, merged in merge_slots(
        method, layout, members, base, model_settings, settings, n_layers=n_layers, seed=seed
    ):
        out[s.offset : s.offset + s.numel] = merged.reshape(-1)
    return out
