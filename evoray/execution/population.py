"""The population on Ray: answers a strategy's batches with the worker pool and object store.

The driver holds only object refs: population slots, the base, the merged model and the merger.
Builds become worker calls (offspring, merges) whose results stay in the object store; scoring
goes to the workers, one call per worker for a batch of DE offspring, so a generation costs one
round trip per worker. An offspring that beats its ``keep_above`` comes back with its weights
(the ones it was scored with), so keeping it costs no rebuild call before the next generation;
only for models up to ``KEEP_SCORED_MAX_BYTES``, since a worker holds those copies until its
call returns (larger models are rebuilt by a ``build_for_store`` call into the worker's own
model, which the store copies from: seconds against their evaluation, and no second model).
Every build of a batch reads the population as it was when the batch arrived; keeps are
applied after its scores and kinships.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import torch

from evoray.execution.pool import WorkerPool
from evoray.models.pool import ModelPool
from evoray.strategies.base import (
    Answers,
    Batch,
    Build,
    Member,
    MergeAll,
    Merged,
    MergedWith,
    MethodMerge,
    Offspring,
    Score,
)
from evoray.strategies.de import Recipe
from evoray.tasks.pool import TaskPool, ZooTasks
from evoray.weights.flat import from_numpy, to_numpy


@dataclass(frozen=True)
class RunInputs:
    """A run's models and tasks, and where merger statistics are computed and cached."""

    models: ModelPool
    tasks: TaskPool = field(default_factory=ZooTasks)
    stats_examples: int = 256
    cache_dir: str | None = None

    @property
    def members(self) -> tuple[str, ...]:
        return self.models.members

    @property
    def base(self) -> str | None:
        return self.models.base


def member_statistics(
    kind: str,
    models: ModelPool,
    model_path: str,
    tasks: TaskPool,
    task_names: Sequence[str] | None,
    n: int,
    cache_dir: str | None,
    device: str = "cpu",
    load: Callable[[], tuple[Any, Any]] | None = None,
) -> dict:
    """Fisher diagonals or RegMean Grams of one member on its training data (cached on disk),
    computed on ``device`` (a worker's: statistics of a causal LM want its GPU). ``load``
    gives the (model, tokenizer) to use instead of loading the member (a worker's own model
    holding the member's weights: no second model on its device)."""
    from evoray.population.statistics import cached_statistics, fisher_diagonal, regmean_grams

    def compute() -> dict:
        if load is not None:
            model, tok = load()
        else:
            model, tok = models.load(model_path)
            model = model.to(device)
        split = tasks.train_batch(tok, task_names, n)
        if kind == "fisher":
            return fisher_diagonal(model, split)
        return regmean_grams(model, split)

    names = list(task_names) if task_names else tasks.names()
    key = f"train-{'+'.join(names)}-{max(1, n // len(names))}"
    if cache_dir is None:
        return compute()
    return cached_statistics(kind, Path(model_path), key, compute, Path(cache_dir))


@ray.remote(num_cpus=0)
def compute_statistics(
    kind: str,
    models: ModelPool,
    model_path: str,
    tasks: TaskPool,
    task_names: Sequence[str] | None,
    n: int,
    cache_dir: str | None,
) -> dict:
    """``member_statistics`` as a Ray task on the CPU (the workers run it on their device)."""
    return member_statistics(kind, models, model_path, tasks, task_names, n, cache_dir)


def store_statistics(stats: dict[str, torch.Tensor]) -> dict[str, ray.ObjectRef]:
    """Put one member's statistics into the object store, one object per tensor, emptying
    ``stats`` as it goes (the caller's host copy shrinks while the store's grows): the driver
    then reads them tensor by tensor (``StoredStatistics``) from whichever node holds them,
    with no cache directory shared between nodes."""
    return {name: ray.put(to_numpy(stats.pop(name))) for name in list(stats)}


