"""Recipe search: Optuna samplers (CMA-ES, TPE) over a merge method's per-model parameters.

The baseline users know from mergekit-evolve and Sakana's evolutionary merging: search the
weights (and densities) of a merge recipe, optionally one value per layer, scoring each recipe
by merging and evaluating on dev. Tune costs about a second per trial, far more than one
recipe's evaluation, so a Tune trial is one whole search and the Optuna study runs inside it
with ask/tell, a batch of recipes per Tune iteration evaluated in parallel on the worker pool.
(Tune's ``OptunaSearch`` stays available one level up, across runs: ``search.optuna``.)

The state is the list of evaluated recipes; on resume they are told to a fresh study again, so
the search continues from its history (not bit-identical to an uninterrupted CMA-ES run).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import optuna
import yaml

from evoray.errors import ConfigError
from evoray.merge.registry import get_method
from evoray.strategies.base import (
    Batch,
    Build,
    Generation,
    LogRow,
    MethodMerge,
    Plan,
    Problem,
    Strategy,
)

SAMPLERS = ("cmaes", "tpe")
SPARSIFYING = ("ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties")


@dataclass(frozen=True)
class RecipeSettings:
    """What to search: a method's per-model weight (and density), per model or per layer."""

    method: str = "task_arithmetic"
    sampler: str = "cmaes"
    rounds: int = 8
    batch_size: int = 4
    per_layer: bool = False
    weight_range: tuple[float, float] = (0.0, 1.0)
    density_range: tuple[float, float] = (0.1, 1.0)
    seed: int = 0
    metric: str = "accuracy"

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise ValueError(f"recipe_search.sampler must be one of {SAMPLERS}")
        try:
            m = get_method(self.method)
        except ConfigError as exc:
            raise ValueError(f"recipe_search.method: {exc}") from None
        if m.name in ("slerp", "model_stock"):
            raise ValueError("recipe_search.method needs per-model weights (not slerp/model_stock)")
        if self.rounds < 1 or self.batch_size < 1:
            raise ValueError("recipe_search.rounds and batch_size must be >= 1")
        for name, (lo, hi) in (("weight", self.weight_range), ("density", self.density_range)):
            if lo >= hi:
                raise ValueError(f"recipe_search.{name}_range: expected [low, high], low < high")

    @property
    def searches_density(self) -> bool:
        """Only sparsifying methods use density (task_arithmetic accepts and ignores it)."""
        return self.method in SPARSIFYING


@dataclass
class RecipeState:
    settings: RecipeSettings
    round: int = 0
    trials: list[dict[str, Any]] = field(default_factory=list)  # params, fitness

    @property
    def done(self) -> bool:
        return self.round >= self.settings.rounds

    @property
    def best(self) -> dict[str, Any]:
        return max(self.trials, key=lambda t: t["fitness"])

    @property
    def best_fitness(self) -> float:
        return self.best["fitness"] if self.trials else float("-inf")

    def to_dict(self) -> dict[str, Any]:
        return {"settings": asdict(self.settings), "round": self.round, "trials": self.trials}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RecipeState:
        st = dict(d["settings"])
        st["weight_range"] = tuple(st["weight_range"])
        st["density_range"] = tuple(st["density_range"])
        return cls(RecipeSettings(**st), d["round"], list(d["trials"]))


