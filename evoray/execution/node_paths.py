"""Paths the workers read, checked on every node of a cluster before the search starts.

Config paths are resolved on the driver, but workers open them on whatever node they land
on: a dataset or model folder that exists only on the driver's machine would fail inside a
worker minutes later, once per retry. On a multi-node cluster a zero-CPU task pinned to each
node checks them first, and the error names the config field, the path and the nodes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from evoray.errors import ConfigError

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 120.0


def config_paths(config: Any, models: Any = None) -> list[tuple[str, str]]:
    """(dotted field, absolute path) of every local path workers read: members, base, zoo
    folders, task data, lm-eval include paths, local ``evaluate`` metric modules, the run
    dir. Only paths that exist here are listed (others are hub ids or fail elsewhere)."""
    out: list[tuple[str, str]] = []
    if models is not None:  # the resolved pool (a zoo's members live under its root)
        for i, m in enumerate(models.members):
            out.append((f"models.members[{i}]", str(m)))
        if models.base:
            out.append(("models.base", str(models.base)))
    else:
        for i, m in enumerate(config.models.members):
            out.append((f"models.members[{i}]", m))
        if config.models.base:
            out.append(("models.base", config.models.base))
    if isinstance(config.tasks, list):
        for i, entry in enumerate(config.tasks):
            out += _task_paths(f"tasks[{i}]", entry)
    out.append(("output.run_dir", str(config.run_dir)))
    return [(f, str(Path(p).resolve())) for f, p in out if isinstance(p, str) and os.path.exists(p)]


def _task_paths(prefix: str, entry: dict[str, Any]) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    data = entry.get("data")
    if isinstance(data, dict):
        out += [(f"{prefix}.data.{split}", src) for split, src in data.items()]
    elif data is not None:
        out.append((f"{prefix}.data", data))
    if entry.get("include_path"):
        out.append((f"{prefix}.include_path", entry["include_path"]))
    for j, m in enumerate(entry.get("evaluate_metrics") or ()):
        out.append((f"{prefix}.evaluate_metrics[{j}]", m))
    return out


def _exists(paths: Sequence[str]) -> list[bool]:
    return [os.path.exists(p) for p in paths]


def worker_nodes() -> list[dict[str, Any]]:
    """Alive nodes that can host a worker (they have CPUs)."""
    import ray

    return [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get("CPU", 0) > 0]


def missing_on_nodes(paths: Sequence[str], nodes: Iterable[dict[str, Any]]) -> dict[str, list[str]]:
    """Path -> the nodes (``ip (node id prefix)``) where it does not exist."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(_exists)
    nodes = list(nodes)
    calls = [
        probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(list(paths))
        for n in nodes
    ]
    ready, _ = ray.wait(calls, num_returns=len(calls), timeout=PROBE_TIMEOUT_S)
    missing: dict[str, list[str]] = {}
    for node, call in zip(nodes, calls, strict=True):
        name = f"{node.get('NodeManagerAddress', '?')} ({node['NodeID'][:8]})"
        if call not in ready:
            log.warning("could not check the config's paths on node %s (no answer)", name)
            continue
        for path, ok in zip(paths, ray.get(call), strict=True):
            if not ok:
                missing.setdefault(path, []).append(name)
    return missing


def check_paths_on_nodes(fields: Sequence[tuple[str, str]], *, source: str = "") -> None:
    """Fail before the search starts when a path workers read is missing on some node of a
    multi-node cluster (a single node is the driver's own: nothing to check)."""
    nodes = worker_nodes()
    if len(nodes) < 2 or not fields:
        return
    paths = sorted({p for _, p in fields})
    missing = missing_on_nodes(paths, nodes)
    if not missing:
        return
    prefix = f"{source}: " if source else ""
    lines = [
        f"  {field}: {path} is missing on {', '.join(missing[path])}"
        for field, path in fields
        if path in missing
    ]
    raise ConfigError(
        f"{prefix}paths that exist on this machine are missing on other nodes of the Ray "
        "cluster, where workers would fail to read them:\n"
        + "\n".join(lines)
        + "\nPut them on storage every node mounts at the same path (NFS, a shared volume), or "
        "copy them to the same absolute path on every node, then run again."
    )
