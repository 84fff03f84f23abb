"""Fusion's heavy steps on Ray: tasks that reserve their own CPUs/GPUs, and data-parallel
training with Ray Train.

``run_jobs`` runs independent jobs (model builds, the CLM baseline and the FuseLLM target,
perplexities) as one task each, all at once, each on the GPU Ray assigns it (``num_gpus: 1``)
or on CPUs; without Ray the same jobs run one after the other here.  ``run_data_parallel`` runs
one training as DistributedDataParallel workers (``resources.train_workers``).  Paths travel,
not weights: on a multi-node cluster ``output_dir`` must be storage every node sees (as Tune's
``storage_path``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from evoray.errors import EvorayError, ray_get
from evoray.execution.capacity import check_capacity
from evoray.fusion import FusionError

Job = tuple[Callable[..., dict], dict[str, Any]]


def quiet_transformers() -> None:
    """No per-file progress bars from Ray workers: the driver prints the progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _run_job(fn: Callable[..., dict], kwargs: dict[str, Any]) -> dict:
    """Inside the Ray task: one torch thread per reserved CPU, refuse GPUs torch cannot use."""
    import ray
    import torch

    quiet_transformers()
    ctx = ray.get_runtime_context()
    cpus = ctx.get_assigned_resources().get("CPU", 1)
    torch.set_num_threads(max(1, int(cpus)))
    gpu_ids = [str(g) for g in ray.get_gpu_ids()]
    if gpu_ids and not torch.cuda.is_available() and kwargs.get("device", "auto") != "cpu":
        raise FusionError(
            f"Ray gave this task GPU(s) {gpu_ids} but torch {torch.__version__} sees no CUDA "
            "device (a CPU build of torch on a GPU node?); install a CUDA torch, or set "
            "resources.num_gpus: 0"
        )
    result = fn(**kwargs)
    return {**result, "gpu_ids": gpu_ids, "node_id": ctx.get_node_id()}


def run_jobs(
    jobs: Sequence[Job], *, use_ray: bool, num_cpus: float = 1, num_gpus: float = 0
) -> list[dict]:
    """Results of ``fn(**kwargs)`` for every job, in order.  With ``use_ray`` (Ray must be
    initialised) each job is one task with ``num_cpus``/``num_gpus`` and all run at once; an
    EvorayError raised inside a task is re-raised here as itself."""
    if not use_ray:
        return [fn(**kwargs) for fn, kwargs in jobs]
    import ray

    if not ray.is_initialized():
        raise FusionError("use_ray is set but Ray is not initialised (call ray.init first)")
    check_capacity(num_cpus, num_gpus)
    task = ray.remote(_run_job).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)
    return ray_get([task.remote(fn, kwargs) for fn, kwargs in jobs])


def _ddp_worker(config: dict[str, Any]) -> dict:
    """One Ray Train worker: the job with this worker's rank and device (rank 0's return value
    is the result of ``fit``)."""
    import ray.train
    import ray.train.torch
    import torch

    quiet_transformers()
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(config["threads"])))
    dist = (ctx.get_world_rank(), ctx.get_world_size())
    device = str(ray.train.torch.get_device())
    result = config["fn"](**config["kwargs"], device=device, dist=dist)
    return {**result, "world_size": dist[1]}


def run_data_parallel(
    job: Job,
    *,
    workers: int,
    num_cpus: float = 1,
    num_gpus: float = 0,
    storage_path: str | Path,
) -> dict:
    """One training job as ``workers`` DistributedDataParallel processes (Ray Train's
    TorchTrainer; NCCL on GPUs, gloo on CPUs), each reserving ``num_cpus``/``num_gpus``.
    ``storage_path`` holds Ray Train's run records (shared storage on several nodes).  Returns
    rank 0's result; a worker's EvorayError comes back as itself."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        raise FusionError("data-parallel training needs Ray (call ray.init first)")
    fn, kwargs = job
    kwargs = {k: v for k, v in kwargs.items() if k != "device"}  # Ray Train assigns devices
    batch = kwargs.get("batch_size", 8)
    if workers < 1 or batch % workers:
        raise FusionError(f"batch_size {batch} must be a multiple of the {workers} workers")
    check_capacity(num_cpus, num_gpus, count=workers)
    resources = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
    trainer = TorchTrainer(
        _ddp_worker,
        train_loop_config={"fn": fn, "kwargs": kwargs, "threads": num_cpus},
        scaling_config=ScalingConfig(
            num_workers=workers, use_gpu=num_gpus > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            storage_path=str(Path(storage_path).absolute()),
            name=f"{Path(kwargs['out_dir']).name}-{os.getpid()}",
        ),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train wraps worker errors; surface ours plainly
        cause = _evoray_cause(exc)
        if cause is not None:
            raise cause from None
        raise
    return result.return_value


def _evoray_cause(exc: BaseException) -> EvorayError | None:
    """The EvorayError somewhere inside a Ray Train failure, if any."""
    seen: set[int] = set()
    stack: list[BaseException] = [exc]
    while stack:
        e = stack.pop()
        if id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, EvorayError):
            return e
        stack.extend(x for x in (e.__cause__, e.__context__, getattr(e, "cause", None)) if x)
        errors = getattr(e, "worker_failures", None) or getattr(e, "errors", None)
        if isinstance(errors, dict):
            stack.extend(x for x in errors.values() if isinstance(x, BaseException))
    return None
