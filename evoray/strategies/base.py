"""The strategy interface: ask for candidates, tell their scores, checkpoint the state.

A search strategy is pure decision logic, in the spirit of Ray Tune's ``Searcher``: it never
touches weights or Ray. It describes what to build from the population (``Build``: a member, a
DE offspring, a merge), asks for those to be scored, kept in the population or compared by
kinship, and for slots it can rebuild to be released (``Batch``), and is told the answers.
``generation()`` is that ask/tell loop as a generator: each ``yield`` asks for a batch and the
value sent back tells its answers, so a generation may take several rounds (Evolver's merger
mode scores a combined merge after the trials; greedy merging asks kinship before it picks an
exploration partner).

Builds in one batch all read the population as it was when the batch was asked, so the
synchronous updates of a generation do not depend on their order. A strategy's state is a small
JSON-able dict (the genome): ``replay`` lists the batches that rebuild the population from the
initial models, so checkpoints stay a few KB whatever the model size.

``execution.runner`` drives any registered strategy on a worker pool; tests drive them with a
plain in-process population.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from evoray.strategies.de import Recipe
from evoray.strategies.racing import Race

# -- what to build ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Member:
    """Population slot ``slot`` as it is."""

    slot: int


@dataclass(frozen=True)
class Offspring:
    """The DE offspring of ``recipe`` (target, references, F, CR, seed) from the population.
    ``race``: score it by racing against ``race.must_beat`` (None: on the full dev set).
    ``keep_above``: a hint that the strategy will keep this offspring if its fitness is
    strictly above this value, so the worker that scores it returns its weights with the
    score and keeping it needs no rebuild; it saves a round trip, never changes a result."""

    recipe: Recipe
    race: Race | None = None
    keep_above: float | None = None


@dataclass(frozen=True)
class Merged:
    """The current merged model (Evolver's merger mode)."""


@dataclass(frozen=True)
class MergeAll:
    """The merger's (average / Fisher / RegMean) merge of the whole population."""


@dataclass(frozen=True)
class MergedWith:
    """The merged model with each recipe's offspring in place of its target (one recipe: a
    merger-mode trial; several: the combined update of a generation). ``race`` as for
    ``Offspring`` (single-recipe trials only)."""

    recipes: tuple[Recipe, ...]
    race: Race | None = None


@dataclass(frozen=True)
class MethodMerge:
    """A registered merge method over population slots (``with_base``: base model first)."""

    method: str
    per_model: tuple[dict[str, Any], ...]
    settings: dict[str, Any]
    slots: tuple[int, ...]
    with_base: bool


Build = Member | Offspring | Merged | MergeAll | MergedWith | MethodMerge


# -- what to do with it -----------------------------------------------------------------------


@dataclass(frozen=True)
class Keep:
    """Store a build in population slot ``slot`` (``None``: the merged model; ``slot >=
    len(population)``: append, slots skipped on the way stay empty)."""

    build: Build
    slot: int | None


@dataclass(frozen=True)
class Batch:
    """One round of work: builds kept, candidates scored on dev, kinship of slot pairs, slots
    released.

    Every build reads the population as it was when the batch was asked; keeps are applied
    after the scores and kinships are computed, releases last. A released slot is empty (its
    vector freed once nothing else holds it) until a later keep fills it again; reading it is
    an error. Strategies release what they can rebuild from a recipe, so the object store holds
    only what the search still needs."""

    evaluate: tuple[Build, ...] = ()
    kinship: tuple[tuple[int, int], ...] = ()
    keep: tuple[Keep, ...] = ()
    release: tuple[int, ...] = ()


@dataclass(frozen=True)
class Score:
    """The dev result of one build: fitness, per-task scores, and where and how fast.
    ``examples``: dev examples scored (None: not counted); ``racing_stopped``: racing rejected
    it after ``examples``, so ``fitness`` is the partial estimate on those."""

    fitness: float
    scores: dict[str, dict[str, float]]
    build_time_s: float = 0.0
    eval_time_s: float = 0.0
    kinship_to_parent: float | None = None
    node: str = ""
    device: str = ""
    examples: int | None = None
    racing_stopped: bool = False


@dataclass(frozen=True)
class Answers:
    scores: list[Score] = field(default_factory=list)
    kinship: list[float] = field(default_factory=list)  # Pearson of the deltas, per pair


@dataclass(frozen=True)
class LogRow:
    """A strategy's part of one log row (the runner adds scores, times, node, device)."""

    individual: int
    parents: list[int]
    operator: str
    seed: int
    accepted: bool
    settings: dict[str, Any] = field(default_factory=dict)
    kinship_to_parent: float | None = None


@dataclass
class Generation:
    """What one finished generation reports: Tune metrics and a log row per scored build."""

    metrics: dict[str, Any]
    rows: list[tuple[LogRow, Score]] = field(default_factory=list)


@dataclass(frozen=True)
class Problem:
    """What a strategy knows of the models: how many, whether there is a base, the members'
    references (for recipes users can rerun) and the number of transformer layers."""

    n_members: int
    has_base: bool
    members: tuple[str, ...] = ()
    base: str | None = None
    n_layers: int = 1


# -- the interface ----------------------------------------------------------------------------

Plan = Generator[Batch, Answers, Generation]


class Strategy(ABC):
    """One search run's decisions. Subclasses set ``name``, ``settings_cls`` and ``state_cls``
    and implement ``setup``, ``generation`` and ``answer``; ``self.state`` is the search state
    (a dataclass with ``to_dict``/``from_dict``, ``done``, ``best_fitness``, ``generation``)."""

    name: ClassVar[str]
    settings_cls: ClassVar[type]
    state_cls: ClassVar[type]
    #: The setting that counts generations (``--generations`` overrides it).
    generations_key: ClassVar[str] = "generations"
    #: Numeric settings ``search.optuna`` may sample.
    searchable: ClassVar[tuple[str, ...]] = ()
    #: Display name in tables and plots.
    title: ClassVar[str] = ""

    @classmethod
    def merge_inputs(cls, members: int, has_base: bool) -> int:
        """Most models one of its method merges reads (the memory model sizes a worker's merge
        scratch by it); 0 for a strategy that never merges with a registered method."""
        return 0

    def __init__(self, settings: Any, problem: Problem) -> None:
        self.settings = settings
        self.problem = problem

    # -- what a strategy implements ------------------------------------------------------------

    @abstractmethod
    def setup(self) -> Plan:
        """Score the initial population (a fresh run, before generation 0)."""

    @abstractmethod
    def generation(self) -> Plan:
        """One generation: yield batches, receive their answers, return its report."""

    @abstractmethod
    def answer(self) -> Build:
        """The run's result so far, as a build of the current population."""

    def get_state(self) -> dict[str, Any]:
        """A JSON-able checkpoint of the search (with ``set_state``: resume)."""
        return self.state.to_dict()

    def set_state(self, state: dict[str, Any]) -> None:
        self.state = self.state_cls.from_dict(state)

    def merger(self) -> tuple[str, dict[str, Any]] | None:
        """The population merger the strategy scores inside (kind, options), if any."""
        return None

    def replay(self) -> list[Batch]:
        """Batches that rebuild the population of the current state from the initial models."""
        return []

    @property
    def done(self) -> bool:
        return self.state.done

    @property
    def generations_done(self) -> int:
        return self.state.generation

    @property
    def best_fitness(self) -> float:
        return self.state.best_fitness

    @property
    @abstractmethod
    def evaluations(self) -> int:
        """Dev evaluations used so far (the budget strategies are compared on)."""

    def initial(self) -> tuple[dict[str, Any], dict[str, Build]]:
        """What ``initial.json`` records of a fresh run, and builds whose test scores it adds
        (for example the one-shot merge Evolver starts from)."""
        return {}, {}

    def mergekit_yaml(self) -> str | None:
        """The answer as a mergekit recipe, where it is one."""
        return None

    # -- labels and summaries (class-level: the report has settings dicts, not runs) -----------

    @classmethod
    def label(cls, settings: dict[str, Any]) -> str:
        """A short name for a run with these settings, as tables and plots show it."""
        return cls.title or cls.name

    @classmethod
    def baselines(cls, settings: dict[str, Any]) -> dict[str, str]:
        """Keys of ``initial.json`` that hold test scores of a starting point, and how the
        results table labels them."""
        return {}

    @classmethod
    def settings_from_log(cls, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Settings recoverable from a run's log rows alone (a run without summary.json): the
        run-level settings among the first row's ``settings``."""
        names = {f.name for f in fields(cls.settings_cls)}
        first = (rows[0].get("settings") or {}) if rows else {}
        return {k: v for k, v in first.items() if k in names}

    @classmethod
    def start_fitness(cls, settings: dict[str, Any], initial: dict[str, Any]) -> float | None:
        """The dev fitness the run's answer had before generation 0, by ``initial.json``: the
        best initial member where it lists them (None if unknown)."""
        fitness = [float(v) for v in initial.get("fitness") or [] if v is not None]
        return max(fitness) if fitness else None

    @classmethod
    def recipe_note(cls, settings: dict[str, Any], complete: bool) -> str:
        """What the report says about the final recipe when the run wrote none."""
        return "Final recipe: none recorded."

    @classmethod
    def make_settings(cls, values: dict[str, Any]) -> Any:
        """The settings object from config values (YAML lists become tuples for ranges)."""
        return cls.settings_cls(
            **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
        )


def flat_scores(scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """{task: {metric: v}} -> {"task/metric": v}, the run log's score keys."""
    return {f"{task}/{metric}": v for task, m in scores.items() for metric, v in m.items()}


def fmt_num(v: Any) -> str:
    """Numbers as labels show them (``0.5``, ``1e-05``), anything else as it is."""
    return f"{v:g}" if isinstance(v, int | float) and not isinstance(v, bool) else str(v)


def drive(plan: Generator[Batch, Answers, Any], execute: Any) -> Any:
    """Run an ask/tell plan to its end: each batch it asks is answered by ``execute``."""
    try:
        batch = next(plan)
        while True:
            batch = plan.send(execute(batch))
    except StopIteration as stop:
        return stop.value
