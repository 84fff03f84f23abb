"""Where an Evolver offspring's time goes, and evoray against a reference-style loop.

    python benchmarks/evolver_overhead.py [--generations 5] [--workers 2] [--repeats 2]

On the embedded zoo (the demo's size), runs Evolver (individual selection) on one Ray worker
pool in three dealings, interleaved over ``--repeats``, and splits the workers' wall-clock
capacity (run wall time x workers, generations only: loading and the initial scores are not
counted) into evaluation forward passes and everything else, as a ratio:

- ``before``: recipes round-robin, one call per worker; an accepted offspring is rebuilt by a
  ``build`` call that the next generation waits for (evoray before the ``keep_above`` hint);
- ``static``: the same dealing; a worker returns an offspring's weights with its score when it
  beats its parent, so keeping it needs no rebuild;
- ``dynamic``: as ``static``, one recipe per call, each to whichever worker frees first.

"Everything else" is counted from the workers' side: builds inside the evaluation calls, the
rest of those calls (adopting the population, copying kept weights), rebuild calls, and idle
time (waiting at the generation barrier for the slower worker, dispatch latency, the driver's
own work). The clock stops when the last generation's population exists. The ratio is also
given without the first generation (warm-up). In the same run, does the same work with a
sequential single-process loop written like the reference code (deep copies of state dicts,
one ``load_state_dict`` per offspring) and prints both throughputs. Timings on a shared
machine are noisy: compare the dealings of one run, not runs.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from itertools import pairwise

import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from evoray.execution.pool import WorkerPool
from evoray.execution.population import RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.pool import ModelPool
from evoray.models.zoo import build_zoo
from evoray.strategies.base import Problem
from evoray.strategies.de import sample_recipes
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.tasks.evaluation import classification_scores
from evoray.tasks.pool import ZooTasks
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.layout import Layout

IDLE = ("idle_start", "idle_gaps", "idle_barrier", "idle_driver")
DEALINGS = {"before": ("static", False), "static": ("static", True), "dynamic": ("dynamic", True)}


class TimedWorker(OffspringWorker):
    """Records when each evaluation or rebuild call ran (wall clock: one host, comparable
    across processes), and its scored eval and build time."""

    def __init__(self, spec: WorkerSpec) -> None:
        super().__init__(spec)
        self.calls: list[tuple[str, float, float, float, float]] = []

    def evaluate_batch(self, recipes, merged, context, *population):
        t0 = time.time()
        out = super().evaluate_batch(recipes, merged, context, *population)
        ev = sum(r["eval_time_s"] for r in out[0])
        bd = sum(r["build_time_s"] for r in out[0])
        self.calls.append(("evaluate", t0, time.time(), ev, bd))
        return out

    def build(self, recipe, *population):
        t0 = time.time()
        out = super().build(recipe, *population)
        self.calls.append(("rebuild", t0, time.time(), 0.0, 0.0))
        return out

    def take_calls(self) -> list[tuple[str, float, float, float, float]]:
        out, self.calls = self.calls, []
        return out


def evoray_run(pool: WorkerPool, inputs: RunInputs, generations: int, dealing: str) -> dict:
    pool.dealing, hint = DEALINGS[dealing]
    problem = Problem(len(inputs.members), has_base=False)
    run = SearchRun(Evolver(EvolverSettings(generations=generations), problem), inputs, pool)
    run.start()
    ray.get([a.take_calls.remote() for a in pool.actors])  # start-up calls: not counted
    original = pool.evaluate_recipes

    def dealt(recipes, population, **kwargs):
        if not hint:
            kwargs["keep_above"] = None  # keeps rebuild the offspring, as before the hint
        return original(recipes, population, **kwargs)

    pool.evaluate_recipes = dealt
    marks = []
    for _ in range(generations):
        marks.append(time.time())
        run.step()
    refs = [r for r in run.refs if r is not None]
    ray.wait(refs, num_returns=len(refs), fetch_local=False)  # the last keeps are done
    end = time.time()
    del pool.evaluate_recipes
    logs = ray.get([a.take_calls.remote() for a in pool.actors])
    calls = [c for log in logs for c in log]
    out = {"n": generations * len(inputs.members), "wall": end - marks[0]}
    for name, since in (("all", marks[0]), ("after_first", marks[min(1, generations - 1)])):
        cap = (end - since) * len(pool.actors)
        mine = [c for c in calls if c[1] >= since]
        ev = sum(c[3] for c in mine)
        bd = sum(c[4] for c in mine)
        in_eval_calls = sum(c[2] - c[1] for c in mine if c[0] == "evaluate")
        rebuilds = sum(c[2] - c[1] for c in mine if c[0] == "rebuild")
        out[name] = {
            "overhead": 1 - ev / cap,
            "eval": ev / cap,
            "build": bd / cap,
            "call_rest": (in_eval_calls - ev - bd) / cap,
            "rebuild": rebuilds / cap,
            "idle": (cap - in_eval_calls - rebuilds) / cap,
            "busy_not_eval": 1 - ev / (in_eval_calls + rebuilds),
            "eval_s": ev,
            **idle_parts(logs, marks, end, since, cap),
        }
    return out


def idle_parts(logs, marks, end, since, cap) -> dict[str, float]:
    """Idle time per generation and worker, as shares of ``cap``: before its first evaluation
    call (dispatch, waiting for rebuilds), between its evaluation calls, after its last one
    until the slowest worker's (the barrier), and after that until the generation ends (the
    driver's turn). Time inside any call (rebuilds too) is not idle."""
    parts = dict.fromkeys(IDLE, 0.0)
    for a, b in pairwise([*marks, end]):
        if a < since:
            continue
        evals = [[c for c in log if c[0] == "evaluate" and a <= c[1] < b] for log in logs]
        last = max(c[2] for cs in evals for c in cs)
        for log, cs in zip(logs, evals, strict=True):

            def idle(lo: float, hi: float, log=log) -> float:
                return (hi - lo) - sum(max(0.0, min(c[2], hi) - max(c[1], lo)) for c in log)

            first = min((c[1] for c in cs), default=last)
            own_last = max((c[2] for c in cs), default=last)
            parts["idle_start"] += idle(a, first)
            parts["idle_gaps"] += idle(first, own_last)
            parts["idle_barrier"] += idle(own_last, last)
            parts["idle_driver"] += idle(last, b)
    return {k: v / cap for k, v in parts.items()}


