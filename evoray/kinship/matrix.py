"""Kinship of every pair of N models (Hu et al. 2024) relative to one base: ``kinship_matrix``
and its ``KinshipResult``.

The sums come from one streaming pass (``gram``), in parallel on Ray when it is up
(``remote``); the result prints as tables (``tables``) and plots (``plot``). Design notes,
accuracy and memory: docs/kinship.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from evoray.errors import EvorayError
from evoray.kinship.gram import CHUNK_ELEMS, METRICS, GramSums, group_order, group_sums
from evoray.kinship.remote import ray_enabled, ray_sums
from evoray.kinship.tables import format_layer_table, format_table, result_dict
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.layout import Layout

__all__ = ["KinshipResult", "kinship_matrix"]


@dataclass(frozen=True, eq=False)
class KinshipResult:
    """All pairwise kinship values of N models relative to one base.

    Holds the exact running sums (``total``, and per layer group in ``layers`` when asked for),
    so any metric can be read from it; ``metrics`` are the ones shown by ``to_dict`` and the CLI.
    """

    base: str
    sources: tuple[str, ...]
    labels: tuple[str, ...]
    total: GramSums
    layers: dict[str, GramSums] = field(default_factory=dict)
    metrics: tuple[str, ...] = METRICS

    def matrix(self, metric: str) -> np.ndarray:
        """N x N matrix over all floating tensors (symmetric; see ``GramSums.matrix``)."""
        return self.total.matrix(metric)

    def layer_matrix(self, layer: str, metric: str) -> np.ndarray:
        try:
            return self.layers[layer].matrix(metric)
        except KeyError:
            raise KeyError(f"no per-layer values for {layer!r}; have {list(self.layers)}") from None

    @property
    def per_layer(self) -> dict[str, dict[str, np.ndarray]]:
        """``{layer group: {metric: N x N matrix}}`` in model order (empty unless per_layer)."""
        return {k: {m: s.matrix(m) for m in self.metrics} for k, s in self.layers.items()}

    @property
    def delta_norms(self) -> np.ndarray:
        return self.total.delta_norms

    @property
    def n_elements(self) -> int:
        return self.total.n

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (NaN becomes null)."""
        return result_dict(self)

    def format_table(self, metric: str) -> str:
        """The N x N matrix as aligned text, plus each model's delta norm."""
        return format_table(self, metric)

    def format_layer_table(self, metric: str) -> str:
        """One row per layer group, one column per model pair (``i-j``, numbered as listed)."""
        return format_layer_table(self, metric)


def _labels(models: Sequence[str]) -> tuple[str, ...]:
    """Short names (folder or file stem); the given strings where those would collide."""
    short = []
    for m in models:
        p = Path(m.rstrip("/\\"))
        short.append(p.stem if p.suffix == ".safetensors" else (p.name or m))
    return tuple(short) if len(set(short)) == len(short) else tuple(models)


def kinship_matrix(
    base: str | Path,
    models: Sequence[str | Path],
    *,
    metrics: Sequence[str] = METRICS,
    per_layer: bool = False,
    allow_pickle: bool = False,
    parallel: bool | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    allow_nonfinite: bool = False,
) -> KinshipResult:
    """Kinship of every pair of ``models`` (weight deltas from ``base``) in one pass.

    ``parallel``: None uses Ray if it is initialised, True starts a local Ray if needed (or joins
    ``RAY_ADDRESS``), False reads in this process. ``per_layer`` also keeps sums per layer group
    (see ``layer_group``). Layouts are checked against the base before any tensor is read, so a
    mismatch raises ``LayoutError`` naming the tensor at once. A NaN or Inf weight raises
    ``CheckpointError`` naming file and tensor (the values would be ``nan``) unless
    ``allow_nonfinite``.
    """
    metrics = tuple(metrics)
    for m in metrics:
        if m not in METRICS:
            raise ValueError(f"unknown kinship metric {m!r}; expected some of {METRICS}")
    if len(models) < 2:
        raise EvorayError(f"kinship needs at least two models besides the base, got {len(models)}")
    if chunk_elems < 1:
        raise ValueError(f"chunk_elems must be positive, got {chunk_elems}")

    base_ckpt = open_checkpoint(base, allow_pickle=allow_pickle)
    ckpts = [base_ckpt] + [open_checkpoint(m, allow_pickle=allow_pickle) for m in models]
    try:
        layout = Layout.from_checkpoint(base_ckpt)
        for c in ckpts[1:]:
            layout.check(c)
        names = layout.names
        if ray_enabled(parallel):
            parts = ray_sums(ckpts, layout, allow_pickle, per_layer, chunk_elems, allow_nonfinite)
        else:
            parts = [
                group_sums(
                    [],
                    names,
                    allow_pickle=allow_pickle,
                    per_layer=per_layer,
                    chunk_elems=chunk_elems,
                    ckpts=ckpts,
                    allow_nonfinite=allow_nonfinite,
                )
            ]
    finally:
        for c in ckpts:
            c.close()

    k = len(models)
    merged: dict[str, GramSums] = {}
    for part in parts:
        for key, s in part.items():
            merged[key] = merged[key].merge(s) if key in merged else s
    total = GramSums.zeros(k)
    for s in merged.values():
        total = total.merge(s)
    layers = {key: merged[key] for key in sorted(merged, key=group_order)} if per_layer else {}
    return KinshipResult(
        base=str(base),
        sources=tuple(str(m) for m in models),
        labels=_labels([str(m) for m in models]),
        total=total,
        layers=layers,
        metrics=metrics,
    )
