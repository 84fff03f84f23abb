"""The report's plots: fitness, acceptance and kinship per generation, one line per run.

Plots use matplotlib's Agg canvas directly with the default style, so no global backend is
switched and the same inputs give the same bytes.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoray.report.load import ReportData, RunData, start_fitness

PLOTS = ("fitness.png", "acceptance.png", "kinship.png")


def _figure(width: float, height: float) -> Any:
    """A Figure on its own Agg canvas: pyplot's global state and backend stay untouched."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    import matplotlib

    path.parent.mkdir(parents=True, exist_ok=True)
    with matplotlib.rc_context({"svg.hashsalt": "evoray"}):
        fig.savefig(path, dpi=110, metadata={"Software": None})
    return path


def _colors(n: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def _style():
    import matplotlib.style

    return matplotlib.style.context("default")


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, color="0.4")
    ax.set_xticks([])
    ax.set_yticks([])


def _legend_label(run: RunData) -> str:
    return run.label + ("" if run.complete else " (incomplete)")


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h")


def _line_styles(n: int) -> list[dict[str, Any]]:
    """Colour, marker and width per run; earlier runs are drawn wider so that runs with the
    same values (e.g. 25% acceptance) stay visible underneath later ones."""
    return [
        {
            "color": c,
            "marker": _MARKERS[i % len(_MARKERS)],
            "lw": 1.2 + 2.0 * (n - 1 - i) / max(n - 1, 1),
            "ms": 3.5,
        }
        for i, c in enumerate(_colors(n))
    ]


def _generation_ticks(ax: Any, last: int, with_start: bool) -> None:
    """Integer generation ticks (at most ~15), with x = -1 labelled 'start' when plotted."""
    step = max(1, math.ceil((last + 1) / 15))
    ticks = list(range(0, last + 1, step))
    labels = [str(t) for t in ticks]
    if with_start:
        ticks, labels = [-1, *ticks], ["start", *labels]
    ax.set_xticks(ticks, labels)


def _outside_legend(fig: Any, n: int) -> None:
    fig.legend(loc="outside lower center", ncols=1 if n <= 3 else 2, fontsize=8, frameon=False)


def plot_fitness(data: ReportData, path: str | Path) -> Path:
    """Best-so-far dev fitness (top) and the generation's mean candidate fitness (bottom)."""
    path = Path(path)
    n = len(data.runs)
    with _style():
        fig = _figure(9.0, 7.0 + 0.18 * math.ceil(n / 2))
        top, bottom = fig.subplots(2, 1, sharex=True)
        any_start, last = False, -1
        for run, style in zip(data.runs, _line_styles(n), strict=True):
            t = data.table(run)
            start = start_fitness(run)
            x, y = list(t.index), list(t["best_so_far"])
            if start is not None:
                x, y = [-1, *x], [start, *y]
                any_start = True
            if not x:
                continue
            last = max(last, int(t.index.max()) if len(t) else -1)
            color, lw = style["color"], style["lw"]
            top.plot(x, y, drawstyle="steps-post", color=color, lw=lw, label=_legend_label(run))
            if start is not None:
                top.plot([-1], [start], "o", color=color, ms=4)
            final = (run.summary or {}).get("best_dev_fitness")
            if final is not None and len(t):
                top.plot([t.index[-1]], [final], "*", color=color, ms=11, mec="black", mew=0.5)
            if len(t):
                bottom.plot(t.index, t["mean_fitness"], **style)
        if any_start or last >= 0:
            top.set_title(
                "Dev fitness of each run's answer, best so far after each generation\n"
                "(● start from initial.json; ★ best_dev_fitness in summary.json)",
                fontsize=9,
            )
            top.set_ylabel("best so far")
            top.grid(alpha=0.3)
            bottom.set_title(
                "Mean dev fitness of the candidates evaluated in each generation", fontsize=9
            )
            bottom.set_ylabel("mean of candidates")
            bottom.set_xlabel("generation")
            bottom.grid(alpha=0.3)
            _generation_ticks(bottom, max(last, 0), any_start)
            _outside_legend(fig, n)
        else:
            _no_data(top, "no generations logged yet")
            _no_data(bottom, "")
        return _save(fig, path)


def plot_acceptance(data: ReportData, path: str | Path) -> Path:
    """Share of each generation's candidates that were accepted, one line per run."""
    path = Path(path)
    n = len(data.runs)
    with _style():
        fig = _figure(9.0, 4.8 + 0.18 * math.ceil(n / 2))
        ax = fig.subplots(1, 1)
        last = -1
        for run, style in zip(data.runs, _line_styles(n), strict=True):
            t = data.table(run)
            if t.empty:
                continue
            last = max(last, int(t.index.max()))
            overall = t["accepted"].sum() / t["evaluated"].sum()
            label = f"{_legend_label(run)}: {overall:.0%} overall"
            ax.plot(t.index, t["acceptance_rate"], label=label, **style)
        if last >= 0:
            from matplotlib.ticker import PercentFormatter

            ax.set_ylim(-0.03, 1.03)
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
            _generation_ticks(ax, last, False)
            ax.set_xlabel("generation")
            ax.set_ylabel("accepted / evaluated")
            ax.set_title(
                "Acceptance per generation (Evolver: offspring replaced its parent or entered "
                "the merge;\ngreedy: merge entered the top-k; recipe search: trial was a new best)",
                fontsize=9,
            )
            ax.grid(alpha=0.3)
            _outside_legend(fig, n)
        else:
            _no_data(ax, "no generations logged yet")
        return _save(fig, path)


