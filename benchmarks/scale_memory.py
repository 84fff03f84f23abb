"""Memory of an Evolver population against the memory model, and offspring build speed.

    python benchmarks/scale_memory.py            # ~1B-parameter Llama-shaped members
    python benchmarks/scale_memory.py --quick    # ~25M, a minute
    python benchmarks/scale_memory.py --device cuda --gpus-per-worker 0.25 --workers 4

Makes 4 members of a Llama-shaped causal LM with random bf16 weights (no download), a `text`
dev task of a few sentences, and runs one Evolver generation on 2 workers, individual selection
and with the Fisher merger, each in a fresh Ray. While it runs, the driver samples every
worker's private memory (``RssAnon``: what the process holds itself, apart from the object
store's shared pages it maps) and Ray's object-store use. Printed side by side with the
formula of ``evoray.execution.memory`` (the README's "Memory" section):

- worker: peak private memory above an idle worker process (same imports, no model) /
  (model + build scratch). Target <= 1.2.
- node: object-store peak + the workers' peaks above idle / (store + keeps + workers x
  (model + scratch)). Target <= 1.2.
- build: copying the model's bytes on the worker's device / building one offspring into the
  worker's model there, as a ratio of times. Target >= 0.3. Shown for the default build (the
  fused kernel on a CPU, ``evoray.strategies.de_kernel``) and the eager torch build beside it.
- On CUDA also ``torch.cuda.max_memory_allocated`` per worker against model + scratch.

A mode the memory model says will not fit this node's memory is skipped, saying why (here,
24 GiB: the 1B population runs individual selection, not Fisher).

The Fisher statistics are synthetic (random positive per tensor, put through the real
``FisherMerger``): what is measured is the search holding them, not their computation, whose
backward passes on 4 x 1B members would take most of an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import tempfile
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import ray
import torch

from evoray.execution.memory import GIB, MemoryModel, rss_anon
from evoray.execution.pool import WorkerPool
from evoray.execution.population import RayPopulation, RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.pool import ModelPool
from evoray.strategies import de_kernel
from evoray.strategies.base import Problem
from evoray.strategies.de import Recipe, build_offspring
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.tasks.pool import make_task_pool
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.layout import Layout

SIZES = {  # hidden, intermediate, layers, heads, kv heads, vocab
    "1b": (2048, 5632, 20, 16, 4, 32000),
    "half": (1536, 4096, 16, 12, 4, 32000),
    "quick": (512, 1408, 6, 8, 2, 8000),
}
TEXTS = [
    "the cat sat on the mat and looked at the door",
    "a river runs through the old town",
    "numbers add up when you count them twice",
    "the red bird sings in the morning",
]


def llama_shapes(size: str):
    """The config of ``size`` and its tensors' shapes (a meta-device model: no memory)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, inter, layers, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=vocab,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        torch_dtype="bfloat16",
        architectures=["LlamaForCausalLM"],
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    return config, shapes


def make_members(root: Path, size: str, n: int = 4) -> list[str]:
    """``n`` Llama-shaped bf16 checkpoints with independent random weights, one tokenizer."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    config, shapes = llama_shapes(size)
    words = sorted({w for t in TEXTS for w in t.split()})
    vocab_map = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "<s>", "</s>", *words])}
    backend = Tokenizer(models.WordLevel(vocab=vocab_map, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        bos_token="<s>",
        eos_token="</s>",
    )
    out = []
    for i in range(n):
        path = root / f"member{i}"
        path.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        state = {
            k: (
                torch.ones(s) if k.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
            ).to(torch.bfloat16)
            for k, s in shapes.items()
        }
        save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
        del state
        config.save_pretrained(str(path))
        tok.save_pretrained(str(path))
        out.append(str(path))
    return out


class _Shape:
    """A tensor's name, shape and dtype, what ``Layout.from_infos`` reads."""

    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape, self.dtype = name, shape, torch.bfloat16


