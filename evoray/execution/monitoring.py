"""Live run metrics for the Ray dashboard (its Prometheus endpoint) and Grafana.

Tune's own progress table shows each trial's latest report in the terminal; these gauges and
counters make the same numbers scrapeable while runs go, tagged by run and strategy.
"""

from __future__ import annotations

from typing import Any

from ray.util.metrics import Counter, Gauge

_TAGS = ("run", "strategy")


class RunMetrics:
    """Best fitness, generation, and offspring evaluated/accepted of one search run."""

    def __init__(self, run_id: str, strategy: str) -> None:
        tags = {"run": run_id, "strategy": strategy}
        self.best = Gauge("evoray_best_fitness", "best dev fitness so far", tag_keys=_TAGS)
        self.generation = Gauge("evoray_generation", "generations completed", tag_keys=_TAGS)
        self.evaluated = Counter(
            "evoray_offspring_evaluated", "offspring/candidates evaluated", tag_keys=_TAGS
        )
        self.accepted = Counter(
            "evoray_offspring_accepted", "offspring/candidates accepted", tag_keys=_TAGS
        )
        for m in (self.best, self.generation, self.evaluated, self.accepted):
            m.set_default_tags(tags)

    def update(self, metrics: dict[str, Any]) -> None:
        """Record one generation's Tune metrics (keys as reported by the run objects)."""
        if metrics.get("best_fitness") is not None:
            self.best.set(float(metrics["best_fitness"]))
        if metrics.get("generation") is not None:
            self.generation.set(float(metrics["generation"]))
        if metrics.get("evaluated"):
            self.evaluated.inc(float(metrics["evaluated"]))
        if metrics.get("accepted"):
            self.accepted.inc(float(metrics["accepted"]))
