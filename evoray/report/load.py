"""Reading a run directory for reports: each trial's log, initial.json, summary.json and recipe.

``evoray run`` leaves, per Tune trial, a Parquet log (``runs/<trial>/log``), ``initial.json``,
``summary.json`` (only once the run finished) and the answer's ``model/`` folder. Crashed or
still-running trials are read from their log alone and marked incomplete.

What "best so far" means differs per strategy, because "the run's answer" does; each strategy
says where its answer starts (``Strategy.start_fitness``), and then one rule holds for all:
best so far = max(starting answer, accepted rows up to g). Evolver in merger mode evaluates the
merge of several offspring accepted in one generation without logging it (it is at least as
good as each), so its curve is a lower bound there; summary.json has the exact final value.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from evoray.errors import ConfigError
from evoray.runlog import LOG_DIR, RunLogError, read_log
from evoray.strategies import get_strategy
from evoray.strategies.base import Strategy, fmt_num

KINSHIP_JSON = "kinship.json"
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
    def strategy_cls(self) -> type[Strategy] | None:
        return strategy_class(self.strategy)

    @property
    def complete(self) -> bool:
        """A run writes summary.json only after its last generation and test evaluation."""
        return self.summary is not None

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
        settings = _settings_from_log(strategy, log)
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


def strategy_class(name: str) -> type[Strategy] | None:
    """The registered strategy of a run (None for a log of an unknown strategy)."""
    try:
        return get_strategy(name)
    except ConfigError:
        return None


def _settings_from_log(strategy: str, log: pd.DataFrame) -> dict[str, Any]:
    """Settings recoverable from the log alone, for a run that never wrote summary.json."""
    cls = strategy_class(strategy)
    if cls is None or log.empty:
        return {}
    return cls.settings_from_log(log.to_dict("records"))


def run_label(strategy: str, settings: dict[str, Any]) -> str:
    """Strategy plus the settings that tell its runs apart (as in results.md); '?' if unknown."""
    cls = strategy_class(strategy)
    return strategy if cls is None else cls.label(settings)


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
            extra = ", ".join(f"{k}={fmt_num(runs[i].settings.get(k))}" for k in differ)
            labels[i] = f"{lab} ({extra})" if extra else lab
    dup = {lab for lab in labels if labels.count(lab) > 1}
    return [
        replace(r, label=f"{lab} [{r.trial}]" if lab in dup else lab)
        for r, lab in zip(runs, labels, strict=True)
    ]


# ---------------------------------------------------------------------------------------------
# per-generation data


def start_fitness(run: RunData) -> float | None:
    """Dev fitness of the run's answer before generation 0, from initial.json (None if unknown):
    each strategy says what its answer starts from."""
    cls = run.strategy_cls
    return None if cls is None else cls.start_fitness(run.settings, run.initial)


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
