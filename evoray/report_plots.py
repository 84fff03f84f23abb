"""``evoray report RUN_DIR``: plots and a Markdown summary of a search run's outputs.

``evoray run`` leaves, per Tune trial, a Parquet log (``runs/<trial>/log``), ``initial.json``,
``summary.json`` (only once the run finished) and the answer's ``model/`` folder. This module
turns those into ``fitness.png``, ``acceptance.png``, ``kinship.png`` and ``summary.md``, for
finished runs and for crashed or still-running ones (reported from their log, marked incomplete).

What "best so far" means differs per strategy, because "the run's answer" does:

- Evolver, individual mode: the answer is the best member of the population. Offspring replace
  their parent only when strictly better, so the best member after generation ``g`` is the max
  of the initial fitness (``initial.json``) and every accepted offspring up to ``g``.
- Evolver, merger modes (average, Fisher, RegMean): the answer is the merge of the population.
  An offspring is accepted when the merge with it beats the current merge, so the answer's
  fitness is the max of the initial merge's (``initial.json``) and the accepted rows' fitness.
  When several offspring are accepted in one generation, the merge of all of them is evaluated
  but not logged (it is at least as good as each), so the curve is a lower bound there; the
  star at the end is the exact final value from ``summary.json``.
- kinship greedy: the answer is the best candidate so far; "accepted" means "in the top-k after
  the generation", which always includes the best, so the same rule applies (the experts'
  fitness joins it when ``initial.json`` has it).
- recipe search: every trial is a complete recipe and "accepted" marks a new best, so the
  curve is the running max of all trials.

Hence one rule for all: best so far = max(starting answer, accepted rows up to g).

Plots use matplotlib's Agg canvas directly with the default style, so no global backend is
switched and the same inputs give the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoray.runlog import LOG_DIR, RunLogError, read_log

__all__ = [
    "KinshipMatrix",
    "ReportData",
    "ReportError",
    "RunData",
    "add_report_parser",
    "generation_table",
    "load_run_dir",
    "plot_acceptance",
    "plot_fitness",
    "plot_kinship",
    "run_label",
    "start_fitness",
    "summary_markdown",
    "write_report",
]

PLOTS = ("fitness.png", "acceptance.png", "kinship.png")
SUMMARY = "summary.md"
KINSHIP_JSON = "kinship.json"
_STRATEGY_NAMES = {
    "evolver": "Evolver",
    "kinship_greedy": "kinship greedy",
    "recipe_search": "recipe search",
}
_GEN_COLUMNS = (
    "evaluated",
    "accepted",
    "acceptance_rate",
    "mean_fitness",
    "best_fitness",
    "best_so_far",
    "kinship_mean",
    "wall_time_s",
)


class ReportError(RunLogError):
    """A run directory cannot be reported on: missing, no runs in it, or an unreadable file."""


@dataclass(frozen=True)
class RunData:
    """Everything one trial left on disk, read once."""

    trial: str
    path: Path
    strategy: str
    settings: dict[str, Any]
    log: pd.DataFrame
    summary: dict[str, Any] | None
    initial: dict[str, Any]
    recipe_yaml: str | None
    label: str = ""

    @property
    def complete(self) -> bool:
        """A run writes summary.json only after its last generation and test evaluation."""
        return self.summary is not None

    @property
    def merger_mode(self) -> bool:
        return self.strategy == "evolver" and self.settings.get("merger", "none") != "none"

    @property
    def model_dir(self) -> Path | None:
        model = self.path / "model"
        return model if model.is_dir() else None


@dataclass(frozen=True)
class KinshipMatrix:
    """One metric of the N x N matrix ``evoray kinship --json`` writes."""

    labels: tuple[str, ...]
    metric: str
    values: np.ndarray
    source: Path


@dataclass(frozen=True)
class ReportData:
    """A run directory: its runs in trial order, and the optional kinship matrix."""

    run_dir: Path
    runs: list[RunData]
    kinship: KinshipMatrix | None = None
    results_md: str | None = None
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def table(self, run: RunData) -> pd.DataFrame:
        if run.trial not in self.tables:
            self.tables[run.trial] = generation_table(run)
        return self.tables[run.trial]


# ---------------------------------------------------------------------------------------------
# loading


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ReportError(f"cannot read {path}: {e}") from e


def _infer_settings(strategy: str, log: pd.DataFrame) -> dict[str, Any]:
    """Settings recoverable from the log alone, for a run that never wrote summary.json."""
    if log.empty:
        return {}
    op = str(log["operator"].iloc[0])
    if strategy == "evolver":
        head, _, merger = op.partition("|")
        out: dict[str, Any] = {"mutation": head.split("+")[0], "merger": merger or "none"}
        for k in ("F", "CR"):
            vals = log[k].dropna()
            if len(vals):
                out[k] = float(vals.iloc[0])
        return out
    if strategy == "kinship_greedy":
        return {"operator": op.split("+")[0]}
    if strategy == "recipe_search":
        method, _, sampler = op.partition("|")
        return {"method": method, "sampler": sampler}
    return {}


def _load_run(trial_dir: Path) -> RunData:
    try:
        log = read_log(trial_dir)
    except RunLogError:
        if (trial_dir / LOG_DIR).exists():
            raise  # a log that is there but unreadable is an error, not an absent log
        log = _empty_log()
    summary = None
    if (trial_dir / "summary.json").is_file():
        summary = _read_json(trial_dir / "summary.json")
        if not isinstance(summary, dict):
            raise ReportError(f"{trial_dir / 'summary.json'}: expected a JSON object")
    initial_path = trial_dir / "initial.json"
    initial = _read_json(initial_path) if initial_path.is_file() else {}
    strategy = (summary or {}).get("strategy") or (
        str(log["strategy"].iloc[0]) if not log.empty else "unknown"
    )
    if summary is not None and "settings" in summary:
        settings = dict(summary["settings"])
    else:
        settings = _infer_settings(strategy, log)
    recipe = None
    if (trial_dir / "recipe.yml").is_file():
        recipe = (trial_dir / "recipe.yml").read_text()
    elif summary is not None and summary.get("mergekit_yaml"):
        recipe = summary["mergekit_yaml"]
    return RunData(
        trial=trial_dir.name,
        path=trial_dir,
        strategy=strategy,
        settings=settings,
        log=log,
        summary=summary,
        initial=initial if isinstance(initial, dict) else {},
        recipe_yaml=recipe,
    )


def _empty_log() -> pd.DataFrame:
    """An empty log with the run log's columns (a run that crashed before generation 0)."""
    from evoray.runlog import SCHEMA

    return SCHEMA.empty_table().drop_columns(["scores"]).to_pandas()