class BenchWorker(OffspringWorker):
    """An offspring worker that also reports its pid and times a build against a copy."""

    def time_build(self, recipe: dict, reps: int = 3) -> dict[str, float]:
        """Seconds per build into the model (the default build: fused on a CPU), per eager
        torch build (what a CPU ran before the fused kernel; what a GPU runs) and per copy of
        the model's bytes, on this worker's device."""
        r = Recipe.from_dict(recipe)
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def timed(fn, n: int) -> float:
            fn()  # warm
            sync()
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            sync()
            return (time.perf_counter() - t0) / n

        build = timed(lambda: build_offspring(r, self.population, self.buffer), reps)
        old = de_kernel.set_enabled(False)
        try:
            eager = timed(lambda: build_offspring(r, self.population, self.buffer), 1)
        finally:
            de_kernel.set_enabled(old)
        src = self.buffer.clone()
        copy = timed(lambda: self.buffer.copy_(src), reps)
        return {"build_s": build, "eager_build_s": eager, "copy_s": copy}

    def gpu_peak(self) -> int:
        return torch.cuda.max_memory_allocated() if self.device.type == "cuda" else 0


@ray.remote
class Idle:
    """A worker process with the same imports and no model: the runtime's own memory."""

    def __init__(self) -> None:
        import transformers  # noqa: F401
        from transformers import LlamaForCausalLM  # noqa: F401

        import evoray.execution.worker  # noqa: F401

    def anon(self) -> int:
        return rss_anon()


def _trim() -> None:
    """Give the members' generation heap back to the OS (the driver is not what's measured)."""
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)


def plasma_bytes() -> int:
    """Bytes in this node's object store now (Ray's own memory summary)."""
    from ray._private.internal_api import memory_summary

    text = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    m = re.search(r"Plasma memory usage (\d+) MiB", text)
    return int(m.group(1)) * 1024 * 1024 if m else 0


class Sampler:
    """Peaks of the workers' private memory and the object store's use, sampled by a thread."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.anon = dict.fromkeys(pids, 0)
        self.store = 0
        self._stop = threading.Event()

    def __enter__(self) -> Sampler:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            for p in self.pids:
                with contextlib.suppress(OSError):  # a worker restarting
                    self.anon[p] = max(self.anon[p], rss_anon(p))
            if tick % 20 == 0:  # an RPC: every ~0.1 s
                self.store = max(self.store, plasma_bytes())
            tick += 1
            self._stop.wait(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.store = max(self.store, plasma_bytes())


class _LazyFisher(Mapping):
    """One member's synthetic Fisher, drawn per tensor when the merger asks for it (seeded by
    member and tensor), so the driver never holds four models' worth of statistics."""

    def __init__(self, layout: Layout, i: int) -> None:
        self.shapes = {s.name: s.shape for s in layout.slots}
        self.i = i

    def __getitem__(self, name: str) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.i * 100_003 + sorted(self.shapes).index(name))
        return torch.rand(self.shapes[name], generator=g)

    def __iter__(self):
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def lazy_fishers(layout: Layout, n: int) -> list[_LazyFisher]:
    return [_LazyFisher(layout, i) for i in range(n)]


def synthetic_fisher(pop: RayPopulation, kind: str, params: dict) -> None:
    """``make_merger`` with random positive Fisher values per tensor (see the docstring)."""
    from evoray.population.mergers import make_merger

    layout, n = pop.layout, len(pop.inputs.members)
    merger = make_merger(kind, layout, n, fishers=lazy_fishers(layout, n), **params)
    pop.merger_ref = ray.put(merger)