class RecipeSearch(Strategy):
    """Recipe search as an ask/tell strategy: Optuna asks recipes, their dev scores tell it."""

    name = "recipe_search"
    settings_cls = RecipeSettings
    state_cls = RecipeState
    generations_key = "rounds"
    searchable = ()  # its ranges are not scalars; it searches weights itself
    title = "recipe search"

    @classmethod
    def merge_inputs(cls, members: int, has_base: bool) -> int:
        return members + has_base

    def __init__(self, settings: RecipeSettings, problem: Problem) -> None:
        method = get_method(settings.method)
        if method.needs_base and not problem.has_base:
            raise ConfigError(f"recipe_search with {method.name} needs models.base")
        super().__init__(settings, problem)
        self.n_layers = max(1, problem.n_layers)
        self.state = RecipeState(settings)
        self._new_study()

    def _new_study(self) -> None:
        s = self.settings
        sampler = (
            optuna.samplers.CmaEsSampler(seed=s.seed)
            if s.sampler == "cmaes"
            else optuna.samplers.TPESampler(seed=s.seed)
        )
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction="maximize", sampler=sampler)
        self.distributions = self._distributions()

    def _distributions(self) -> dict[str, optuna.distributions.BaseDistribution]:
        s = self.settings
        out: dict[str, optuna.distributions.BaseDistribution] = {}
        slots = range(self.n_layers) if s.per_layer else [None]
        for i in range(self.problem.n_members):
            for layer in slots:
                suffix = "" if layer is None else f"_l{layer}"
                out[f"w{i}{suffix}"] = optuna.distributions.FloatDistribution(*s.weight_range)
                if s.searches_density:
                    out[f"d{i}{suffix}"] = optuna.distributions.FloatDistribution(*s.density_range)
        return out

    def recipe(self, params: dict[str, float]) -> list[dict[str, Any]]:
        """Per-model parameters (per-layer values become mergekit gradients)."""
        s = self.settings
        per = []
        for i in range(self.problem.n_members):

            def value(prefix: str, i: int = i) -> Any:
                if not s.per_layer:
                    return params[f"{prefix}{i}"]
                return [params[f"{prefix}{i}_l{layer}"] for layer in range(self.n_layers)]

            d = {"weight": value("w")}
            if s.searches_density:
                d["density"] = value("d")
            per.append(d)
        return per

    def _merge(self, params: dict[str, float]) -> MethodMerge:
        slots = tuple(range(self.problem.n_members))
        return MethodMerge(self.settings.method, tuple(self.recipe(params)), {}, slots, True)

    def setup(self) -> Plan:
        return
        yield  # nothing to score before the first round: every trial is a whole recipe

    def generation(self) -> Plan:
        s, state = self.settings, self.state
        t0 = time.perf_counter()
        asked = [self.study.ask(self.distributions) for _ in range(s.batch_size)]
        answers = yield Batch(evaluate=tuple(self._merge(t.params) for t in asked))
        results = answers.scores
        best_before = state.best_fitness
        for t, res in zip(asked, results, strict=True):
            self.study.tell(t, res.fitness)
            state.trials.append({"params": dict(t.params), "fitness": res.fitness})
        best = max(r.fitness for r in results)
        rows = [
            (self._row(t.number, res.fitness == best and best > best_before), res)
            for t, res in zip(asked, results, strict=True)
        ]
        state.round += 1
        return Generation(
            metrics={
                "generation": state.round,
                "best_fitness": state.best_fitness,
                "evaluated": len(asked),
                "evaluations": len(state.trials),
                "generation_time_s": time.perf_counter() - t0,
            },
            rows=rows,
        )

    def _row(self, number: int, accepted: bool) -> LogRow:
        s = self.settings
        return LogRow(
            individual=number,
            parents=list(range(self.problem.n_members)),
            operator=s.method,
            seed=s.seed,
            accepted=accepted,
            settings={"method": s.method, "sampler": s.sampler},
        )

    def answer(self) -> Build:
        return self._merge(self.state.best["params"])

    def mergekit_yaml(self) -> str | None:
        """The best recipe as a mergekit config that ``evoray merge`` reproduces."""
        config: dict[str, Any] = {"merge_method": self.settings.method}
        if self.problem.base is not None:
            config["base_model"] = self.problem.base
        config["models"] = [
            {"model": m, "parameters": p}
            for m, p in zip(
                self.problem.members, self.recipe(self.state.best["params"]), strict=True
            )
        ]
        return yaml.safe_dump(config, sort_keys=False)

    def set_state(self, state: dict[str, Any]) -> None:
        """Tell the evaluated recipes to a fresh study: the search continues from its history
        (not bit-identical to an uninterrupted CMA-ES run)."""
        self.state = RecipeState.from_dict(state)
        self._new_study()
        for t in self.state.trials:
            self.study.add_trial(
                optuna.trial.create_trial(
                    params=t["params"], distributions=self.distributions, value=t["fitness"]
                )
            )

    @property
    def generations_done(self) -> int:
        return self.state.round

    @property
    def evaluations(self) -> int:
        return len(self.state.trials)

    @classmethod
    def label(cls, settings: dict[str, Any]) -> str:
        label = f"recipe search {settings.get('method', '?')} {settings.get('sampler', '?')}"
        return label + (" per-layer" if settings.get("per_layer") else "")

    @classmethod
    def recipe_note(cls, settings: dict[str, Any], complete: bool) -> str:
        if not complete:
            return "Final recipe: not written yet (recipe.yml appears when the run finishes)."
        return super().recipe_note(settings, complete)