def load_run_dir(run_dir: str | Path) -> ReportData:
    """Read every trial under ``run_dir/runs`` (sorted by trial id) plus kinship.json if any.

    Raises ``ReportError`` naming the path when ``run_dir`` is missing or holds no runs.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(
            f"run directory {run_dir} does not exist (expected the output.run_dir of "
            "`evoray run`, holding runs/<trial>/log/gen-*.parquet)"
        )
    runs_root = run_dir / "runs"
    trial_dirs = []
    if runs_root.is_dir():
        trial_dirs = sorted(
            p
            for p in runs_root.iterdir()
            if p.is_dir() and ((p / LOG_DIR).is_dir() or (p / "summary.json").is_file())
        )
    if not trial_dirs:
        hint = ""
        if (run_dir / LOG_DIR).is_dir():
            hint = (
                f"; {run_dir} looks like a single trial's folder, pass the run directory "
                f"{run_dir.parent.parent} instead"
            )
        raise ReportError(
            f"no runs in {run_dir}: expected {runs_root}/<trial>/ folders with a log/ "
            f"(gen-*.parquet) or summary.json, as `evoray run` writes them{hint}"
        )
    runs = [_load_run(p) for p in trial_dirs]
    runs = _with_labels(runs)
    results = run_dir / "results.md"
    return ReportData(
        run_dir=run_dir,
        runs=runs,
        kinship=_load_kinship(run_dir / KINSHIP_JSON),
        results_md=results.read_text() if results.is_file() else None,
    )


def _load_kinship(path: Path) -> KinshipMatrix | None:
    """The Pearson matrix (else the first metric) of an ``evoray kinship --json`` file."""
    if not path.is_file():
        return None
    data = _read_json(path)
    try:
        metrics = data["metrics"]
        metric = "pearson" if "pearson" in metrics else next(iter(metrics))
        values = np.array(
            [[np.nan if v is None else float(v) for v in row] for row in metrics[metric]]
        )
        labels = tuple(str(x) for x in data.get("labels") or data["models"])
    except (KeyError, TypeError, ValueError, StopIteration) as e:
        raise ReportError(
            f"{path} is not an `evoray kinship --json` file (expected 'labels' and "
            f"'metrics': {{metric: N x N matrix}}): {e!r}"
        ) from e
    if values.shape != (len(labels), len(labels)):
        raise ReportError(
            f"{path}: {metric} matrix has shape {values.shape}, expected "
            f"{len(labels)} x {len(labels)} for labels {list(labels)}"
        )
    return KinshipMatrix(labels=labels, metric=metric, values=values, source=path)


def _fmt_num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def run_label(strategy: str, settings: dict[str, Any]) -> str:
    """Strategy plus the settings that tell its runs apart (as in results.md); '?' if unknown."""
    st = settings
    if strategy == "evolver":
        merger = st.get("merger")
        mode = "?" if merger is None else "individual" if merger == "none" else f"+{merger}"
        return f"Evolver F={_fmt_num(st.get('F', '?'))} CR={_fmt_num(st.get('CR', '?'))} {mode}"
    if strategy == "kinship_greedy":
        return f"kinship greedy k={st.get('k', '?')} {st.get('operator', '?')}"
    if strategy == "recipe_search":
        label = f"recipe search {st.get('method', '?')} {st.get('sampler', '?')}"
        return label + (" per-layer" if st.get("per_layer") else "")
    return strategy


def _with_labels(runs: list[RunData]) -> list[RunData]:
    """Label runs; where labels collide, add the settings that differ, then the trial id."""
    base = [run_label(r.strategy, r.settings) for r in runs]
    labels = list(base)
    for lab in set(base):
        group = [i for i, b in enumerate(base) if b == lab]
        if len(group) < 2:
            continue
        keys = sorted({k for i in group for k in runs[i].settings})
        differ = [
            k
            for k in keys
            if len({json.dumps(runs[i].settings.get(k), sort_keys=True) for i in group}) > 1
        ]
        for i in group:
            extra = ", ".join(f"{k}={_fmt_num(runs[i].settings.get(k))}" for k in differ)
            labels[i] = f"{lab} ({extra})" if extra else lab
    dup = {lab for lab in labels if labels.count(lab) > 1}
    return [
        replace(r, label=f"{lab} [{r.trial}]" if lab in dup else lab)
        for r, lab in zip(runs, labels, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# per-generation data


def start_fitness(run: RunData) -> float | None:
    """Dev fitness of the run's answer before generation 0, from initial.json (None if unknown).

    Evolver merger modes start from the merge of the initial population; Evolver individual
    mode (and greedy, when initial.json lists the experts) from the best initial member.
    """
    init = run.initial
    if run.merger_mode or (run.strategy == "evolver" and init.get("merged_fitness") is not None):
        v = init.get("merged_fitness")
        return None if v is None else float(v)
    fitness = [float(v) for v in init.get("fitness") or [] if v is not None]
    return max(fitness) if fitness else None


def generation_table(run: RunData) -> pd.DataFrame:
    """One row per logged generation (index ``generation``), the data behind every plot.

    Columns: ``evaluated`` candidates, ``accepted`` count, ``acceptance_rate``,
    ``mean_fitness`` and ``best_fitness`` of the generation's candidates, ``best_so_far`` (the
    run's answer after the generation, see the module docstring; non-decreasing, NaN until
    known), ``kinship_mean`` (mean ``kinship_to_parent``, NaN when not logged) and the summed
    ``wall_time_s``.
    """
    df = run.log
    if df.empty:
        out = pd.DataFrame({c: pd.Series(dtype="float64") for c in _GEN_COLUMNS})
        out.index.name = "generation"
        return out
    g = df.groupby("generation", sort=True)
    out = pd.DataFrame(
        {
            "evaluated": g.size(),
            "accepted": g["accepted"].sum().astype("int64"),
            "mean_fitness": g["fitness"].mean(),
            "best_fitness": g["fitness"].max(),
            "kinship_mean": g["kinship_to_parent"].mean(),
            "wall_time_s": g["wall_time_s"].sum(),
        }
    )
    out["acceptance_rate"] = out["accepted"] / out["evaluated"]
    accepted_best = df["fitness"].where(df["accepted"]).groupby(df["generation"]).max()
    running = accepted_best.cummax().ffill().reindex(out.index).to_numpy(dtype="float64")
    start = start_fitness(run)
    out["best_so_far"] = running if start is None else np.fmax(running, start)  # fmax skips NaN
    out.index.name = "generation"
    return out[list(_GEN_COLUMNS)]


# ---------------------------------------------------------------------------------------------
# plots


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


# ---------------------------------------------------------------------------------------------
# Markdown


def _task_mean(scores: dict[str, Any] | None, metric: str) -> float | None:
    if not scores:
        return None
    vals = [m[metric] for m in scores.values() if isinstance(m, dict) and metric in m]
    return sum(vals) / len(vals) if vals else None


def _f(v: float | None, digits: int) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def run_stats(run: RunData, table: pd.DataFrame) -> dict[str, Any]:
    """The numbers of summary.md's table for one run (summary.json first, else the log)."""
    s = run.summary or {}
    metric = run.settings.get("metric", "accuracy")
    test = s.get("test") or {}
    evaluated = int(table["evaluated"].sum()) if len(table) else 0
    accepted = int(table["accepted"].sum()) if len(table) else 0
    evals = s.get("evaluations")
    if evals is None:  # older summaries: logged candidates plus the initial evaluations
        n_init = len(run.initial.get("fitness") or [])
        evals = evaluated + n_init + (1 if run.initial.get("merged_fitness") is not None else 0)
    best_log = float(table["best_so_far"].iloc[-1]) if len(table) else None
    if best_log is not None and math.isnan(best_log):
        best_log = None
    log = run.log
    span = None
    if not log.empty:
        span = (log["timestamp"].max() - log["timestamp"].min()).total_seconds()
    return {
        "generations": s.get("generations", len(table)),
        "evaluations": evals,
        "best_dev_fitness": s.get("best_dev_fitness", best_log),
        "best_from_log": best_log,
        "test_mean": _task_mean(test.get("test"), metric),
        "ood_mean": _task_mean(test.get("ood"), metric),
        "metric": metric,
        "evaluated": evaluated,
        "accepted": accepted,
        "acceptance": accepted / evaluated if evaluated else None,
        "worker_time_s": float(log["wall_time_s"].sum()) if not log.empty else 0.0,
        "log_span_s": span,
    }