class StoredStatistics(Mapping[str, torch.Tensor]):
    """One member's statistics as ``store_statistics`` left them: each tensor is fetched when
    read and not kept, so a merger built from these (``FisherMerger``, ``RegMeanMerger``:
    tensor by tensor) holds one tensor of every member at a time on the driver instead of
    every member's whole statistics (``4 N P`` bytes of Fisher). Zero-copy on the node that
    holds the object; read-only."""

    def __init__(self, refs: Mapping[str, ray.ObjectRef]) -> None:
        self.refs = dict(refs)

    def __getitem__(self, name: str) -> torch.Tensor:
        return from_numpy(ray.get(self.refs[name]))

    def __contains__(self, name: object) -> bool:  # Mapping's default would fetch
        return name in self.refs

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


#: Largest model whose scored offspring workers return as they are (see the module docstring).
KEEP_SCORED_MAX_BYTES = 1 << 30


class RayPopulation:
    """Population slots as object refs, answered by a ``WorkerPool``."""

    def __init__(self, inputs: RunInputs, pool: WorkerPool) -> None:
        self.inputs = inputs
        self.pool = pool
        self.layout = pool.spec.layout
        self.refs: list[ray.ObjectRef | None] = []  # None: a released slot
        self.base_ref: ray.ObjectRef | None = None
        self.merged_ref: ray.ObjectRef | None = None
        self.merger_ref: ray.ObjectRef | None = None
        # Offspring as scored in the last batch, by (recipe, population it read): keeping one
        # reuses these weights instead of rebuilding them on a worker.
        self._scored: dict[tuple[Recipe, tuple], ray.ObjectRef] = {}

    def load(self) -> None:
        """Flat vectors of the base and the members, read by the workers into the store."""
        base = self.inputs.base
        self.base_ref = self.pool.submit("load_for_store", base) if base is not None else None
        self.refs = [self.pool.submit("load_for_store", p) for p in self.inputs.members]

    def make_merger(self, kind: str, params: dict[str, Any]) -> None:
        """The population merger (average, or Fisher/RegMean from per-member statistics)."""
        from evoray.population.mergers import make_merger

        inp = self.inputs
        n = len(inp.members)
        if kind == "average":
            merger = make_merger("average", self.layout, n)
        else:
            tasks = inp.models.member_tasks or (None,) * n
            # On the workers: their device, and no extra processes. Each comes back as one
            # object ref per tensor, read one tensor of every member at a time by the merger.
            stored = ray.get(
                [
                    self.pool.submit(
                        "stored_statistics",
                        kind,
                        inp.models,
                        m,
                        None if t is None else [t],
                        inp.stats_examples,
                        inp.cache_dir,
                        ref,  # the member's vector: the worker computes on its own model
                    )
                    for m, t, ref in zip(inp.members, tasks, self.refs, strict=True)
                ]
            )
            stats = [StoredStatistics(refs) for refs in stored]
            key = "fishers" if kind == "fisher" else "grams"
            merger = make_merger(kind, self.layout, n, **{key: stats}, **params)
            del stats, stored  # the store frees the statistics once no ref to them remains
        self.merger_ref = ray.put(merger)

    # -- batches -------------------------------------------------------------------------------

    def execute(self, batch: Batch) -> Answers:
        """Scores, kinships, then keeps, all against the population as the batch found it."""
        pop = list(self.refs)
        merged = self.merged_ref
        scores = self._evaluate(batch.evaluate, pop, merged) if batch.evaluate else []
        kinship = self._kinship(batch.kinship, pop)
        for keep in batch.keep:
            ref = self.materialize(keep.build, pop, merged)
            if keep.slot is None:
                self.merged_ref = ref
                continue
            if keep.slot >= len(self.refs):
                self.refs.extend([None] * (keep.slot + 1 - len(self.refs)))
            self.refs[keep.slot] = ref
        for slot in batch.release:  # the store frees the vector once no ref to it remains
            self.refs[slot] = None
        if batch.keep:
            self._scored = {}
        return Answers(scores=scores, kinship=kinship)

    def _context(self, merged: ray.ObjectRef | None) -> dict[str, ray.ObjectRef | None]:
        return {"base": self.base_ref, "merged": merged, "merger": self.merger_ref}

    def _evaluate(self, builds: Sequence[Build], pop, merged) -> list[Score]:
        """DE offspring (alone or in the merge) go out as one batch call per worker; merges
        are merged and scored on a worker; other builds are scored as vectors."""
        if all(isinstance(b, Offspring) for b in builds) or all(
            isinstance(b, MergedWith) and len(b.recipes) == 1 for b in builds
        ):
            in_merge = isinstance(builds[0], MergedWith)
            recipes = [b.recipes[0] if in_merge else b.recipe for b in builds]
            results = self.pool.evaluate_recipes(
                recipes,
                pop,
                merged=in_merge,
                context=self._context(merged),
                races=[b.race for b in builds],
                keep_above=None
                if in_merge or self.layout.nbytes > KEEP_SCORED_MAX_BYTES
                else [b.keep_above for b in builds],
            )
            key = tuple(pop)
            self._scored = {
                (r, key): res["weights"]
                for r, res in zip(recipes, results, strict=True)
                if res.get("weights") is not None
            }
            return [_score(r) for r in results]
        if all(isinstance(b, MethodMerge) for b in builds):
            calls = [
                self.pool.submit("merge_and_evaluate", *self._merge_args(b, pop)) for b in builds
            ]
            return [_score(r) for r in ray.get(calls)]
        refs = [self.materialize(b, pop, merged) for b in builds]
        return [_score(r) for r in self.pool.evaluate_vectors(refs)]

    def _kinship(self, pairs: Sequence[tuple[int, int]], pop) -> list[float]:
        calls = [
            self.pool.submit("kinship", self.base_ref, _slot(pop, a), _slot(pop, b))
            for a, b in pairs
        ]
        return [k["pearson"] for k in ray.get(calls)]

    def _merge_args(self, b: MethodMerge, pop) -> tuple:
        members = [_slot(pop, i) for i in b.slots]
        base = (self.base_ref,) if b.with_base else ()
        return (b.method, [dict(p) for p in b.per_model], dict(b.settings), *base, *members)

    def materialize(self, build: Build, pop=None, merged=None) -> ray.ObjectRef:
        """A ref to the flat vector of ``build`` (computed by a worker where needed)."""
        pop = list(self.refs) if pop is None else pop
        merged = self.merged_ref if merged is None else merged
        if isinstance(build, Member):
            return _slot(pop, build.slot)
        if isinstance(build, Merged):
            return merged
        if isinstance(build, Offspring):
            scored = self._scored.get((build.recipe, tuple(pop)))
            if scored is not None:
                return scored
            return self.pool.submit("build_for_store", build.recipe.to_dict(), *pop)
        if isinstance(build, MergeAll):
            return self.pool.submit("merge", self.merger_ref, *pop)
        if isinstance(build, MergedWith):
            recipes = [r.to_dict() for r in build.recipes]
            return self.pool.submit("update_merged", self.merger_ref, merged, recipes, *pop)
        if isinstance(build, MethodMerge):
            return self.pool.submit("merge_vector", *self._merge_args(build, pop))
        raise TypeError(f"unknown build {build!r}")

    def test_scores(self, ref: ray.ObjectRef) -> dict[str, dict[str, dict[str, float]]]:
        """In-domain test and OOD test scores of one vector (for the final report only)."""
        (test,) = self.pool.evaluate_vectors([ref], split="test")
        out = {"test": test["scores"]}
        if self.inputs.tasks.has_ood:
            (ood,) = self.pool.evaluate_vectors([ref], split="ood-test")
            out["ood"] = ood["scores"]
        return out


def _slot(pop: Sequence[ray.ObjectRef | None], i: int) -> ray.ObjectRef:
    """Population slot ``i``; a released one is a strategy bug (it must keep it again first)."""
    ref = pop[i] if 0 <= i < len(pop) else None
    if ref is None:
        raise RuntimeError(f"population slot {i} is empty (released or never kept)")
    return ref


def _score(result: dict[str, Any]) -> Score:
    return Score(
        fitness=result["fitness"],
        scores=result["scores"],
        build_time_s=result.get("build_time_s", 0.0),
        eval_time_s=result["eval_time_s"],
        kinship_to_parent=result.get("kinship_to_parent"),
        node=result["node"],
        device=result["device"],
        examples=result.get("examples"),
        racing_stopped=bool(result.get("racing_stopped", False)),
    )
