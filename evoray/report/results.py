"""Result tables for search runs: the experts, the one-shot merges and each search's answer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evoray.strategies import get_strategy
from evoray.tasks.evaluation import mean_score
from evoray.tasks.pool import MultiTaskPool, TaskPool


def member_test_scores(
    members: Sequence[str], tasks: TaskPool
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """Test and OOD-test scores of every initial member (experts), evaluated here."""
    from evoray.models.pool import load_model

    out = {}
    for path in members:
        model, tok = load_model(path)
        splits = {"test": tasks.encode(tok, "test")}
        if tasks.has_ood:
            splits["ood"] = tasks.encode(tok, "ood-test")
        out[path] = {kind: tasks.evaluate(model.eval(), data) for kind, data in splits.items()}
    return out


def _mean(
    scores: dict[str, dict[str, float]], metric: str = "accuracy", pool: TaskPool | None = None
) -> float:
    """The fitness of test scores (the pool's weighted per-task metrics), NaN if none."""
    if not scores:
        return float("nan")
    if isinstance(pool, MultiTaskPool):  # per-task metrics and weights from the config
        return pool.fitness(scores)
    return mean_score(scores, metric)


def _direction(pool: TaskPool, tasks: Sequence[str], metric: str) -> tuple[float, str]:
    """(sign, header) of the table's mean columns: a mean of one lower-is-better metric (all
    tasks scored by perplexity) is shown as that metric's value, not as the negated fitness
    selection maximises; a mix of metrics is the fitness (lower-is-better ones negated)."""
    from evoray.tasks.metrics import LOWER_IS_BETTER

    names = {pool.metric(t) if isinstance(pool, MultiTaskPool) else metric for t in tasks}
    if len(names) == 1 and next(iter(names)) in LOWER_IS_BETTER:
        return -1.0, f"{next(iter(names))}, lower is better"
    if names & LOWER_IS_BETTER:
        return 1.0, "fitness: " + ", ".join(sorted(names & LOWER_IS_BETTER)) + " negated"
    return 1.0, ""


def run_label(summary: dict[str, Any]) -> str:
    """A short name for a run: strategy and the settings that tell runs apart (the same label
    as in ``evoray report``'s plots)."""
    from evoray.report.load import run_label as settings_label

    return settings_label(summary.get("strategy", "evolver"), summary["settings"])


def run_table(
    members: Sequence[str],
    tasks: TaskPool,
    summaries: Sequence[dict[str, Any]],
    *,
    metric: str = "accuracy",
) -> str:
    """Markdown table: experts, one-shot merges (generation 0) and every run's final answer."""
    rows: list[tuple[str, dict, dict]] = []
    for path, s in member_test_scores(members, tasks).items():
        rows.append((f"expert {path.rstrip('/').split('/')[-1]}", s["test"], s.get("ood", {})))
    for s in summaries:
        baselines = get_strategy(s.get("strategy", "evolver")).baselines(s["settings"])
        for key, label in baselines.items():
            init = s.get("initial", {}).get(key)
            if init:
                rows.append((label, init["test"], init.get("ood", {})))
    for s in summaries:
        rows.append((run_label(s), s["test"]["test"], s["test"].get("ood", {})))
    pool = tasks
    tasks = list(rows[0][1]) if rows else []
    ood = list(rows[0][2]) if rows else []

    def cell(scores: dict[str, dict[str, float]], t: str) -> str:
        m = pool.metric(t) if isinstance(pool, MultiTaskPool) else metric
        return f"{scores[t][m]:.3f}"

    sign, note = _direction(pool, tasks, metric)
    osign, onote = _direction(pool, ood, metric) if ood else (1.0, "")
    in_domain = f"in-domain ({note})" if note else "in-domain"
    out_domain = f"OOD ({onote})" if onote else "OOD"
    head = ["model", *tasks, in_domain, *[f"ood:{t}" for t in ood], out_domain, "dev evals"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    evals = {run_label(s): s.get("evaluations") for s in summaries}
    for label, test, oods in rows:
        cells = [cell(test, t) for t in tasks] + [f"{sign * _mean(test, metric, pool):.3f}"]
        cells += [cell(oods, t) for t in ood]
        cells += [f"{osign * _mean(oods, metric, pool):.3f}" if oods else "-"]
        cells += [str(evals[label]) if evals.get(label) is not None else "-"]
        lines.append("| " + " | ".join([label, *cells]) + " |")
    return "\n".join(lines)
