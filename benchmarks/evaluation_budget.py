"""Racing's evaluation budget: dev examples scored, and final fitness, with and without racing.

    python benchmarks/evaluation_budget.py [--zoo classifier,causal_lm] [--generations 15]
        [--seeds 3] [--settings 0.95:0.125,0.8:0.125] [--dev-size ROWS_PER_DOMAIN]
    python benchmarks/evaluation_budget.py --quick

On each zoo (built once, cached under $EVORAY_HOME): the classifier zoo (accuracy, 4 domains;
``--dev-size``: a larger generated dev set) and the causal-LM zoo (exact match, 4 skills),
runs Evolver in individual mode in one process (one ``OffspringWorker``, no Ray): once per seed
scoring every offspring on the full dev set, then with racing at each ``CONFIDENCE:FIRST``
setting and the same seeds. Prints a table per zoo (dev examples, counting the initial
population's scoring in both; offspring stopped; "wrong": stopped ones the full dev set would
have accepted, checked off the count; final dev and test fitness gaps) and one JSON line. Also
printed: the first slice's margin (how far below a target of 0.5 a candidate must be for
racing's test to stop it there), how many offspring of the runs without racing were not better
than their parent and by how much, and the ceiling: the examples saved had every one of those
stopped at its first slice (no rule that scores survivors in full does better).

Measured (2 CPU cores, 15 generations, 3 seeds; the README's table): causal-LM zoo 2.71x at the
defaults (0.95, 0.125), 3.37x at confidence 0.8, no wrong stops, gaps 0; classifier zoo 1.00x /
1.10x (its not-better offspring fall short by 0.014 median, inside the dev set's noise).
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.lm_zoo import build_lm_zoo
from evoray.models.zoo import build_zoo
from evoray.strategies.base import Answers, Member, Offspring, Problem, Score, drive
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.strategies.racing import TaskSeen, estimate, rejects, round_fractions, round_stops
from evoray.tasks.pool import ZooTasks, make_task_pool
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.flat import flatten
from evoray.weights.layout import Layout


def run(worker: OffspringWorker, flats: list[np.ndarray], settings: EvolverSettings) -> dict:
    pop = [f.copy() for f in flats]
    examples = stopped = wrong = 0
    gaps: list[float] = []  # per offspring: its parent's dev fitness minus its own (full dev)

    def execute(batch) -> Answers:
        nonlocal examples, stopped, wrong
        scores = []
        worker.set_population(*pop)
        for b in batch.evaluate:
            if isinstance(b, Member):
                r = worker.evaluate_vector(pop[b.slot])
                r["examples"] = sum(len(d) for d in worker.dev.values())
            elif isinstance(b, Offspring):
                d = b.recipe.to_dict()
                r = worker.evaluate_recipe(d if b.race is None else {**d, "race": b.race.to_dict()})
                if b.race is None:
                    gaps.append(ev.state.fitness[b.recipe.target] - r["fitness"])
                elif r["racing_stopped"]:  # would the full dev set have accepted it? (uncounted)
                    wrong += worker.full_scores()["fitness"] > b.race.must_beat
            else:
                raise TypeError(f"not benchmarked: {b!r}")
            examples += r["examples"]
            stopped += bool(r.get("racing_stopped"))
            scores.append(Score(r["fitness"], r["scores"], examples=r["examples"]))
        for k in batch.keep:
            pop[k.slot] = worker.build(k.build.recipe.to_dict(), *pop)
        return Answers(scores=scores)

    ev = Evolver(settings, Problem(len(flats), has_base=False))
    t0 = time.perf_counter()
    drive(ev.setup(), execute)
    while not ev.done:
        drive(ev.generation(), execute)
    best = ev.state.best_individual
    test = worker.evaluate_vector(pop[best], split="test")["fitness"]
    return {
        "dev_examples": examples,
        "racing_stopped": stopped,
        "wrong_stops": wrong,
        "dev_fitness": ev.best_fitness,
        "test_fitness": test,
        "wall_s": time.perf_counter() - t0,
        "gaps": gaps,
    }


def first_slice(worker: OffspringWorker, confidence: float, first: float) -> tuple[int, float]:
    """Rows the first racing round scores, and how far below a target of 0.5 a candidate's
    first-slice estimate must be for racing's test to reject it there."""
    tasks, fractions = worker.spec.tasks, round_fractions(first)
    stops = {t: round_stops(len(d), fractions) for t, d in worker.dev.items()}
    rounds = max((len(v) for v in stops.values()), default=0)
    seen = {t: stops[t][0] if stops[t] else len(d) for t, d in worker.dev.items()}

    m = sum(seen.values())

    def state(k: int) -> list[TaskSeen]:  # k of the m rows right, spread over the tasks
        counts = {t: k * n // m for t, n in seen.items()}
        for t in sorted(seen, key=lambda t: k * seen[t] % m, reverse=True)[
            : k - sum(counts.values())
        ]:
            counts[t] += 1
        return [
            TaskSeen(n, counts[t] / n, len(worker.dev[t]), tasks.weight(t)) for t, n in seen.items()
        ]

    rejected = [k for k in range(m // 2 + 1) if rejects(state(k), 0.5, confidence, rounds)]
    margin = 0.5 - estimate(state(max(rejected))) if rejected else 0.5
    return m, margin


def zoo_worker(kind: str, dev_size: int | None) -> tuple[OffspringWorker, list[np.ndarray]]:
    """A worker scoring the zoo's dev tasks, and the zoo's experts as flat vectors: the
    classifier zoo (accuracy on 4 domains), or the causal-LM zoo (exact match of greedy answers
    on 4 skills; its prose / copy OOD tasks are not in the fitness)."""
    if kind == "classifier":
        zoo = build_zoo()
        members = [str(m) for m in zoo.experts.values()]
        tasks = ZooTasks(
            seed=zoo.spec.seed,
            n_domains=zoo.spec.n_domains,
            n_ood=zoo.spec.n_ood,
            dev_size=dev_size,
        )
    else:
        if dev_size is not None:
            raise SystemExit("--dev-size is for the classifier zoo (its dev rows are generated)")
        lm = build_lm_zoo()
        members = [str(m) for m in lm.experts.values()]
        tasks = make_task_pool(lm.tasks)
    with open_checkpoint(members[0]) as c:
        layout = Layout.from_checkpoint(c)
    flats = []
    for m in members:
        with open_checkpoint(m) as c:
            flats.append(flatten(c, layout).data)
    return OffspringWorker(WorkerSpec(members[0], layout, tasks)), flats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generations", type=int, default=15)
    p.add_argument(
        "--settings",
        default="0.95:0.125,0.8:0.125",
        help="racing settings to measure, CONFIDENCE:FIRST[,...] (default: the config's "
        "defaults, and confidence 0.8)",
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--dev-size", type=int, default=None, help="classifier zoo dev rows per domain")
    p.add_argument("--zoo", default="classifier,causal_lm", help="classifier, causal_lm or both")
    p.add_argument("--quick", action="store_true", help="one seed, two generations")
    args = p.parse_args()
    if args.quick:
        args.generations, args.seeds = 2, 1
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    zoos = {z: measure(z, args, settings) for z in args.zoo.split(",")}
    print(json.dumps({"generations": args.generations, "seeds": args.seeds, "zoos": zoos}))


def measure(zoo: str, args: argparse.Namespace, settings: list[tuple[float, float]]) -> dict:
    """One zoo: the runs without racing once per seed, then each racing setting against them;
    prints a table, returns its figures."""
    worker, flats = zoo_worker(zoo, args.dev_size)
    n_dev = sum(len(d) for d in worker.dev.values())
    settings = [tuple(float(x) for x in pair.split(":")) for pair in args.settings.split(",")]
    full = [
        run(worker, flats, EvolverSettings(generations=args.generations, seed=seed))
        for seed in range(args.seeds)
    ]
    n_full = sum(f["dev_examples"] for f in full)
    gaps = np.array([g for f in full for g in f["gaps"]])
    worse = gaps[gaps >= 0]
    print(
        f"{zoo} zoo, dev {n_dev} rows ({len(worker.dev)} tasks), {args.generations} "
        f"generations, {args.seeds} seed(s); without racing {len(worse)} of {len(gaps)} "
        f"offspring were not better than their parent (short by median "
        f"{np.median(worse) if len(worse) else 0:.4f}, max "
        f"{worse.max() if len(worse) else 0:.4f})"
    )
    print("confidence  first  margin  examples  ratio  ceiling  stopped  wrong  dev gap  test gap")
    figures = []
    for confidence, first in settings:
        first_rows, margin = first_slice(worker, confidence, first)
        raced = [
            run(
                worker,
                flats,
                EvolverSettings(
                    generations=args.generations,
                    seed=seed,
                    racing=True,
                    racing_confidence=confidence,
                    racing_first=first,
                ),
            )
            for seed in range(args.seeds)
        ]
        n_raced = sum(r["dev_examples"] for r in raced)
        pairs = list(zip(full, raced, strict=True))
        # The ceiling: every offspring the full run found not better stopped at the first
        # slice, the rest scored in full (no rule that scores survivors in full does better).
        ceiling = n_full - len(worse) * (n_dev - first_rows)
        row = {
            "confidence": confidence,
            "first": first,
            "first_slice_margin": round(margin, 4),
            "examples_ratio": round(n_full / n_raced, 3),
            "ceiling_ratio": round(n_full / ceiling, 3),
            "stopped": sum(r["racing_stopped"] for r in raced),
            "wrong_stops": sum(r["wrong_stops"] for r in raced),
            "max_dev_fitness_gap": round(
                max(abs(f["dev_fitness"] - r["dev_fitness"]) for f, r in pairs), 4
            ),
            "max_test_fitness_gap": round(
                max(abs(f["test_fitness"] - r["test_fitness"]) for f, r in pairs), 4
            ),
        }
        figures.append(row)
        print(
            f"{confidence:10.2f}  {first:5.3f}  {margin:6.3f}  {n_full:>8} -> {n_raced:<8} "
            f"{row['examples_ratio']:5.2f}x  {row['ceiling_ratio']:5.2f}x  "
            f"{row['stopped']:>3}/{len(gaps):<4} {row['wrong_stops']:>3}  "
            f"{row['max_dev_fitness_gap']:.4f}   {row['max_test_fitness_gap']:.4f}"
        )
    return {
        "dev_rows": n_dev,
        "share_not_better": round(len(worse) / max(1, len(gaps)), 3),
        "settings": figures,
    }


if __name__ == "__main__":
    main()
