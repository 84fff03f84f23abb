"""An offspring worker: one model on one device, rebuilt in place from recipes and evaluated.

The worker's model parameters are views into one flat buffer laid out like the population, so
building an offspring writes straight into the model, with no state-dict copies. Population
vectors arrive as numpy arrays (zero-copy from Ray's object store); only recipes and scores
cross the network. This class is plain Python: ``evoray.execution.pool`` wraps it in a Ray actor,
and tests use it directly.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from evoray.execution.racing import race_scores
from evoray.kinship.metrics import KinshipSums, kinship_flat
from evoray.models.pool import check_model_for_tasks, load_model
from evoray.strategies.de import Recipe, build_into, build_offspring, build_range, default_chunk
from evoray.strategies.racing import Race
from evoray.tasks.evaluation import EncodedSplit
from evoray.tasks.pool import TaskPool, ZooTasks
from evoray.weights.device_plan import make_segments, place_model, plan_devices, worker_devices
from evoray.weights.flat import FlatWeights, from_numpy, to_numpy
from evoray.weights.layout import Layout
from evoray.weights.placement import (
    Segment,
    read_flat,
    single_segment,
    write_flat,
    write_range,
)


@dataclass(frozen=True)
class WorkerSpec:
    """What every worker needs to build its model and data."""

    model_path: str  # any population member's folder: architecture, config, tokenizer
    layout: Layout
    tasks: TaskPool = field(default_factory=ZooTasks)
    device: str = "cpu"
    # Devices one worker spans (``execution.gpus_per_worker`` when >= 2): the model's layers
    # are spread over cuda:0..n-1 of the actor. With ``device="cpu"`` it makes n CPU segments
    # (the multi-device path, testable without GPUs).
    num_devices: int = 1
    metric: str = "accuracy"
    batch_size: int = 512
    torch_threads: int | None = None
    allow_pickle: bool = False  # the run's checkpoint safety settings (``ModelPool``'s)
    trust_remote_code: bool = False
    quiet: bool = False  # `evoray run -q`: no progress bars from libraries (lm-eval's tqdm)


def silence_progress_bars() -> None:
    """Turn off tqdm bars and HF progress bars in this (worker) process: lm-eval draws a bar
    per request type and per task, which Ray forwards to the driver's terminal; ``-q`` means
    the results and one progress line only (``-v`` keeps them)."""
    import tqdm
    import tqdm.auto

    for cls in {tqdm.tqdm, tqdm.auto.tqdm}:
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_evoray_quiet", False):
            continue

        def quiet_init(self, *args, _init=init, **kwargs):  # callers pass disable= explicitly
            kwargs["disable"] = True
            _init.__get__(self, type(self))(*args, **kwargs)  # a function or partialmethod

        quiet_init._evoray_quiet = True  # type: ignore[attr-defined]
        cls.__init__ = quiet_init  # type: ignore[method-assign]
    try:
        from datasets.utils.logging import disable_progress_bar

        disable_progress_bar()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def bind_parameters(
    model: torch.nn.Module,
    flat: FlatWeights | torch.Tensor | list[Segment],
    layout: Layout,
) -> None:
    """Make every floating tensor of ``model`` a view into ``flat`` (same device and dtype):
    one flat buffer, or the worker's segments (each tensor lies inside one segment).

    A tied head (``layout.tied``) is the same parameter as its embedding, so binding the
    embedding binds both and they stay tied. A floating parameter outside the layout would
    keep whatever the model was built with (a randomly initialised head) while the search
    believes it controls the whole model, so it is an error naming the tensor."""
    if isinstance(flat, list):
        segments = flat
    else:
        buf = flat.as_tensor() if isinstance(flat, FlatWeights) else flat
        segments = [Segment(0, buf.numel(), buf)]
    for s in layout.slots:
        seg = next(g for g in segments if g.start <= s.offset < g.stop)
        if s.offset + s.numel > seg.stop:
            raise ValueError(f"tensor {s.name} crosses a segment boundary at {seg.stop}")
        lo = s.offset - seg.start
        view = seg.buffer[lo : lo + s.numel].view(s.shape)
        try:
            target = model.get_parameter(s.name)
        except AttributeError:
            target = model.get_buffer(s.name)
        if tuple(target.shape) != s.shape:
            raise ValueError(
                f"model tensor {s.name} has shape {tuple(target.shape)}, not {s.shape}"
            )
        view.copy_(target.detach())
        target.data = view
    ranges = [
        (g.buffer.data_ptr(), g.buffer.data_ptr() + g.buffer.numel() * g.buffer.element_size())
        for g in segments
    ]
    for name, p in model.named_parameters():
        if p.is_floating_point() and not any(a <= p.data_ptr() < b for a, b in ranges):
            raise ValueError(
                f"model tensor {name} is not in the weight space of {layout.source or 'the run'}"
                " (the checkpoint has no such tensor, so the model would keep a random init); "
                "load the checkpoint as its own architecture class (config.json architectures)"
            )


class OffspringWorker:
    """Holds one model whose weights are rebuilt per recipe; evaluates on the dev tasks."""

    def __init__(self, spec: WorkerSpec) -> None:
        if spec.torch_threads:
            torch.set_num_threads(spec.torch_threads)
        if spec.quiet:
            silence_progress_bars()
        self.spec = spec
        self.devices = worker_devices(spec.device, spec.num_devices)
        self.device = self.devices[0]  # inputs, dev data and build scratch live here
        layout = spec.layout
        check_model_for_tasks(spec.model_path, spec.tasks, allow_pickle=spec.allow_pickle)
        model, tok = load_model(
            spec.model_path,
            dtype=layout.storage_dtype,
            allow_pickle=spec.allow_pickle,
            trust_remote_code=spec.trust_remote_code,
        )
        # One segment on this worker's device, or the layers spread over several devices by
        # bytes (``plan_devices``). Tensors are bound (copied into their segment and dropped
        # from host memory) one by one before the model moves, so no device ever holds the
        # model twice; only what is outside the weight space (rotary tables, position ids)
        # moves with ``.to`` / ``place_model``.
        self.plan = None
        if len(self.devices) == 1:
            self.segments = single_segment(layout.numel, layout.storage_dtype, self.device)
        else:
            order = [n for n, _ in model.named_parameters()]
            self.plan = plan_devices(layout, len(self.devices), order)
            self.segments = make_segments(self.plan, layout.storage_dtype, self.devices)
        self.buffer = self.segments[0].buffer if len(self.segments) == 1 else None
        bind_parameters(model, self.segments, layout)
        if self.plan is None:
            self.model = model.to(self.device).eval()
        else:
            self.model = place_model(model, self.plan, self.devices).eval()
        self._tokenizer = tok
        self.dev = self._split("dev")
        self.population: list[torch.Tensor] = []
        self.merged: torch.Tensor | None = None
        self.merger: Any = None
        self.base: torch.Tensor | None = None
        self._context: dict[str, str | None] = {}
        self._population_refs: list[str | None] = []  # the refs ``population`` came from
        self.node = _node_name()
        self.pid = os.getpid()

    # -- state pushed by the driver (object refs resolve to zero-copy numpy arrays) -----------

    def set_population(self, *arrays: np.ndarray) -> None:
        """Adopt a population; arrays are read-only zero-copy views of the object store."""
        self.population = [from_numpy(a) for a in arrays]
        self._population_refs = []

    def use_context(self, context: dict[str, Any]) -> None:
        """Adopt the run's shared objects, given as object refs (``base``, ``merged``,
        ``merger``, and ``population``: a list of refs); each is fetched once and kept until
        its ref changes. Passing them with every call, rather than setting them once, lets a
        restarted worker recover them."""
        import ray

        for key, ref in context.items():
            if key == "population":
                self._use_population(ref)
                continue
            if ref is None:
                setattr(self, key, None)
                self._context[key] = None
                continue
            if self._context.get(key) != ref.hex():
                value = ray.get(ref)
                setattr(self, key, value if key == "merger" else from_numpy(value))
                self._context[key] = ref.hex()

    def _use_population(self, refs: list[Any]) -> None:
        """The population as refs: only those not held from the last call are fetched (a
        generation changes only its accepted slots), in one ``ray.get``."""
        import ray

        held = dict(zip(self._population_refs, self.population, strict=False))
        keys = [None if r is None else r.hex() for r in refs]
        new = {k: r for k, r in zip(keys, refs, strict=True) if k is not None and k not in held}
        held.update(zip(new, map(from_numpy, ray.get(list(new.values()))), strict=True))
        self.population = [None if k is None else held[k] for k in keys]  # type: ignore[misc]
        self._population_refs = keys

    # -- work ----------------------------------------------------------------------------------

    def evaluate_recipe(self, recipe: Recipe | dict, merged: bool = False) -> dict[str, Any]:
        """Build the offspring (or the merge containing it), score it on dev (by racing
        when the recipe dict carries a ``race``: ``Race.to_dict()``)."""
        race = None
        if isinstance(recipe, dict) and recipe.get("race") is not None:
            recipe = dict(recipe)
            race = Race(**recipe.pop("race"))
        elif isinstance(recipe, dict):
            recipe = {k: v for k, v in recipe.items() if k != "race"}
        recipe = Recipe.from_dict(recipe) if isinstance(recipe, dict) else recipe
        t0 = time.perf_counter()
        kin = self._build_in_merge(recipe) if merged else self._build_individual(recipe)
        t1 = time.perf_counter()
        raced = race_scores(self, race) if race is not None else self.full_scores()
        t2 = time.perf_counter()
        return {
            "recipe": recipe.to_dict(),
            **raced,
            "build_time_s": t1 - t0,
            "eval_time_s": t2 - t1,
            "kinship_to_parent": kin,
            "node": self.node,
            "device": str(self.device),
            "pid": self.pid,
        }

    def _build_individual(self, recipe: Recipe) -> float | None:
        """Build the offspring into the model, segment by segment on their devices; returns
        its kinship to its parent (Pearson of deltas from the base, from the stored values,
        summed per chunk) when there is a base."""
        sums = build_into(recipe, self.population, self.segments, base=self.base)
        return None if sums is None else sums.pearson

    def _build_in_merge(self, recipe: Recipe) -> float | None:
        """Write ``merged + A_t (u - theta_t)`` into the model range by range, on this
        worker's device: the offspring ``u`` never exists whole, the merged vector stays the
        shared reference, scratch is a few ranges. Returns the offspring's kinship to its
        parent (Pearson of deltas from the base) when there is a base."""
        if self.merged is None or self.merger is None:
            raise RuntimeError("merger mode needs the merged model and merger in the context")
        pop, t, dev = self.population, recipe.target, self.device
        sums = KinshipSums() if self.base is not None else None
        for start, stop in self.merger.ranges(default_chunk(dev)):
            u = build_range(recipe, pop, start, stop, dev)
            parent = pop[t][start:stop].to(dev).float()
            if sums is not None:
                b = self.base[start:stop].to(dev).float()
                sums.update(u - b, parent - b)
            u.sub_(parent)
            trial = self.merged[start:stop].to(dev, torch.float32, copy=True)
            self.merger.add_range(trial, t, u, start, stop)
            write_range(self.segments, start, trial)
        return None if sums is None else sums.pearson

    def evaluate_batch(
        self, recipes: list[dict], merged: bool, context: dict[str, Any], *population: np.ndarray
    ) -> tuple[list[dict[str, Any]], ...]:
        """Adopt ``population`` and evaluate several recipes in one round trip. Returns
        ``(results, *weights)``, one weights entry per recipe: the offspring as scored (the
        model's own weights) when its dict carries ``keep_above`` and its fitness is above
        it, so the strategy's keep needs no rebuild, else None (``results[i]["kept"]``).
        The population comes as arrays, or as refs in ``context["population"]``."""
        self.use_context(context)
        if population or "population" not in context:
            self.set_population(*population)
        results: list[dict[str, Any]] = []
        weights: list[np.ndarray | None] = []
        for d in recipes:
            above = d.get("keep_above")
            r = self.evaluate_recipe({k: v for k, v in d.items() if k != "keep_above"}, merged)
            kept = above is not None and not merged and r["fitness"] > above
            weights.append(self._copy_weights() if kept else None)
            results.append({**r, "kept": kept})
        return (results, *weights)

    def _copy_weights(self) -> np.ndarray:
        """The model's weights as a host array of their own (on a CPU the buffer is the next
        recipe's model; from a GPU ``read_flat`` already copies)."""
        flat = read_flat(self.segments)
        on_host = all(s.device.type == "cpu" for s in self.segments)
        return np.array(flat, copy=True) if on_host and len(self.segments) == 1 else flat

    def evaluate_vector(self, flat: np.ndarray, split: str = "dev") -> dict[str, Any]:
        """Score a given flat vector (an initial individual, or the merged model)."""
        t0 = time.perf_counter()
        write_flat(self.segments, from_numpy(flat))
        scores = self.scores(split)
        return {
            "scores": scores,
            "fitness": self.spec.tasks.fitness(scores),
            "eval_time_s": time.perf_counter() - t0,
            "node": self.node,
            "device": str(self.device),
        }

    def full_scores(self) -> dict[str, Any]:
        """Scores, fitness and example count on the full dev set (no racing)."""
        scores = self.scores()
        return {
            "scores": scores,
            "fitness": self.spec.tasks.fitness(scores),
            "examples": sum(len(d) for d in self.dev.values()),
            "racing_stopped": False,
        }

    def scores(self, split: str = "dev") -> dict[str, dict[str, float]]:
        data = self.dev if split == "dev" else self._split(split)
        return self.spec.tasks.evaluate(self.model, data, batch_size=self.spec.batch_size)

    def _split(self, split: str) -> dict[str, EncodedSplit]:
        data = self.spec.tasks.encode(self._tokenizer, split)
        # Data of kinds that are not tensors (lm-eval requests) stays as it is.
        return {n: s.to(self.device) if hasattr(s, "to") else s for n, s in data.items()}

    # -- population updates, run here so no extra processes start and no weights reach the driver

    def load(self, path: str, allow_pickle: bool = False) -> np.ndarray:
        """One checkpoint as a flat vector (returned into the object store)."""
        from evoray.weights.checkpoint import open_checkpoint
        from evoray.weights.flat import flatten

        with open_checkpoint(path, allow_pickle=allow_pickle or self.spec.allow_pickle) as ckpt:
            return flatten(ckpt, self.spec.layout).data

    def load_for_store(self, path: str, allow_pickle: bool = False) -> np.ndarray:
        """``load`` for a Ray call. A CPU worker reads the checkpoint tensor by tensor into its
        own model and hands out the model's memory, which Ray copies into the object store as
        the call returns: loading the population needs no second model per worker. Only valid
        until this worker's next call. Other workers load as ``load`` does (into host memory,
        not through the device)."""
        from evoray.weights.checkpoint import open_checkpoint
        from evoray.weights.flat import FlatWeights, flatten

        if len(self.segments) > 1 or self.segments[0].device.type != "cpu":
            return self.load(path, allow_pickle)
        model = FlatWeights(self.spec.layout, read_flat(self.segments))  # the model's memory
        with open_checkpoint(path, allow_pickle=allow_pickle or self.spec.allow_pickle) as ckpt:
            return flatten(ckpt, self.spec.layout, out=model).data

    def statistics(
        self,
        kind: str,
        models: Any,
        model_path: str,
        task_names: list[str] | None,
        n: int,
        cache_dir: str | None,
        member: np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Fisher or RegMean statistics of one member (``models``: the run's ``ModelPool``)
        on this worker's device, from the run's tasks' training data; CPU tensors back.
        Given the member's flat vector, its weights are written into this worker's own model
        (every member has the layout) and the statistics computed there, so the device never
        holds a second model; the next build overwrites them."""
        from evoray.execution.population import member_statistics

        def own_model() -> tuple[Any, Any]:
            write_flat(self.segments, from_numpy(member))
            return self.model, self._tokenizer

        return member_statistics(
            kind,
            models,
            model_path,
            self.spec.tasks,
            task_names,
            n,
            cache_dir,
            str(self.device),
            load=None if member is None else own_model,
        )

    def stored_statistics(self, *args: Any) -> dict[str, Any]:
        """``statistics`` left in this node's object store, one ref per tensor
        (``store_statistics``): the driver reads them tensor by tensor, never every member's
        whole statistics at once, and needs no cache directory shared with this node."""
        from evoray.execution.population import store_statistics

        return store_statistics(self.statistics(*args))

    def build(self, recipe: dict, *population: np.ndarray) -> np.ndarray:
        """An accepted offspring, rebuilt from the population it was bred from (on the host)."""
        pop = [from_numpy(a) for a in population]
        return to_numpy(build_offspring(Recipe.from_dict(recipe), pop))

    def build_for_store(self, recipe: dict, *population: np.ndarray) -> np.ndarray:
        """``build`` for a Ray call: the offspring is built into this worker's own model (on
        its device) and returned as the model's memory on a CPU worker (a host copy on a GPU),
        which Ray copies into the object store as the call returns, so a CPU worker needs no
        second model for it. The array is only valid until this worker's next call."""
        pop = [from_numpy(a) for a in population]
        build_into(Recipe.from_dict(recipe), pop, self.segments)
        return read_flat(self.segments)

    def merge(self, merger: Any, *population: np.ndarray) -> np.ndarray:
        """The merged model of a population, as a float32 flat vector."""
        return merger.merge([from_numpy(a) for a in population]).float().numpy()

    def update_merged(
        self, merger: Any, merged: np.ndarray, recipes: list[dict], *population: np.ndarray
    ) -> np.ndarray:
        """``merged + sum_i A_i (u_i - theta_i)`` over accepted recipes (linear per individual),
        range by range: only the result is model-sized."""
        pop = [from_numpy(a) for a in population]
        out = from_numpy(merged).to(torch.float32, copy=True)
        cpu = torch.device("cpu")
        for start, stop in merger.ranges(default_chunk(cpu)):
            for d in recipes:
                r = Recipe.from_dict(d)
                u = build_range(r, pop, start, stop, cpu)
                u.sub_(pop[r.target][start:stop].float())
                merger.add_range(out[start:stop], r.target, u, start, stop)
        return out.numpy()

    # -- merges of flat vectors (kinship-guided greedy merging, recipe search) -----------------

    def merge_vector(
        self,
        method: str,
        model_settings: list[dict],
        settings: dict,
        base: np.ndarray | None,
        *members: np.ndarray,
    ) -> np.ndarray:
        """Merge flat vectors with a registered method; the result goes to the object store."""
        self._merge_into_buffer(method, model_settings, settings, base, members)
        return read_flat(self.segments)

    def merge_and_evaluate(
        self,
        method: str,
        model_settings: list[dict],
        settings: dict,
        base: np.ndarray | None,
        *members: np.ndarray,
    ) -> dict[str, Any]:
        """Merge into this worker's model and score it on dev (the merge is not kept)."""
        t0 = time.perf_counter()
        self._merge_into_buffer(method, model_settings, settings, base, members)
        t1 = time.perf_counter()
        scores = self.scores()
        return {
            "scores": scores,
            "fitness": self.spec.tasks.fitness(scores),
            "build_time_s": t1 - t0,
            "eval_time_s": time.perf_counter() - t1,
            "node": self.node,
            "device": str(self.device),
        }

    def _merge_into_buffer(self, method, model_settings, settings, base, members) -> None:
        """Merge into this worker's model tensor by tensor on its device: each merged tensor
        goes straight into its segment, so a merge never holds a second model (host or device)."""
        from evoray.merge.walker import merge_slots
        from evoray.weights.layers import num_layers

        layout = self.spec.layout
        for s, merged in merge_slots(
            method,
            layout,
            [from_numpy(m) for m in members],
            None if base is None else from_numpy(base),
            model_settings,
            settings,
            n_layers=num_layers(self.model.config.to_dict(), layout.names),
            device=self.device,
        ):
            write_range(self.segments, s.offset, merged.reshape(-1))

    def kinship(self, base: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict[str, float]:
        """Kinship (Pearson, cosine, Euclidean) of two vectors' deltas from the base."""
        return kinship_flat(from_numpy(a), from_numpy(b), from_numpy(base)).as_dict()

    def ping(self) -> dict[str, Any]:
        return {"node": self.node, "pid": self.pid, "device": str(self.device)}


def _node_name() -> str:
    """Host name plus the Ray node id's prefix: several nodes may share one host."""
    import ray

    host = socket.gethostname()
    if ray.is_initialized():
        return f"{host}/{ray.get_runtime_context().get_node_id()[:8]}"
    return host
