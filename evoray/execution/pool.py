"""The Ray edge: population vectors in the object store, a persistent pool of offspring workers.

The driver holds only object refs. Population vectors are numpy arrays in the object store,
shared by the workers of a node zero-copy; new individuals and merged vectors are computed by
the (already warm) workers and returned into the object store, so offspring weights never pass
through the driver. Workers are long-lived actors, each with a model on its device, fed recipes
through ``ray.util.ActorPool``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray
import torch
from ray.util import ActorPool

from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.strategies.de import Recipe
from evoray.weights.flat import FlatWeights, to_numpy
from evoray.weights.layout import Layout

DEALINGS = ("static", "dynamic")


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
        worker_cls: type = OffspringWorker,
        dealing: str = "static",
    ) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if dealing not in DEALINGS:
            raise ValueError(f"dealing must be one of {DEALINGS}, got {dealing!r}")
        actor = ray.remote(worker_cls).options(
            num_cpus=num_cpus,
            num_gpus=num_gpus,
            max_restarts=max_restarts,
            max_task_retries=max_restarts,
        )
        self.spec = spec
        self.dealing = dealing
        self.actors = [actor.remote(spec) for _ in range(num_workers)]
        self._pool = ActorPool(self.actors)
        self._next = 0

    def submit(self, method: str, *args: Any) -> ray.ObjectRef:
        """Run one call on the next worker in turn; the result stays in the object store."""
        actor = self.actors[self._next % len(self.actors)]
        self._next += 1
        return getattr(actor, method).remote(*args)

    def evaluate_recipes(
        self,
        recipes: Sequence[Recipe],
        population: Sequence[ray.ObjectRef],
        *,
        merged: bool,
        context: dict[str, ray.ObjectRef | None] | None = None,
        races: Sequence[Any] | None = None,
        keep_above: Sequence[float | None] | None = None,
    ) -> list[dict]:
        """Results in recipe order, whatever the dealing (each depends on its recipe alone).

        ``static`` dealing: round-robin, one call per worker, so a generation costs one round
        trip per worker; right when offspring cost the same to score. ``dynamic``: one recipe
        per call, the next to whichever worker frees first, for uneven costs (racing).
        The population and the ``context`` refs (base, merged, merger) travel nested in the
        call (nothing is copied), so a worker fetches each only once. ``races`` (per recipe,
        ``Race`` or None) travel inside the recipe dicts as ``race``, ``keep_above`` (per
        recipe) likewise: a result whose fitness beats it carries ``weights``, a ref to the
        offspring as scored (else None). A worker that dies is restarted by Ray and its call
        retried (``max_task_retries``); everything it needs comes with the call, so the retry
        gives the same result."""
        n, w = len(recipes), len(self.actors)
        # Nested refs: a worker fetches only the slots that changed since its last call.
        ctx = {**(context or {}), "population": list(population)}
        dicts = [r.to_dict() for r in recipes]
        for d, race in zip(dicts, races or [None] * n, strict=True):
            if race is not None:
                d["race"] = race.to_dict()
        for d, above in zip(dicts, keep_above or [None] * n, strict=True):
            if above is not None:
                d["keep_above"] = float(above)
        if self.dealing == "static":
            chunks = deque(list(range(i, n, w)) for i in range(min(w, n)))
        else:
            chunks = deque([i] for i in range(n))
        out: list[dict] = [{}] * n
        free = list(range(w))
        pending: dict[ray.ObjectRef, tuple[int, list[int], list[ray.ObjectRef]]] = {}
        while chunks or pending:
            while chunks and free:
                a, idx = free.pop(0), chunks.popleft()
                call = self.actors[a].evaluate_batch.options(num_returns=1 + len(idx))
                refs = call.remote([dicts[i] for i in idx], merged, ctx)
                pending[refs[0]] = (a, idx, refs[1:])
            (done,), _ = ray.wait(list(pending), num_returns=1)
            a, idx, weights = pending.pop(done)
            free.append(a)
            for i, res, ref in zip(idx, ray.get(done), weights, strict=True):
                out[i] = {**res, "weights": ref if res["kept"] else None}
        return out

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
        arr = to_numpy(t)
    return FlatWeights(layout, arr)
