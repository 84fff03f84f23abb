"""A ``KinshipResult`` as text tables (N x N, and per layer group) and as JSON-able dicts.

Apart from the maths so that number formatting (NaN as null, widths) changes in one place.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from evoray.kinship.matrix import KinshipResult


def _nan_to_none(a: np.ndarray) -> list:
    return [[None if math.isnan(v) else float(v) for v in row] for row in a.tolist()]


def value_format(metric: str) -> Any:
    if metric == "euclidean":
        return lambda v: f"{v:.4g}"
    return lambda v: "nan" if math.isnan(v) else f"{v:.4f}"


def result_dict(result: KinshipResult) -> dict[str, Any]:
    """JSON-able form (NaN becomes null)."""
    out: dict[str, Any] = {
        "base": result.base,
        "models": list(result.sources),
        "labels": list(result.labels),
        "n_elements": result.n_elements,
        "delta_norm": [float(v) for v in result.delta_norms],
        "metrics": {m: _nan_to_none(result.matrix(m)) for m in result.metrics},
    }
    if result.layers:
        out["per_layer"] = {
            k: {
                "n_elements": s.n,
                "delta_norm": [float(v) for v in s.delta_norms],
                **{m: _nan_to_none(s.matrix(m)) for m in result.metrics},
            }
            for k, s in result.layers.items()
        }
    return out


def format_table(result: KinshipResult, metric: str) -> str:
    """The N x N matrix as aligned text, plus each model's delta norm."""
    a = result.matrix(metric)
    fmt = value_format(metric)
    width = max(9, *(len(lab) for lab in result.labels)) + 2
    first = max(len(lab) for lab in result.labels) + 2
    lines = [
        f"{metric} kinship of weight deltas from base {result.base}",
        " " * first + "".join(f"{lab:>{width}}" for lab in result.labels) + f"{'|delta|':>{width}}",
    ]
    for lab, row, norm in zip(result.labels, a, result.delta_norms, strict=True):
        cells = "".join(f"{fmt(v):>{width}}" for v in row)
        lines.append(f"{lab:<{first}}{cells}{norm:>{width}.4g}")
    return "\n".join(lines)


def format_layer_table(result: KinshipResult, metric: str) -> str:
    """One row per layer group, one column per model pair (``i-j``, numbered as listed)."""
    if not result.layers:
        return ""
    k = len(result.labels)
    pairs = [(i, j) for i in range(k) for j in range(i + 1, k)]
    fmt = value_format(metric)
    width = 10
    first = max(len("layer"), *(len(g) for g in result.layers)) + 2
    legend = ", ".join(f"{i + 1}={lab}" for i, lab in enumerate(result.labels))
    lines = [
        f"{metric} kinship per layer ({legend})",
        f"{'layer':<{first}}" + "".join(f"{f'{i + 1}-{j + 1}':>{width}}" for i, j in pairs),
    ]
    for key, sums in result.layers.items():
        a = sums.matrix(metric)
        lines.append(f"{key:<{first}}" + "".join(f"{fmt(a[i, j]):>{width}}" for i, j in pairs))
    return "\n".join(lines)
