"""Racing's evaluation budget: dev examples scored, and final fitness, with and without racing.

    python benchmarks/evaluation_budget.py [--generations 6] [--confidence 0.95] [--first 0.25]
        [--dev-size ROWS_PER_DOMAIN]
    python benchmarks/evaluation_budget.py --quick

On the classifier zoo (built once, cached under $EVORAY_HOME; ``--dev-size``: a larger generated
dev set, ``ZooTasks.dev_size``), runs Evolver in individual mode in one process (one
``OffspringWorker``, no Ray) with the same seeds twice: scoring every offspring on the full dev
set, and racing it. Prints both runs' dev examples scored, final dev and test fitness side by
side, then one JSON line. The initial population's scoring (the same in both runs) is counted
in both. Also printed: the first slice's margin (how far below its target a candidate must be
for the bound to stop it there), how many offspring of the run without racing were not better
than their parent and by how much, and the ceiling ratio: the examples saved had every one of
those stopped at its first slice (no racing rule that scores survivors in full does better).

Measured (2 shared CPU cores): defaults, 6 generations, 2 seeds: 1.00x (none stopped; 11 of 48
offspring not better, short by <= 0.0098, first-slice margin 0.104; ceiling 1.17x), dev and
test gaps 0. ``--dev-size 2048 --first 0.1 --generations 20 --seeds 1``: 1.00x (28 of 80 not
better, short by <= 0.0033, margin 0.049; ceiling 1.43x), gaps 0. Before survivors kept their
slices' sums (they were re-scored on the full dev set) the default run gave 0.70-0.80x.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from transformers.utils import logging as hf_logging

from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.zoo import build_zoo
from evoray.strategies.base import Answers, Member, Offspring, Problem, Score, drive
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.strategies.racing import TaskSeen, estimate, round_fractions, round_stops, upper_bound
from evoray.tasks.pool import ZooTasks
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.flat import flatten
from evoray.weights.layout import Layout


def run(worker: OffspringWorker, flats: list[np.ndarray], settings: EvolverSettings) -> dict:
    pop = [f.copy() for f in flats]
    examples = stopped = 0
    gaps: list[float] = []  # per offspring: its parent's dev fitness minus its own (full dev)

    def execute(batch) -> Answers:
        nonlocal examples, stopped
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
        "dev_fitness": ev.best_fitness,
        "test_fitness": test,
        "wall_s": time.perf_counter() - t0,
        "gaps": gaps,
    }


def first_slice(worker: OffspringWorker, confidence: float, first: float) -> tuple[int, float]:
    """Rows the first racing round scores, and how far below its target a candidate's first-
    slice estimate must be for the bound to reject it there (the bound's half-width)."""
    tasks, fractions = worker.spec.tasks, round_fractions(first)
    stops = {t: round_stops(len(d), fractions) for t, d in worker.dev.items()}
    rounds = max((len(v) for v in stops.values()), default=0)
    state = [
        TaskSeen(stops[t][0] if stops[t] else len(d), 0.5, len(d), tasks.weight(t))
        for t, d in worker.dev.items()
    ]
    return sum(s.seen for s in state), upper_bound(state, confidence, rounds) - estimate(state)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--generations", type=int, default=6)
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--first", type=float, default=0.25)
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--dev-size", type=int, default=None, help="dev rows per domain (zoo: 128)")
    p.add_argument("--quick", action="store_true", help="one seed, two generations")
    args = p.parse_args()
    if args.quick:
        args.generations, args.seeds = 2, 1
    hf_logging.set_verbosity_error()
    torch.set_num_threads(2)
    zoo = build_zoo()
    members = [str(m) for m in zoo.experts.values()]
    with open_checkpoint(members[0]) as c:
        layout = Layout.from_checkpoint(c)
    flats = []
    for m in members:
        with open_checkpoint(m) as c:
            flats.append(flatten(c, layout).data)
    tasks = ZooTasks(
        seed=zoo.spec.seed,
        n_domains=zoo.spec.n_domains,
        n_ood=zoo.spec.n_ood,
        dev_size=args.dev_size,
    )
    worker = OffspringWorker(WorkerSpec(members[0], layout, tasks))
    n_dev = sum(len(d) for d in worker.dev.values())
    first_rows, margin = first_slice(worker, args.confidence, args.first)
    print(
        f"dev {n_dev} rows ({len(worker.dev)} tasks); the first slice scores {first_rows} and "
        f"rejects only a candidate more than {margin:.3f} below its target there"
    )
    rows = []
    for seed in range(args.seeds):
        base = EvolverSettings(generations=args.generations, seed=seed)
        full = run(worker, flats, base)
        raced = run(
            worker,
            flats,
            EvolverSettings(
                generations=args.generations,
                seed=seed,
                racing=True,
                racing_confidence=args.confidence,
                racing_first=args.first,
            ),
        )
        rows.append((seed, full, raced))
        print(
            f"seed {seed}: dev examples {full['dev_examples']} -> {raced['dev_examples']} "
            f"({full['dev_examples'] / raced['dev_examples']:.2f}x fewer), racing stopped "
            f"{raced['racing_stopped']} of {len(full['gaps'])}; dev fitness "
            f"{full['dev_fitness']:.4f} vs "
            f"{raced['dev_fitness']:.4f}; test {full['test_fitness']:.4f} vs "
            f"{raced['test_fitness']:.4f}; wall {full['wall_s']:.0f}s vs {raced['wall_s']:.0f}s"
        )
    n_full = sum(f["dev_examples"] for _, f, _ in rows)
    n_raced = sum(r["dev_examples"] for _, _, r in rows)
    # Without racing: offspring not better than their parent (gap >= 0) are the ones racing
    # could stop. The ceiling: every one of them stopped at the first slice, the rest in full.
    gaps = np.array([g for _, f, _ in rows for g in f["gaps"]])
    worse = gaps[gaps >= 0]
    ceiling = n_full - len(worse) * (n_dev - first_rows)
    print(
        f"without racing {len(worse)} of {len(gaps)} offspring were not better than their "
        f"parent (gap median {np.median(worse) if len(worse) else 0:.4f}, max "
        f"{worse.max() if len(worse) else 0:.4f}; {int((worse > margin).sum())} beyond the "
        f"first-slice margin); the ceiling, all of them stopped at the first slice: "
        f"{n_full / ceiling:.2f}x fewer examples"
    )
    print(
        json.dumps(
            {
                "generations": args.generations,
                "confidence": args.confidence,
                "first": args.first,
                "seeds": args.seeds,
                "dev_rows": n_dev,
                "first_slice_margin": round(margin, 4),
                "examples_ratio": round(n_full / n_raced, 3),
                "ceiling_ratio": round(n_full / ceiling, 3),
                "share_not_better": round(len(worse) / max(1, len(gaps)), 3),
                "max_dev_fitness_gap": round(
                    max(abs(f["dev_fitness"] - r["dev_fitness"]) for _, f, r in rows), 4
                ),
                "max_test_fitness_gap": round(
                    max(abs(f["test_fitness"] - r["test_fitness"]) for _, f, r in rows), 4
                ),
                "wall_ratio": round(
                    sum(f["wall_s"] for _, f, _ in rows) / sum(r["wall_s"] for _, _, r in rows), 3
                ),
            }
        )
    )


if __name__ == "__main__":
    main()
