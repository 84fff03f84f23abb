"""Kinship-guided top-k greedy merging (Hu et al. 2024), as pure decisions over candidates.

Generation 1 merges every pair of the initial models and keeps the top-k of everything
evaluated. Each later generation merges every not-yet-merged pair inside the top-k, plus one
exploration merge: the best model with the top-k model of lowest kinship to it (merging with a
distant relative escapes the local optimum that merging near-identical models ends in). When
that pair was merged already, the lowest-kinship model among all candidates not yet merged with
the best is taken instead. The search stops when the top-k set no longer changes, when the
top-k models' mean pairwise kinship exceeds a threshold (optional), or after max_generations.

Candidates are described by their parents, so the state replays (merges are deterministic),
and a candidate's vector is a recipe the population can rebuild: only the members and the
current top-k stay in the population between generations; every other merged slot is released.

Memory bound (flat vectors held by the population, at any time): the members, the top-k of the
generation before, the new candidates of the generation in flight, plus, only while a released
candidate is rebuilt (an exploration partner outside the top-k, a replay after resume), its
released ancestors (the new candidates are not built yet then, so in practice it stays within
the same budget; a deep tree of merges can exceed it by its rebuild frontier). The price is
compute: when exploration falls back to all candidates, released ones are merged again (each
at most once per generation, ancestors included). With ``n`` members, ``k`` and ``c`` new
candidates per generation (at most ``n(n-1)/2`` in the first, ``k(k-1)/2 + 1`` later): ``n + k +
c`` outside rebuilds, independent of the number of generations (before, every candidate stayed
in the object store).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from itertools import combinations
from typing import Any

from evoray.errors import ConfigError
from evoray.strategies.base import (
    Batch,
    Build,
    Generation,
    Keep,
    LogRow,
    Member,
    MethodMerge,
    Plan,
    Problem,
    Strategy,
)

OPERATORS = ("slerp", "task_arithmetic", "ties")


@dataclass(frozen=True)
class GreedySettings:
    """Hyperparameters of one kinship-guided greedy run."""

    k: int = 3
    operator: str = "slerp"
    t: float = 0.5  # slerp
    weight: float = 0.5  # task_arithmetic / ties, per parent
    density: float = 0.5  # ties
    max_generations: int = 5
    kinship_threshold: float | None = None
    explore: bool = True
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.operator not in OPERATORS:
            raise ValueError(f"kinship_greedy.operator must be one of {OPERATORS}")
        if self.k < 2:
            raise ValueError(f"kinship_greedy.k must be >= 2, got {self.k}")
        if self.max_generations < 1:
            raise ValueError("kinship_greedy.max_generations must be >= 1")
        if not 0.0 <= self.t <= 1.0:
            raise ValueError(f"kinship_greedy.t must be in [0, 1], got {self.t}")
        if not 0.0 < self.density <= 1.0:
            raise ValueError(f"kinship_greedy.density must be in (0, 1], got {self.density}")
        if self.kinship_threshold is not None and not -1.0 <= self.kinship_threshold <= 1.0:
            raise ValueError(
                f"kinship_greedy.kinship_threshold must be in [-1, 1] (a Pearson correlation) "
                f"or null, got {self.kinship_threshold}"
            )

    def recipe(self) -> tuple[str, list[dict], dict, bool]:
        """(method, per-parent settings, global settings, parent_a_is_base) for one pair."""
        if self.operator == "slerp":
            return "slerp", [{}], {"t": self.t}, True
        per = {"weight": self.weight}
        if self.operator == "ties":
            per["density"] = self.density
        return self.operator, [dict(per), dict(per)], {}, False


@dataclass
class Candidate:
    id: int
    parents: tuple[int, ...] = ()
    generation: int = 0
    fitness: float | None = None
    parent_kinship: float | None = None
    explore: bool = False


@dataclass
class GreedyState:
    settings: GreedySettings
    candidates: list[Candidate] = field(default_factory=list)
    generation: int = 0
    top: list[int] = field(default_factory=list)
    stopped: str | None = None

    @property
    def done(self) -> bool:
        return self.stopped is not None

    @property
    def best(self) -> int:
        return self.top[0]

    @property
    def best_fitness(self) -> float:
        return self.candidates[self.best].fitness if self.top else float("-inf")

    def merged_pairs(self) -> set[frozenset[int]]:
        return {frozenset(c.parents) for c in self.candidates if c.parents}

    def rank(self) -> list[int]:
        """Top-k ids by fitness (ties broken by lower id, so replays agree)."""
        scored = [c for c in self.candidates if c.fitness is not None]
        scored.sort(key=lambda c: (-c.fitness, c.id))
        return [c.id for c in scored[: self.settings.k]]

    def pairs_to_merge(self) -> list[tuple[int, int]]:
        """Exploitation pairs for the next generation (exploration is chosen separately)."""
        done = self.merged_pairs()
        pool = (
            [c.id for c in self.candidates if not c.parents] if self.generation == 0 else self.top
        )
        return [(a, b) for a, b in combinations(sorted(pool), 2) if frozenset((a, b)) not in done]

    def exploration_candidates(self) -> tuple[list[int], list[int]]:
        """(top-k others, all other candidates) not yet merged with the best, in rank order."""
        best = self.best
        done = self.merged_pairs()
        fresh = [
            c.id
            for c in self.candidates
            if c.id != best and frozenset((best, c.id)) not in done and c.fitness is not None
        ]
        in_top = [i for i in self.top if i in fresh]
        return in_top, fresh

    def add(self, parents: tuple[int, ...], explore: bool = False) -> Candidate:
        c = Candidate(len(self.candidates), parents, self.generation + 1, explore=explore)
        self.candidates.append(c)
        return c

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": asdict(self.settings),
            "candidates": [asdict(c) for c in self.candidates],
            "generation": self.generation,
            "top": self.top,
            "stopped": self.stopped,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GreedyState:
        return cls(
            settings=GreedySettings(**d["settings"]),
            candidates=[
                Candidate(**{**c, "parents": tuple(c["parents"])}) for c in d["candidates"]
            ],
            generation=d["generation"],
            top=list(d["top"]),
            stopped=d["stopped"],
        )


# -- the strategy -------------------------------------------------------------------------------


class KinshipGreedy(Strategy):
    """Kinship-guided top-k greedy merging as an ask/tell strategy."""

    name = "kinship_greedy"
    settings_cls = GreedySettings
    state_cls = GreedyState
    generations_key = "max_generations"
    searchable = ("t", "weight", "density")
    title = "kinship greedy"

    @classmethod
    def merge_inputs(cls, members: int, has_base: bool) -> int:
        return 2 + has_base  # a pair of candidates, and the base

    def __init__(self, settings: GreedySettings, problem: Problem) -> None:
        if not problem.has_base:
            raise ConfigError("kinship_greedy needs the models' shared base (models.base)")
        super().__init__(settings, problem)
        self.state = GreedyState(settings, [Candidate(i) for i in range(problem.n_members)])
        # Kinships to the best already asked (deterministic, so a resumed run that asks them
        # again gets the same): spares rebuilding released candidates for them.
        self._kin: dict[tuple[int, int], float] = {}

    def _merge(self, a: int, b: int) -> MethodMerge:
        method, per, glob, a_is_base = self.settings.recipe()
        if a_is_base:  # slerp from parent a towards parent b
            return MethodMerge(method, tuple(per), glob, (a, b), with_base=False)
        return MethodMerge(method, tuple(per), glob, (a, b), with_base=True)

    def setup(self) -> Plan:
        answers = yield Batch(evaluate=tuple(Member(c.id) for c in self.state.candidates))
        for c, res in zip(self.state.candidates, answers.scores, strict=True):
            c.fitness = res.fitness
        self.state.top = self.state.rank()

    def replay(self) -> list[Batch]:
        """The members' top-k merged candidates from their parents (merges are deterministic),
        rebuilding released ancestors on the way and releasing them again."""
        return self._rebuild(self.state.top, held=set())

    def held(self) -> set[int]:
        """Merged candidates the population holds between generations: those in the top-k."""
        return {i for i in self.state.top if self.state.candidates[i].parents}

    def _closure(self, targets: list[int], held: set[int]) -> list[int]:
        """The merged candidates among ``targets`` and their ancestors that are not in ``held``
        (members always are), in id order: parents before children."""
        cands = self.state.candidates
        need: set[int] = set()
        stack = [t for t in targets if cands[t].parents and t not in held]
        while stack:
            i = stack.pop()
            if i not in need:
                need.add(i)
                stack += [p for p in cands[i].parents if cands[p].parents and p not in held]
        return sorted(need)

    def _rebuild(self, targets: list[int], held: set[int]) -> list[Batch]:
        """Batches that keep each of ``targets`` not in ``held``, its missing ancestors first,
        one candidate a batch; an ancestor is released by the batch of its last child, so only
        ``targets`` and ``held`` remain."""
        cands = self.state.candidates
        order = self._closure(targets, held)
        last_child = {p: i for i in order for p in cands[i].parents if p in order}
        keep = set(targets)
        return [
            Batch(
                keep=(Keep(self._merge(*cands[i].parents), i),),
                release=tuple(
                    p for p in cands[i].parents if last_child.get(p) == i and p not in keep
                ),
            )
            for i in order
        ]

    def generation(self) -> Plan:
        s, state = self.settings, self.state
        t0 = time.perf_counter()
        held = self.held()  # plus the members
        new = [state.add(p) for p in state.pairs_to_merge()]
        partner_rebuilt: tuple[int, ...] = ()
        if s.explore and state.generation > 0:
            in_top, fresh = state.exploration_candidates()
            taken = {frozenset(c.parents) for c in new}
            options = [i for i in (in_top or fresh) if frozenset((state.best, i)) not in taken]
            if options:
                kin = yield from self._kinship_to(state.best, options, held)
                partner = options[min(range(len(options)), key=kin.__getitem__)]
                if state.candidates[partner].parents and partner not in held:
                    for batch in self._rebuild([partner], held):
                        _ = yield batch  # a list is no generator: answers are not passed on
                    partner_rebuilt = (partner,)
                new.append(state.add((state.best, partner), explore=True))
        if not new:
            state.stopped = "nothing left to merge"
            state.generation += 1
            return self._report(0, t0, [])
        yield Batch(keep=tuple(Keep(self._merge(*c.parents), c.id) for c in new))
        answers = yield Batch(
            evaluate=tuple(Member(c.id) for c in new), kinship=tuple(c.parents for c in new)
        )
        for c, k, res in zip(new, answers.kinship, answers.scores, strict=True):
            c.parent_kinship = k
            c.fitness = res.fitness
        old_top = state.top
        state.top = state.rank()
        state.generation += 1
        rows = [(self._row(c), res) for c, res in zip(new, answers.scores, strict=True)]
        if set(state.top) == set(old_top):
            state.stopped = "top-k unchanged"
        elif s.kinship_threshold is not None:
            pairs = tuple(combinations(state.top, 2))
            kin = (yield Batch(kinship=pairs)).kinship if pairs else []
            if kin and sum(kin) / len(kin) > s.kinship_threshold:
                state.stopped = f"top-k mean kinship above {s.kinship_threshold}"
        if not state.done and state.generation >= s.max_generations:
            state.stopped = "max_generations"
        dropped = (held | {c.id for c in new} | set(partner_rebuilt)) - self.held()
        if dropped:  # rebuilt from their recipes if they are needed again
            yield Batch(release=tuple(sorted(dropped)))
        return self._report(len(new), t0, rows)

    def _kinship_to(self, best: int, options: list[int], held: set[int]):
        """Kinship of ``best`` to each option. Held ones are compared in one batch; released
        ones are rebuilt in one sweep in id order (each at most once, ancestors first), each
        compared as soon as it is built and released once it and its children are done."""
        cands = self.state.candidates
        kin = {i: self._kin[(best, i)] for i in options if (best, i) in self._kin}
        ready = [i for i in options if i not in kin and (not cands[i].parents or i in held)]
        if ready:
            got = yield Batch(kinship=tuple((best, i) for i in ready))
            kin.update(zip(ready, got.kinship, strict=True))
        order = self._closure([i for i in options if i not in kin], held)
        last_child = {p: i for i in order for p in cands[i].parents if p in order}
        wanted = set(options) - set(kin)
        for i in order:
            done = tuple(p for p in cands[i].parents if last_child.get(p) == i)
            yield Batch(keep=(Keep(self._merge(*cands[i].parents), i),), release=done)
            if i in wanted:
                got = yield Batch(kinship=((best, i),), release=() if i in last_child else (i,))
                kin[i] = got.kinship[0]
        self._kin.update(((best, i), kin[i]) for i in options)
        return [kin[i] for i in options]

    def _row(self, c: Candidate) -> LogRow:
        return LogRow(
            individual=c.id,
            parents=list(c.parents),
            operator=self.settings.operator + ("+explore" if c.explore else ""),
            seed=0,
            accepted=c.id in self.state.top,
            settings={"operator": self.settings.operator, "exploration": c.explore},
            kinship_to_parent=c.parent_kinship,
        )

    def _report(self, n: int, t0: float, rows: list) -> Generation:
        state = self.state
        return Generation(
            metrics={
                "generation": state.generation,
                "best_fitness": state.best_fitness,
                "evaluated": n,
                "evaluations": len(state.candidates),
                "generation_time_s": time.perf_counter() - t0,
            },
            rows=rows,
        )

    def answer(self) -> Build:
        return Member(self.state.best)

    def initial(self) -> tuple[dict[str, Any], dict[str, Build]]:
        return {"fitness": [c.fitness for c in self.state.candidates]}, {}

    @property
    def evaluations(self) -> int:
        return len(self.state.candidates)

    @classmethod
    def label(cls, settings: dict[str, Any]) -> str:
        return f"kinship greedy k={settings.get('k', '?')} {settings.get('operator', '?')}"

    @classmethod
    def recipe_note(cls, settings: dict[str, Any], complete: bool) -> str:
        return (
            "Final recipe: not expressible as one mergekit recipe (the answer is a tree of "
            "pairwise merges of merges); use its model folder."
        )