def _annotate(
    ax: Any, values: np.ndarray, im: Any, fmt: str, fontsize: float, missing: str = ""
) -> None:
    """Write each cell's value (unclipped) in black or white, whichever reads on its colour."""
    norm, cmap = im.norm, im.cmap
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            if not np.isfinite(v):
                if missing:
                    ax.text(j, i, missing, ha="center", va="center", fontsize=fontsize, color="0.3")
                continue
            r, g, b, _ = cmap(float(np.clip(norm(v), 0.0, 1.0)))
            dark = 0.299 * r + 0.587 * g + 0.114 * b < 0.5
            ax.text(
                j,
                i,
                format(v, fmt),
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if dark else "black",
            )


def kinship_grid(data: ReportData) -> pd.DataFrame:
    """Mean kinship_to_parent, runs (labels) x generations; NaN where not logged."""
    cols = {}
    for run in data.runs:
        cols[run.label] = data.table(run)["kinship_mean"]
    grid = pd.DataFrame(cols).T if cols else pd.DataFrame()
    if not grid.empty:
        grid = grid.reindex(columns=sorted(grid.columns))
        grid = grid.reindex([r.label for r in data.runs])
    return grid.astype("float64")


def plot_kinship(data: ReportData, path: str | Path) -> Path:
    """Heatmap of mean kinship_to_parent (runs x generations), plus kinship.json's matrix."""
    from matplotlib import colormaps

    path = Path(path)
    grid = kinship_grid(data)
    km = data.kinship
    n_runs, n_gen = grid.shape if not grid.empty else (len(data.runs), 0)
    label_w = max((len(r.label) for r in data.runs), default=10) * 0.07
    width = min(18.0, max(6.0, 1.2 + label_w + 0.45 * n_gen))
    height = max(2.6, 1.4 + 0.42 * n_runs)
    side = 0.0
    if km is not None:
        side = max(3.5, 0.75 * len(km.labels) + 2.0)
        height = max(height, side)
    with _style():
        fig = _figure(width + side, height)
        if km is None:
            ax = fig.subplots(1, 1)
            mx = None
        else:
            ax, mx = fig.subplots(1, 2, width_ratios=[width, side])
        cmap = colormaps["viridis"].with_extremes(bad="0.88")
        values = grid.to_numpy() if not grid.empty else np.empty((0, 0))
        if values.size and np.isfinite(values).any():
            lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
            if hi - lo < 1e-9:
                lo, hi = lo - 0.05, hi + 0.05
            im = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=lo, vmax=hi, aspect="auto")
            fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02, label="mean kinship_to_parent")
            if n_gen <= 30:
                _annotate(ax, values, im, ".2f", 7 if n_gen > 12 else 8)
            for i in range(n_runs):
                if not np.isfinite(values[i]).any():
                    ax.text(
                        (n_gen - 1) / 2,
                        i,
                        "not logged",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="0.3",
                    )
            ax.set_xticks(range(n_gen), [str(c) for c in grid.columns], fontsize=8)
            ax.set_yticks(range(n_runs), [_legend_label(r) for r in data.runs], fontsize=8)
            ax.set_xlabel("generation")
            ax.set_title(
                "Mean kinship_to_parent per generation (Pearson of weight deltas; Evolver: "
                "offspring vs its parent,\ngreedy: between the two merged parents; grey: "
                "not logged, e.g. recipe search)",
                fontsize=9,
            )
        else:
            _no_data(ax, "no kinship_to_parent logged in any run")
            ax.set_title("Mean kinship_to_parent per generation", fontsize=9)
        if km is not None and mx is not None:
            k = len(km.labels)
            a = km.values
            off = a[~np.eye(k, dtype=bool)]
            if km.metric == "euclidean":
                lo, hi, mcmap = 0.0, float(np.nanmax(a)) if np.isfinite(a).any() else 1.0, "magma_r"
            else:
                top = float(np.nanmax(np.abs(off))) if np.isfinite(off).any() else 1.0
                top = top if top > 0 else 1.0
                lo, hi, mcmap = -top, top, "RdBu_r"
            mc = colormaps[mcmap].with_extremes(bad="0.88")
            im2 = mx.imshow(np.ma.masked_invalid(np.clip(a, lo, hi)), cmap=mc, vmin=lo, vmax=hi)
            fig.colorbar(im2, ax=mx, fraction=0.046, pad=0.04)
            _annotate(mx, a, im2, ".2f", 8, missing="n/a")
            mx.set_xticks(range(k), km.labels, rotation=45, ha="right", fontsize=8)
            mx.set_yticks(range(k), km.labels, fontsize=8)
            mx.set_title(f"{km.metric} kinship ({km.source.name})", fontsize=9)
        return _save(fig, path)