def run_mode(members, tasks, layout, args, merger: str) -> dict:
    model = MemoryModel.for_run(layout, len(members), merger=merger, device=args.device)
    store = int(model.store_peak_bytes * 1.1) + GIB  # what the formula says, so nothing spills
    ray.init(
        num_cpus=max(2, args.workers),
        object_store_memory=store,
        include_dashboard=False,
        log_to_driver=False,
    )
    try:
        idle = Idle.remote()
        idle_anon = ray.get(idle.anon.remote())
        ray.kill(idle)
        device = args.device
        spec = WorkerSpec(
            members[0], layout, tasks, device=device, torch_threads=1, metric="loglik", batch_size=4
        )
        pool = WorkerPool(
            spec,
            args.workers,
            num_cpus=1,
            num_gpus=args.gpus_per_worker if device == "cuda" else 0,
            worker_cls=BenchWorker,
        )
        pids = [p["pid"] for p in ray.get([a.ping.remote() for a in pool.actors])]
        RayPopulation.make_merger = synthetic_fisher  # see the module docstring
        run = SearchRun(
            Evolver(
                EvolverSettings(generations=1, merger=merger, metric="loglik"),
                Problem(len(members), has_base=False),
            ),
            RunInputs(ModelPool(members), tasks=tasks),
            pool,
        )
        with Sampler(pids) as s:
            t0 = time.perf_counter()
            run.start()
            t1 = time.perf_counter()
            run.step()
            wall = time.perf_counter() - t1
            start = t1 - t0
        recipe = Recipe(0, (1,), 0.5, 0.5, 7).to_dict()
        times = ray.get(pool.actors[0].time_build.remote(recipe))
        gpu = ray.get([a.gpu_peak.remote() for a in pool.actors])
        pool.shutdown()
    finally:
        ray.shutdown()
    worker_peak = max(s.anon.values()) - idle_anon
    node = s.store + sum(a - idle_anon for a in s.anon.values())
    return {
        "merger": merger,
        "wall_s": wall,
        "start_s": start,
        "offspring_per_s": len(members) / wall,
        "idle_worker_gib": idle_anon / GIB,
        "worker_peak_gib": worker_peak / GIB,
        "worker_formula_gib": model.worker_bytes(args.workers) / GIB,
        "worker_ratio": worker_peak / model.worker_bytes(args.workers) if device == "cpu" else None,
        "store_peak_gib": s.store / GIB,
        "store_formula_gib": model.store_peak_bytes / GIB,
        "node_ratio": node / model.node_bytes(args.workers) if device == "cpu" else None,
        "gpu_peak_gib": max(gpu) / GIB,
        "gpu_ratio": max(gpu) / model.device_bytes if device == "cuda" else None,
        "build_vs_copy": times["copy_s"] / times["build_s"],
        "eager_build_vs_copy": times["copy_s"] / times["eager_build_s"],
        "build_s": times["build_s"],
    }


