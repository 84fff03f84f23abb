"""Resource requests checked against the Ray cluster before work is submitted.

Ray waits forever, printing only autoscaler warnings, for an actor, task or placement group no
node can hold. ``evoray run`` (a trial's workers) and ``evoray fuse`` (each fusion task, the
data-parallel workers) check their request here first and fail with the field to change.
The check uses the nodes alive now; an autoscaling cluster that would add nodes later is
treated as the cluster it is at the moment.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from evoray.errors import EvorayError

log = logging.getLogger(__name__)


class CapacityError(EvorayError):
    """A resource request that no node (or not the whole cluster) can hold."""


def cluster_resources() -> list[dict[str, float]]:
    """Resources of each alive node of the connected Ray cluster."""
    import ray

    return [
        {k: float(v) for k, v in n.get("Resources", {}).items()}
        for n in ray.nodes()
        if n.get("Alive")
    ]


def _shortfall(
    num_cpus: float, num_gpus: float, count: int, nodes: list[dict[str, float]]
) -> tuple[str, float, float, float, bool] | None:
    """(resource, wanted, largest node, cluster total, one unit too big) of the first resource
    that does not fit: one unit on the largest node, ``count`` units in the whole cluster."""
    for key, want in (("GPU", num_gpus), ("CPU", num_cpus)):
        if want <= 0:
            continue
        largest = max((r.get(key, 0.0) for r in nodes), default=0.0)
        total = sum(r.get(key, 0.0) for r in nodes)
        if want > largest:
            return key, want, largest, total, True
        if want * count > total:
            return key, want, largest, total, False
    return None


def check_capacity(num_cpus: float, num_gpus: float, count: int = 1) -> None:
    """Fusion's check: fail now, not hang.  ``count`` tasks that must run at once
    (data-parallel workers) need that many times the resources in all."""
    from evoray.fusion import FusionError

    short = _shortfall(num_cpus, num_gpus, count, cluster_resources())
    if short is None:
        return
    key, want, largest, total, one = short
    name = f"num_{key.lower()}s"
    if one:
        raise FusionError(
            f"each fusion task asks for {key.lower()}s={want:g} but the Ray cluster has "
            f"{total:g} ({largest:g} on its largest node); lower resources.{name} in the "
            "fuse config or add nodes"
        )
    raise FusionError(
        f"{count} data-parallel workers with {key.lower()}s={want:g} each need "
        f"{want * count:g} but the Ray cluster has {total:g}; lower "
        f"resources.train_workers or resources.{name}"
    )


def check_trial_capacity(
    num_workers: int,
    cpus_per_worker: float,
    gpus_per_worker: float,
    max_concurrent_trials: int = 1,
    *,
    source: str = "",
    warn: Callable[[str], None] | None = None,
) -> None:
    """``evoray run``: every trial reserves ``num_workers`` bundles of ``cpus_per_worker`` /
    ``gpus_per_worker`` at once (a placement group), so one trial must fit the cluster, each
    worker on one node.  More concurrent trials than fit only queue: a warning, not an error."""
    nodes = cluster_resources()
    prefix = f"{source}: " if source else ""
    short = _shortfall(cpus_per_worker, gpus_per_worker, num_workers, nodes)
    if short is not None:
        key, want, largest, total, one = short
        field = f"execution.{key.lower()}s_per_worker"
        more = (
            "start Ray with more (--num-cpus) or add nodes"
            if key == "CPU"
            else "run on a cluster with GPUs (--address) or set execution.gpus_per_worker: 0"
        )
        if one:
            raise CapacityError(
                f"{prefix}{field}: each worker asks for {key.lower()}s={want:g} but the Ray "
                f"cluster has {total:g} ({largest:g} on its largest node), so the run would "
                f"wait forever; lower {field}, or {more}"
            )
        raise CapacityError(
            f"{prefix}execution.num_workers: a trial's {num_workers} workers with "
            f"{key.lower()}s={want:g} each need {want * num_workers:g} but the Ray cluster has "
            f"{total:g}, so the run would wait forever; lower execution.num_workers or {field}"
        )
    fits = []
    for key, want in (("CPU", cpus_per_worker), ("GPU", gpus_per_worker)):
        if want > 0:
            fits.append(int(sum(r.get(key, 0.0) for r in nodes) // (want * num_workers)))
    at_once = min(fits) if fits else max_concurrent_trials
    if at_once < max_concurrent_trials:
        (warn or log.warning)(
            f"{prefix}execution.max_concurrent_trials is {max_concurrent_trials} but the Ray "
            f"cluster holds {at_once} trial(s) of {num_workers} workers at once; the others "
            "wait their turn"
        )