def reference_loop(zoo, generations: int) -> dict:
    """Sequential, reference-style: state-dict deep copies and load_state_dict per offspring."""
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(zoo.base)
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    dev = tasks.encode(tok, "dev")
    model = AutoModelForSequenceClassification.from_pretrained(zoo.base).eval()
    population = [
        AutoModelForSequenceClassification.from_pretrained(p).state_dict()
        for p in zoo.experts.values()
    ]

    def fitness(sd) -> float:
        model.load_state_dict(sd)
        scores = [classification_scores(model, s)["accuracy"] for s in dev.values()]
        return sum(scores) / len(scores)

    fit = [fitness(sd) for sd in population]
    evals = 0.0
    n = 0
    t0 = time.perf_counter()
    for g in range(generations):
        recipes = sample_recipes(
            len(population), F=0.5, CR=0.5, mutation="evolver", seed=0, generation=g
        )
        new = list(population)
        for r in recipes:
            parent, ref = population[r.target], population[r.refs[0]]
            child = copy.deepcopy(parent)
            gen = torch.Generator().manual_seed(r.seed)
            for k, v in child.items():
                if v.is_floating_point():
                    mutant = parent[k] + r.F * (ref[k] - parent[k])
                    mask = torch.rand(v.shape, generator=gen) < r.CR
                    child[k] = torch.where(mask, mutant, parent[k])
            te = time.perf_counter()
            f = fitness(child)
            evals += time.perf_counter() - te
            n += 1
            if f > fit[r.target]:
                new[r.target], fit[r.target] = child, f
        population = new
    wall = time.perf_counter() - t0
    return {"wall": wall, "n": n, "eval": evals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each dealing")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    zoo = build_zoo()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    members = tuple(str(p) for p in zoo.experts.values())
    with open_checkpoint(members[0]) as c:
        layout = Layout.from_checkpoint(c)
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    inputs = RunInputs(ModelPool(members), tasks=tasks)  # no base: kinship off, as in the ref
    spec = WorkerSpec(members[0], layout, tasks, torch_threads=1)
    pool = WorkerPool(spec, args.workers, worker_cls=TimedWorker)
    evoray_run(pool, inputs, 1, "before")  # warm the worker processes for every dealing alike
    runs: dict[str, list[dict]] = {d: [] for d in DEALINGS}
    for _ in range(args.repeats):
        for d in DEALINGS:
            runs[d].append(evoray_run(pool, inputs, args.generations, d))
    pool.shutdown()
    ref = reference_loop(zoo, args.generations)
    print(
        f"zoo: {len(zoo.experts)} experts, hidden {zoo.spec.hidden_size}; "
        f"{args.generations} generations, {args.workers} workers, 1 torch thread each, "
        f"{args.repeats} runs per dealing (mean)"
    )
    print("shares of worker capacity (wall x workers), mean of the runs:")

    def mean(d: str, part: str, key: str) -> float:
        return statistics.fmean(r[part][key] for r in runs[d])

    figures = {}
    for d in DEALINGS:
        f = {k: mean(d, "all", k) for k in ("eval", "build", "call_rest", "rebuild", *IDLE)}
        f["overhead"] = mean(d, "all", "overhead")
        f["after_first"] = mean(d, "after_first", "overhead")
        f["busy_not_eval"] = mean(d, "all", "busy_not_eval")
        f["throughput"] = statistics.fmean(r["n"] / r["wall"] for r in runs[d])
        f["eval_ms"] = 1e3 * statistics.fmean(r["all"]["eval_s"] / r["n"] for r in runs[d])
        figures[d] = f
        each = ", ".join(f"{r['all']['overhead']:.3f}" for r in runs[d])
        print(
            f"  {d:8s} overhead {f['overhead']:.3f} (runs {each}; without generation 1"
            f" {f['after_first']:.3f}); busy workers' time not in eval {f['busy_not_eval']:.3f};"
            f" {f['throughput']:.1f} offspring/s, eval {f['eval_ms']:.0f} ms each"
        )
        print(
            f"           eval {f['eval']:.3f}, build {f['build']:.3f}, rest of the calls"
            f" {f['call_rest']:.3f}, rebuild calls {f['rebuild']:.3f}; idle: before the first"
            f" call {f['idle_start']:.3f}, between calls {f['idle_gaps']:.3f}, barrier"
            f" {f['idle_barrier']:.3f}, driver {f['idle_driver']:.3f}"
        )
    print("target: overhead <= 0.10")
    ref_rate = ref["n"] / ref["wall"]
    print(
        f"reference loop: {ref['n']} offspring in {ref['wall']:.2f} s "
        f"({ref_rate:.1f}/s), eval share {ref['eval'] / ref['wall']:.3f}"
    )
    speedup = figures["static"]["throughput"] / ref_rate
    print(f"throughput ratio evoray (static) / reference: {speedup:.2f}")
    ray.shutdown()
    print(
        json.dumps(
            {
                "generations": args.generations,
                "workers": args.workers,
                **{f"overhead_{d}": round(f["overhead"], 4) for d, f in figures.items()},
                **{
                    f"overhead_{d}_after_first": round(f["after_first"], 4)
                    for d, f in figures.items()
                },
                "throughput_ratio_vs_reference": round(speedup, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
