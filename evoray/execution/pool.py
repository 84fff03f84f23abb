"""The Ray edge: population vectors in the object store, a persistent pool of offspring workers.

The driver holds only object refs. Population vectors are numpy arrays put into the object store
once per node (workers read them zero-copy); new individuals and merged vectors are produced by
Ray tasks, so offspring weights never pass through the driver. Workers are long-lived actors,
each with a model on its device, fed recipes through ``ray.util.ActorPool``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.util import ActorPool

from evoray.evolution.de import Recipe, build_offspring
from evoray.execution.worker import OffspringWorker, WorkerSpec, _as_tensor
from evoray.layout import Layout
from evoray.weight_space import FlatWeights


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.uint16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


@ray.remote(num_cpus=0)
def load_flat(path: str, layout: Layout, allow_pickle: bool = False) -> np.ndarray:
    """Read one checkpoint into a flat vector, straight into the object store."""
    from evoray.checkpoint import open_checkpoint
    from evoray.weight_space import flatten

    with open_checkpoint(path, allow_pickle=allow_pickle) as ckpt:
        return flatten(ckpt, layout).data


@ray.remote(num_cpus=0)
def build_remote(recipe: dict, *population: np.ndarray) -> np.ndarray:
    """An accepted offspring, rebuilt where the population lives."""
    pop = [_as_tensor(a) for a in population]
    return _to_numpy(build_offspring(Recipe.from_dict(recipe), pop))


@ray.remote(num_cpus=0)
def merge_remote(merger: Any, *population: np.ndarray) -> np.ndarray:
    """The merged model of a population, as a float32 flat vector."""
    return merger.merge([_as_tensor(a) for a in population]).float().numpy()


@ray.remote(num_cpus=0)
def update_merged_remote(
    merger: Any, merged: np.ndarray, recipes: list[dict], *population: np.ndarray
) -> np.ndarray:
    """``merged + sum_i A_i (u_i - theta_i)`` for accepted recipes (linear in each individual)."""
    pop = [_as_tensor(a) for a in population]
    out = _as_tensor(merged).to(torch.float32, copy=True)
    for r in recipes:
        recipe = Recipe.from_dict(r)
        u = build_offspring(recipe, pop)
        merger.apply_delta(out, recipe.target, u.float() - pop[recipe.target].float())
    return out.numpy()


class WorkerPool:
    """A fixed set of ``OffspringWorker`` actors sharing one spec."""

    def __init__(
        self,
        spec: WorkerSpec,
        num_workers: int,
        *,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_restarts: int = 3,
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        actor = ray.remote(OffspringWorker).options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        self.spec = spec
        self.actors = [actor.remote(spec) for _ in range(num_workers)]
        self._pool = ActorPool(self.actors)
        self._state: list[tuple[str, tuple]] = []

    def broadcast(self, method: str, *args: Any) -> list[Any]:
        """Call ``method`` on every worker (refs in args resolve to zero-copy arrays there)."""
        return ray.get([getattr(a, method).remote(*args) for a in self.actors])

    def evaluate_recipes(self, recipes: Sequence[Recipe], *, merged: bool) -> list[dict]:
        """Results in recipe order; workers take the next recipe as they free up."""
        return list(
            self._pool.map(
                lambda a, r: a.evaluate_recipe.remote(r.to_dict(), merged), list(recipes)
            )
        )

    def evaluate_vectors(self, refs: Sequence[ray.ObjectRef], split: str = "dev") -> list[dict]:
        return list(self._pool.map(lambda a, ref: a.evaluate_vector.remote(ref, split), list(refs)))

    def shutdown(self) -> None:
        for a in self.actors:
            ray.kill(a)


def flat_from_ref(ref: ray.ObjectRef, layout: Layout) -> FlatWeights:
    """Fetch a population vector into the caller (only for export at the end of a run)."""
    arr = np.array(ray.get(ref))  # copy: object-store arrays are read-only
    if arr.dtype == np.float32 and layout.storage_dtype != torch.float32:
        t = torch.from_numpy(arr).to(layout.storage_dtype)
        arr = _to_numpy(t)
    return FlatWeights(layout, arr)
