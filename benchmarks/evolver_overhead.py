"""Where an Evolver offspring's time goes, and evoray against a reference-style loop.

    python benchmarks/evolver_overhead.py [--generations 5] [--workers 2]

On the embedded zoo (the demo's size), runs Evolver (individual selection) on a Ray worker pool
and splits the workers' time into evaluation forward passes vs everything else (recipe
dispatch, building the offspring in place, Ray bookkeeping), as a ratio. In the same run, does
the same work with a sequential single-process loop written like the reference code (deep
copies of state dicts, one ``load_state_dict`` per offspring) and prints both throughputs.
"""

from __future__ import annotations

import argparse
import copy
import time

import ray
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
from transformers.utils import logging as hf_logging

from evoray.execution.pool import WorkerPool
from evoray.execution.population import RunInputs
from evoray.execution.search_run import SearchRun
from evoray.execution.worker import WorkerSpec
from evoray.models.pool import ModelPool
from evoray.models.zoo import build_zoo
from evoray.strategies.base import Problem
from evoray.strategies.de import sample_recipes
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.tasks.evaluation import classification_scores
from evoray.tasks.pool import ZooTasks
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.layout import Layout


def evoray_run(zoo, generations: int, workers: int) -> dict:
    members = tuple(str(p) for p in zoo.experts.values())
    with open_checkpoint(members[0]) as c:
        layout = Layout.from_checkpoint(c)
    tasks = ZooTasks(seed=zoo.spec.seed, n_domains=zoo.spec.n_domains, n_ood=zoo.spec.n_ood)
    pool = WorkerPool(WorkerSpec(members[0], layout, tasks, torch_threads=1), workers)
    run = SearchRun(
        Evolver(EvolverSettings(generations=generations), Problem(len(members), has_base=False)),
        RunInputs(ModelPool(members), tasks=tasks),  # no base: kinship logging off, as in the ref
        pool,
    )
    run.start()
    evals = builds = 0.0
    n = 0
    original = pool.evaluate_recipes

    def timed(recipes, population, **kwargs):
        nonlocal evals, builds, n
        results = original(recipes, population, **kwargs)
        evals += sum(r["eval_time_s"] for r in results)
        builds += sum(r["build_time_s"] for r in results)
        n += len(results)
        return results

    pool.evaluate_recipes = timed
    t0 = time.perf_counter()
    for _ in range(generations):
        run.step()
    wall = time.perf_counter() - t0
    pool.shutdown()
    busy = wall * workers
    return {"wall": wall, "n": n, "eval": evals, "build": builds, "busy": busy}


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
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    zoo = build_zoo()
    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False)
    ours = evoray_run(zoo, args.generations, args.workers)
    ref = reference_loop(zoo, args.generations)
    overhead = 1 - ours["eval"] / ours["busy"]
    print(
        f"zoo: {len(zoo.experts)} experts, hidden {zoo.spec.hidden_size}; "
        f"{args.generations} generations, {args.workers} workers, 1 torch thread each"
    )
    print(
        f"evoray: {ours['n']} offspring in {ours['wall']:.2f} s ({ours['n'] / ours['wall']:.1f}/s)"
    )
    print(
        f"  per offspring: eval {1e3 * ours['eval'] / ours['n']:.1f} ms, "
        f"build {1e3 * ours['build'] / ours['n']:.1f} ms, "
        f"worker time not spent evaluating {1e3 * (ours['busy'] - ours['eval']) / ours['n']:.1f} ms"
    )
    print(
        f"  overhead ratio (worker time not in eval / worker time): {overhead:.3f} (target <= 0.10)"
    )
    print(
        f"reference loop: {ref['n']} offspring in {ref['wall']:.2f} s "
        f"({ref['n'] / ref['wall']:.1f}/s), eval share {ref['eval'] / ref['wall']:.3f}"
    )
    speedup = (ours["n"] / ours["wall"]) / (ref["n"] / ref["wall"])
    print(f"throughput ratio evoray / reference: {speedup:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
