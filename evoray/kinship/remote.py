"""The Ray fan-out of the kinship pass: tensor names cut into contiguous groups of about equal
size, two per CPU, one task per group returning its partial sums.

Tasks open the checkpoints from their resolved local paths, so on a multi-node cluster every
node must see those paths (shared storage).
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import Any

from evoray.errors import ray_get
from evoray.kinship.gram import GramSums, group_sums
from evoray.weights.checkpoint import Checkpoint
from evoray.weights.layout import Layout


def _split(names: Sequence[str], sizes: Sequence[int], parts: int) -> list[list[str]]:
    """Contiguous groups of about equal total size (file order keeps reads sequential)."""
    total = sum(sizes) or 1
    groups: list[list[str]] = [[]]
    done = 0
    for name, size in zip(names, sizes, strict=True):
        if groups[-1] and done >= total * len(groups) / parts:
            groups.append([])
        groups[-1].append(name)
        done += size
    return groups


def ray_enabled(parallel: bool | None) -> bool:
    if parallel is False:
        return False
    if parallel is None:
        ray = sys.modules.get("ray")  # not imported means not initialised: skip the import cost
        return ray is not None and ray.is_initialized()
    return True


@functools.cache
def _remote_group_sums() -> Any:
    """The Ray task, made once per process (each ``ray.remote`` call re-exports the function)."""
    import ray

    return ray.remote(num_cpus=1)(group_sums)


def ray_sums(
    ckpts: Sequence[Checkpoint],
    layout: Layout,
    allow_pickle: bool,
    per_layer: bool,
    chunk_elems: int,
    allow_nonfinite: bool = False,
) -> list[dict[str, GramSums]]:
    """One Ray task per group of tensors; each returns its partial sums."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    cpus = int(ray.cluster_resources().get("CPU", 1)) or 1
    groups = _split(layout.names, [s.numel for s in layout.slots], 2 * cpus)
    paths = [str(c.path) for c in ckpts]  # resolved local paths: no hub lookups in the tasks
    task = _remote_group_sums()
    refs = [
        task.remote(
            paths,
            g,
            allow_pickle=allow_pickle,
            per_layer=per_layer,
            chunk_elems=chunk_elems,
            allow_nonfinite=allow_nonfinite,
        )
        for g in groups
    ]
    return ray_get(refs)