def run_in_process(members, tasks, layout, args, merger: str) -> dict:
    """The same workers without Ray (a GPU machine without it: ``--no-ray``): ``--workers``
    worker objects in this process on one device, as ``gpus_per_worker: 1/W`` packs them;
    one generation of recipes dealt round-robin. Measures the device's peak per worker."""
    from evoray.population.mergers import make_merger
    from evoray.strategies.de import sample_recipes
    from evoray.weights.flat import from_numpy

    device = args.device
    spec = WorkerSpec(
        members[0], layout, tasks, device=device, torch_threads=1, metric="loglik", batch_size=4
    )
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    workers = [BenchWorker(spec) for _ in range(args.workers)]
    pop = [workers[0].load(m) for m in members]
    for w in workers:
        w.set_population(*pop)
    if merger != "none":
        g = torch.Generator().manual_seed(0)
        stats = [{s.name: torch.rand(s.shape, generator=g) for s in layout.slots} for _ in members]
        m = make_merger(merger, layout, len(members), fishers=stats)
        del stats
        merged = m.merge([from_numpy(a) for a in pop])
        for w in workers:
            w.merger, w.merged = m, merged
    recipes = sample_recipes(len(members), F=0.5, CR=0.5, mutation="evolver", seed=0, generation=0)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    results = [
        workers[i % len(workers)].evaluate_recipe(r, merged=merger != "none")
        for i, r in enumerate(recipes)
    ]
    sync()
    wall = time.perf_counter() - t0
    times = workers[0].time_build(Recipe(0, (1,), 0.5, 0.5, 7).to_dict())
    peak = torch.cuda.max_memory_allocated() / len(workers) if device == "cuda" else 0
    model = MemoryModel.for_run(layout, len(members), merger=merger, device=device)
    return {
        "merger": merger,
        "wall_s": wall,
        "start_s": 0.0,
        "offspring_per_s": len(recipes) / wall,
        "build_s_per_offspring": sum(r["build_time_s"] for r in results) / len(results),
        "idle_worker_gib": 0.0,
        "worker_peak_gib": peak / GIB,
        "worker_formula_gib": model.device_bytes / GIB,
        "worker_ratio": None,
        "store_peak_gib": 0.0,
        "store_formula_gib": model.store_peak_bytes / GIB,
        "node_ratio": None,
        "gpu_peak_gib": peak / GIB,
        "gpu_ratio": peak / model.device_bytes if device == "cuda" else None,
        "build_vs_copy": times["copy_s"] / times["build_s"],
        "eager_build_vs_copy": times["copy_s"] / times["eager_build_s"],
        "build_s": times["build_s"],
    }


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="~25M parameters instead of ~1B")
    ap.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="1b (default), half (~0.5B: fits a 24 GiB machine), quick",
    )
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--gpus-per-worker", type=float, default=0.25)
    ap.add_argument("--modes", default="none,fisher", help="Evolver mergers to run")
    ap.add_argument("--dir", default=None, help="where to write the members (default: a temp dir)")
    ap.add_argument(
        "--no-ray", action="store_true", help="workers in this process (a GPU machine without Ray)"
    )
    args = ap.parse_args()
    size = args.size or ("quick" if args.quick else "1b")
    _, shapes = llama_shapes(size)
    layout = Layout.from_infos(
        [_Shape(k, tuple(v)) for k, v in shapes.items()], source=f"--size {size}"
    )
    have = _available_bytes()
    modes, skipped = [], {}
    for m in args.modes.split(","):
        # the table's node total, plus the runtimes and the driver
        need = MemoryModel.for_run(layout, 4, merger=m).node_bytes(args.workers)
        need += (args.workers + 1) * GIB // 2
        if args.device == "cpu" and have and need > have:
            skipped[m] = (
                f"needs {need / GIB:.1f} GiB by the memory model, {have / GIB:.1f} available"
            )
            print(f"--size {size}, merger={m}: skipped, {skipped[m]} (try --size half or --quick)")
        else:
            modes.append(m)
    if not modes:
        raise SystemExit(f"--size {size}: no mode fits this node; use --size half or --quick")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        members = make_members(root, size)
        _trim()
        data = root / "dev.jsonl"
        data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
        tasks = make_task_pool([{"name": "text", "kind": "text", "data": {"dev": str(data)}}])
        with open_checkpoint(members[0]) as c:
            layout = Layout.for_model(c)
        print(
            f"{len(members)} members of {layout.numel / 1e9:.3f}B parameters "
            f"({layout.nbytes / GIB:.2f} GiB bf16 each), made in "
            f"{time.perf_counter() - t0:.0f} s",
            flush=True,
        )
        run = run_in_process if args.no_ray else run_mode
        results = [run(members, tasks, layout, args, m) for m in modes]
    for r in results:
        print(
            f"merger={r['merger']:7s} {r['wall_s']:6.1f} s/gen  worker peak "
            f"{r['worker_peak_gib']:.2f} GiB vs formula {r['worker_formula_gib']:.2f}"
            f" (idle process {r['idle_worker_gib']:.2f})  store peak {r['store_peak_gib']:.2f}"
            f" GiB vs {r['store_formula_gib']:.2f}  node ratio {r['node_ratio']}  gpu peak "
            f"{r['gpu_peak_gib']:.2f} GiB  copy/build {r['build_vs_copy']:.3f} (eager build "
            f"{r['eager_build_vs_copy']:.3f})"
        )
    figures = {"parameters": layout.numel, "device": args.device, "workers": args.workers}
    figures.update({f"{m}_skipped": why for m, why in skipped.items()})
    for r in results:
        m = r["merger"]
        keys = ("worker_ratio", "node_ratio", "gpu_ratio", "build_vs_copy", "eager_build_vs_copy")
        for key in (*keys, "offspring_per_s"):
            if r[key] is not None:
                figures[f"{m}_{key}"] = round(r[key], 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