def _recipe_note(run: RunData) -> str:
    if run.recipe_yaml:
        return (
            "Final recipe (`evoray merge` reproduces the answer from it):\n\n"
            f"```yaml\n{run.recipe_yaml.rstrip()}\n```"
        )
    if run.strategy == "evolver":
        return (
            "Final recipe: not expressible as one mergekit recipe (the answer is an evolved "
            "population's "
            + ("merge" if run.merger_mode else "best member")
            + ", built by chains of DE mutation and crossover with random masks); use its "
            "model folder."
        )
    if run.strategy == "kinship_greedy":
        return (
            "Final recipe: not expressible as one mergekit recipe (the answer is a tree of "
            "pairwise merges of merges); use its model folder."
        )
    if run.strategy == "recipe_search" and not run.complete:
        return "Final recipe: not written yet (recipe.yml appears when the run finishes)."
    return "Final recipe: none recorded."


def summary_markdown(data: ReportData, plots: Sequence[str] = PLOTS) -> str:
    """summary.md: a table of the runs, the plots, and each run's settings and recipe."""
    stats = {r.trial: run_stats(r, data.table(r)) for r in data.runs}
    n_done = sum(r.complete for r in data.runs)
    lines = [
        f"# evoray report: {data.run_dir.name}",
        "",
        f"Run directory: `{data.run_dir.resolve()}`; {len(data.runs)} run(s), {n_done} complete"
        + (
            f", {len(data.runs) - n_done} incomplete (no summary.json: crashed or still running;"
            " reported from their log)."
            if n_done < len(data.runs)
            else "."
        ),
        "",
        "| run | trial | status | generations | dev evals | best dev fitness | test in-domain "
        "| test OOD | accepted | worker time (s) | model |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in data.runs:
        st = stats[r.trial]
        best = _f(st["best_dev_fitness"], 4) + ("" if r.complete else " (log)")
        acc = "-" if st["acceptance"] is None else f"{st['accepted']}/{st['evaluated']}"
        if st["acceptance"] is not None:
            acc += f" ({st['acceptance']:.0%})"
        model = r.model_dir
        where = f"`{model.relative_to(data.run_dir).as_posix()}`" if model else "-"
        lines.append(
            "| "
            + " | ".join(
                [
                    r.label,
                    f"`{r.trial}`",
                    "complete" if r.complete else "**incomplete**",
                    str(st["generations"]),
                    str(st["evaluations"]),
                    best,
                    _f(st["test_mean"], 3),
                    _f(st["ood_mean"], 3),
                    acc,
                    f"{st['worker_time_s']:.1f}",
                    where,
                ]
            )
            + " |"
        )
    metrics = sorted({stats[r.trial]["metric"] for r in data.runs})
    lines += [
        "",
        f"Test columns are the mean {'/'.join(metrics)} over the in-domain and OOD test tasks "
        "(summary.json). Worker time sums the logged per-candidate wall times (build and "
        "evaluation), not the run's elapsed time.",
        "",
        "## Plots",
        "",
    ]
    captions = {
        "fitness.png": (
            "Best so far is the dev fitness of the run's answer after each generation: the max "
            "of the starting answer (initial.json: the best member, or the initial merge in "
            "Evolver merger modes) and every accepted candidate. Where an Evolver merger run "
            "accepts several offspring in one generation, their joint merge is not logged, so "
            "the curve is a lower bound there and the star gives the exact final value."
        ),
        "acceptance.png": (
            "Accepted / evaluated per generation. Evolver: the offspring replaced its parent "
            "(individual mode) or entered the merge; greedy: the merge entered the top-k; "
            "recipe search: the trial was a new best."
        ),
        "kinship.png": (
            "Mean kinship_to_parent per generation. Evolver logs the offspring's kinship to its "
            "parent (high means the population is converging); greedy logs the kinship between "
            "the two merged parents; recipe search logs none."
            + (
                f" Right: the {data.kinship.metric} matrix from {KINSHIP_JSON}."
                if data.kinship
                else ""
            )
        ),
    }
    for p in plots:
        lines += [f"![{p.removesuffix('.png')}]({p})", "", captions.get(p, ""), ""]
    lines += ["## Runs", ""]
    for r in data.runs:
        st = stats[r.trial]
        lines += [f"### {r.label} (`{r.trial}`)", ""]
        if not r.complete:
            lines += [
                f"**Incomplete**: no summary.json in `{r.path}` (the run crashed or is still "
                f"running); {len(data.table(r))} generation(s) logged"
                + (
                    f", best dev fitness so far {_f(st['best_from_log'], 4)}."
                    if st["best_from_log"] is not None
                    else "."
                ),
                "",
            ]
        settings = ", ".join(f"{k}={_fmt_num(v)}" for k, v in r.settings.items())
        lines.append(
            f"- strategy: {r.strategy}"
            + ("" if r.complete else " (settings inferred from the log)")
        )
        lines.append(f"- settings: {settings or '-'}")
        if st["log_span_s"] is not None:
            lines.append(
                f"- logged from first to last candidate: {st['log_span_s']:.1f} s; worker time "
                f"{st['worker_time_s']:.1f} s"
            )
        if r.model_dir:
            lines.append(f"- model: `{r.model_dir.resolve()}`")
        lines += ["", _recipe_note(r), ""]
    if data.results_md:
        lines += ["## Test scores per task (results.md)", "", data.results_md.rstrip(), ""]
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------------------------
# entry points


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the three PNGs and summary.md for ``run_dir`` into ``out`` (default run_dir/report)."""
    data = load_run_dir(run_dir)
    out = Path(out) if out is not None else data.run_dir / "report"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create report folder {out}: {e}") from e
    plot_fitness(data, out / "fitness.png")
    plot_acceptance(data, out / "acceptance.png")
    plot_kinship(data, out / "kinship.png")
    tmp = out / f".{SUMMARY}.tmp"
    tmp.write_text(summary_markdown(data))
    os.replace(tmp, out / SUMMARY)
    return out


def _cmd_report(args: argparse.Namespace) -> int:
    out = write_report(args.run_dir, args.out)
    for name in (SUMMARY, *PLOTS):
        print(out / name)
    return 0


def add_report_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``evoray report RUN_DIR [--out DIR]`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser(
        "report",
        help="plots and a Markdown summary of a search run directory",
        description=(
            "Read a run directory made by `evoray run` (runs/<trial>/log, summary.json, ...) "
            "and write fitness.png, acceptance.png, kinship.png and summary.md."
        ),
    )
    p.add_argument("run_dir", type=Path, help="the run's output.run_dir")
    p.add_argument(
        "--out", type=Path, default=None, help="folder for the report (default: RUN_DIR/report)"
    )
    p.set_defaults(func=_cmd_report)
    return p
