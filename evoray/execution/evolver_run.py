"""One Evolver search run on a worker pool: initialise, step generations, log, export.

Used by the Tune trainable (one trial per run, one Tune iteration per generation) and directly
by tests. The run's resumable state is ``EvolverState`` (fitness and accepted recipes); the
population itself is rebuilt from the initial models by replaying the accepted recipes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import ray
import torch

from evoray.evolution.de import Recipe
from evoray.evolution.evolver import (
    EvolverSettings,
    EvolverState,
    Trial,
    choose_merged,
    improving_merges,
    select_individuals,
)
from evoray.execution.search_run import SearchRun, flat_scores
from evoray.execution.worker import TaskSpec

log = logging.getLogger(__name__)


@ray.remote(num_cpus=0)
def compute_statistics(
    kind: str,
    model_path: str,
    tasks: TaskSpec,
    task_names: Sequence[str] | None,
    n: int,
    cache_dir: str | None,
) -> dict:
    """Fisher diagonals or RegMean Grams of one member on its training data (cached on disk)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from evoray.evaluation import EncodedSplit
    from evoray.statistics import cached_statistics, fisher_diagonal, regmean_grams

    hf_logging.disable_progress_bar()
    tok = AutoTokenizer.from_pretrained(model_path)
    splits = tasks.splits(tok, "train")
    names = list(task_names) if task_names else list(splits)
    per = max(1, n // len(names))
    parts = [splits[t] for t in names]
    width = max(p.input_ids.shape[1] for p in parts)

    def pad(x, value):
        return torch.nn.functional.pad(x[:per], (0, width - x.shape[1]), value=value)

    split = EncodedSplit(
        torch.cat([pad(p.input_ids, tok.pad_token_id) for p in parts]),
        torch.cat([pad(p.attention_mask, 0) for p in parts]),
        torch.cat([p.labels[:per] for p in parts]),
    )

    def compute() -> dict:
        model = AutoModelForSequenceClassification.from_pretrained(model_path)
        if kind == "fisher":
            return fisher_diagonal(model, split)
        return regmean_grams(model, split)

    key = f"train-{'+'.join(names)}-{per}"
    if cache_dir is None:
        return compute()
    return cached_statistics(kind, Path(model_path), key, compute, Path(cache_dir))


class EvolverRun(SearchRun):
    """Drives one Evolver run on a worker pool."""

    strategy = "evolver"

    def __init__(self, settings: EvolverSettings, *args: Any, **kwargs: Any) -> None:
        super().__init__(settings, *args, **kwargs)
        self.merger_ref: ray.ObjectRef | None = None
        self.merged_ref: ray.ObjectRef | None = None

    # -- set-up -------------------------------------------------------------------------------

    def start(self, state: EvolverState | None = None) -> EvolverState:
        """Load the population (replaying ``state`` if resuming) and score generation 0."""
        s = self.settings
        self.load_models()
        if s.merger_mode:
            self.merger_ref = ray.put(self._make_merger())
        resumed = state is not None
        if state is None:
            state = EvolverState(settings=s, pop_size=len(self.refs))
        if s.merger_mode:
            self.merged_ref = self.pool.submit("merge", self.merger_ref, *self.refs)
        for accepted in state.accepted:  # replay each generation exactly as it ran
            recipes = [Recipe.from_dict(r) for r in accepted]
            if s.merger_mode and recipes:
                self.merged_ref = self.pool.submit(
                    "update_merged", self.merger_ref, self.merged_ref, accepted, *self.refs
                )
            self._replace(recipes)
        if not resumed:
            if s.merger_mode:
                (res,) = self.pool.evaluate_vectors([self.merged_ref])
                state.merged_fitness = res["fitness"]
            state.fitness = [r["fitness"] for r in self.pool.evaluate_vectors(self.refs)]
        return state

    def _make_merger(self) -> Any:
        from evoray.mergers import make_merger

        s, inp = self.settings, self.inputs
        n = len(inp.members)
        if s.merger == "average":
            return make_merger("average", self.layout, n)
        tasks = inp.member_tasks or (None,) * n
        stats = ray.get(
            [
                compute_statistics.remote(
                    s.merger,
                    m,
                    inp.tasks,
                    None if t is None else [t],
                    inp.stats_examples,
                    inp.cache_dir,
                )
                for m, t in zip(inp.members, tasks, strict=True)
            ]
        )
        if s.merger == "fisher":
            return make_merger(
                "fisher", self.layout, n, fishers=stats, smoothing=s.fisher_smoothing
            )
        return make_merger("regmean", self.layout, n, grams=stats, alpha=s.regmean_alpha)

    def _context(self) -> dict[str, ray.ObjectRef | None]:
        return {"base": self.base_ref, "merged": self.merged_ref, "merger": self.merger_ref}

    def _replace(self, accepted: Sequence[Recipe]) -> None:
        """Synchronous update: every accepted offspring is built from the same old population."""
        if not accepted:
            return
        old = list(self.refs)
        for r in accepted:
            self.refs[r.target] = self.pool.submit("build", r.to_dict(), *old)

    # -- one generation -----------------------------------------------------------------------

    def step(self, state: EvolverState) -> dict[str, Any]:
        """Run generation ``state.generation``; updates ``state``; returns Tune metrics."""
        s = self.settings
        t0 = time.perf_counter()
        recipes = state.recipes()
        results = self.pool.evaluate_recipes(
            recipes, self.refs, merged=s.merger_mode, context=self._context()
        )
        trials = [
            Trial(r, res["fitness"], flat_scores(res["scores"]))
            for r, res in zip(recipes, results, strict=True)
        ]
        if s.merger_mode:
            improving = improving_merges(state.merged_fitness, trials)
            combined = None
            if len(improving) > 1:
                ref = self.pool.submit(
                    "update_merged",
                    self.merger_ref,
                    self.merged_ref,
                    [t.recipe.to_dict() for t in improving],
                    *self.refs,
                )
                (res,) = self.pool.evaluate_vectors([ref])
                combined = res["fitness"]
            chosen = choose_merged(improving, combined)
            if chosen:
                self.merged_ref = self.pool.submit(
                    "update_merged",
                    self.merger_ref,
                    self.merged_ref,
                    [t.recipe.to_dict() for t in chosen],
                    *self.refs,
                )
                state.merged_fitness = combined if len(chosen) > 1 else chosen[0].fitness
        else:
            chosen = select_individuals(state.fitness, trials)
            for t in chosen:
                state.fitness[t.recipe.target] = t.fitness
        accepted = {t.recipe.target for t in chosen}
        self._replace([t.recipe for t in chosen])
        state.accepted.append([t.recipe.to_dict() for t in chosen])
        self._log(state.generation, recipes, results, accepted)
        state.generation += 1
        return {
            "generation": state.generation,
            "best_fitness": state.best_fitness,
            "mean_fitness": sum(state.fitness) / len(state.fitness) if state.fitness else None,
            "accepted": len(chosen),
            "evaluated": len(recipes),
            "generation_time_s": time.perf_counter() - t0,
        }

    def _log(self, generation: int, recipes, results, accepted: set[int]) -> None:
        if self.run_log is None:
            return
        s = self.settings
        for r, res in zip(recipes, results, strict=True):
            self.run_log.append(
                {
                    "run_id": self.run_id,
                    "strategy": "evolver",
                    "generation": generation,
                    "individual": r.target,
                    "parents": [r.target, *r.refs],
                    "operator": f"{r.mutation}+binomial"
                    + (f"|{s.merger}" if s.merger_mode else ""),
                    "F": r.F,
                    "CR": r.CR,
                    "seed": r.seed,
                    "scores": flat_scores(res["scores"]),
                    "fitness": res["fitness"],
                    "accepted": r.target in accepted,
                    "kinship_to_parent": res["kinship_to_parent"],
                    "wall_time_s": res["build_time_s"] + res["eval_time_s"],
                    "eval_time_s": res["eval_time_s"],
                    "node": res["node"],
                    "device": res["device"],
                    "timestamp": datetime.now(timezone.utc),
                }
            )
        self.run_log.commit_generation(generation)

    # -- results ------------------------------------------------------------------------------

    def final_ref(self, state: EvolverState) -> ray.ObjectRef:
        """The run's answer: the merged model (merger mode) or the best individual."""
        if self.settings.merger_mode:
            return self.merged_ref
        return self.refs[state.best_individual]
