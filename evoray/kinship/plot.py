"""The kinship matrix as an annotated heatmap PNG (one panel per metric).

Apart from the maths because matplotlib is imported only when a heatmap is drawn.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from evoray.kinship.matrix import KinshipResult
from evoray.kinship.tables import value_format


def heatmap(result: KinshipResult, metric: str | Sequence[str], path: str | Path) -> Path:
    """Write the N x N matrix of ``metric`` (or one panel per metric) as an annotated PNG.

    Uses matplotlib's Agg canvas directly, so no global backend is switched in the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metrics = [metric] if isinstance(metric, str) else list(metric)
    k = len(result.labels)
    side = max(3.0, 0.8 * k + 1.5)
    fig = Figure(figsize=(1.25 * side * len(metrics), side), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, m in zip(axes, metrics, strict=True):
        a = result.matrix(m)
        off = np.abs(a[~np.eye(k, dtype=bool)])
        top = float(np.nanmax(off)) if np.isfinite(off).any() else 0.0
        top = top if top > 0 else 1.0
        # Correlations on a symmetric scale around 0, distances from 0: off-diagonal values use
        # the whole colour range (the diagonal saturates), so small kinships stay visible.
        lo, hi, cmap = (0.0, top, "magma_r") if m == "euclidean" else (-top, top, "RdBu_r")
        im = ax.imshow(np.clip(a, lo, hi), cmap=cmap, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
        fmt = value_format(m)
        for i in range(k):
            for j in range(k):
                v = a[i, j]
                shade = (min(max(v, lo), hi) - lo) / (hi - lo) if np.isfinite(v) else 0.5
                dark = shade > 0.6 if m == "euclidean" else abs(shade - 0.5) > 0.3
                ax.text(
                    j,
                    i,
                    fmt(a[i, j]),
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if dark else "black",
                )
        ax.set_xticks(range(k), result.labels, rotation=45, ha="right")
        ax.set_yticks(range(k), result.labels)
        ax.set_title(f"{m} kinship")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
