"""summary.md and ``evoray report RUN_DIR``: a table of the runs, the plots, each run's settings
and recipe."""

from __future__ import annotations

import argparse
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from evoray.report.load import KINSHIP_JSON, ReportData, ReportError, RunData, load_run_dir
from evoray.report.plots import PLOTS, plot_acceptance, plot_fitness, plot_kinship
from evoray.strategies.base import fmt_num

SUMMARY = "summary.md"


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
    cls = run.strategy_cls
    if cls is None:
        return "Final recipe: none recorded."
    return cls.recipe_note(run.settings, run.complete)


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
        settings = ", ".join(f"{k}={fmt_num(v)}" for k, v in r.settings.items())
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
