"""Racing: the stopping rule as pure functions, and a worker that races a tiny classifier."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoray.config.run_config import RunConfig
from evoray.errors import ConfigError
from evoray.execution.worker import OffspringWorker, WorkerSpec
from evoray.models.pool import ModelPool
from evoray.strategies.base import Offspring
from evoray.strategies.de import Recipe
from evoray.strategies.evolver import Evolver, EvolverSettings
from evoray.strategies.racing import (
    Race,
    TaskSeen,
    binomial_cdf,
    certain_upper,
    estimate,
    pooled_count,
    race_order,
    rejects,
    round_fractions,
    round_stops,
    upper_bound,
)
from evoray.tasks.evaluation import EncodedSplit
from evoray.tasks.pool import TaskPool
from evoray.weights.checkpoint import open_checkpoint
from evoray.weights.flat import flatten
from tests.lm_fixtures import TEXTS, make_model

# -- the stopping rule -------------------------------------------------------------------------


def test_rounds_double_and_stay_below_the_whole():
    assert round_fractions(0.25) == [0.25, 0.5]
    assert round_fractions(1.0) == []
    assert round_stops(10, [0.25, 0.5]) == [3, 5]
    assert round_stops(2, [0.1, 0.2, 0.4]) == [1]
    assert round_stops(1, [0.5]) == []


def test_certain_bound_is_the_unseen_all_at_the_maximum():
    tasks = [TaskSeen(2, 0.5, 4, 1.0), TaskSeen(1, 0.0, 2, 3.0)]
    # task 1: (1 + 2) / 4; task 2: (0 + 1) / 2; weights 1 and 3
    assert certain_upper(tasks) == pytest.approx((0.75 + 3 * 0.5) / 4)
    assert upper_bound(tasks, 1.0) == certain_upper(tasks)
    assert estimate(tasks) == pytest.approx(0.5 / 4)


def test_lower_confidence_gives_a_tighter_bound_never_above_the_certain_one():
    tasks = [TaskSeen(200, 0.6, 1000), TaskSeen(200, 0.7, 1000)]
    b95, b50 = upper_bound(tasks, 0.95, 3), upper_bound(tasks, 0.5, 3)
    assert estimate(tasks) < b50 < b95 < certain_upper(tasks)
    assert rejects(tasks, 0.8, 0.95, 3) and not rejects(tasks, 0.8, 1.0, 3)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.lists(st.integers(0, 1), min_size=2, max_size=40),
            st.floats(0.1, 0.95),
            st.floats(0.1, 5.0),
        ),
        min_size=1,
        max_size=3,
    ),
    st.floats(0.0, 1.0),
)
def test_certainty_never_rejects_what_the_full_dev_set_accepts(tasks, must_beat):
    w = sum(wt for _, _, wt in tasks)
    full = sum(wt * sum(x) / len(x) for x, _, wt in tasks) / w
    seen = []
    for x, frac, wt in tasks:
        m = max(1, min(len(x) - 1, int(frac * len(x))))
        seen.append(TaskSeen(m, sum(x[:m]) / m, len(x), wt))
    assert certain_upper(seen) >= full - 1e-12
    if full > must_beat:  # the full dev set would accept it
        assert not rejects(seen, must_beat, 1.0, 3)


def test_binomial_cdf_is_the_sum_of_the_pmf():
    from math import comb

    for m, p in [(1, 0.3), (7, 0.5), (40, 0.07), (96, 0.2656)]:
        for c in range(-1, m + 2):
            exact = sum(comb(m, k) * p**k * (1 - p) ** (m - k) for k in range(0, min(c, m) + 1))
            assert binomial_cdf(c, m, p) == pytest.approx(exact, rel=1e-9, abs=1e-300)


def test_binomial_test_applies_only_where_every_seen_row_weighs_the_same():
    assert pooled_count([TaskSeen(24, 0.5, 96), TaskSeen(24, 0.0, 96)]) == (12, 48)
    assert pooled_count([TaskSeen(24, 0.5, 96, 2.0), TaskSeen(48, 0.25, 96, 4.0)]) == (24, 72)
    assert pooled_count([TaskSeen(24, 0.5, 96), TaskSeen(12, 0.5, 48)]) is None  # other scales
    assert pooled_count([TaskSeen(24, 0.51, 96)]) is None  # not 0/1 scores
    # there, racing uses the Hoeffding-Serfling bound as before
    tasks = [TaskSeen(24, 0.25, 96), TaskSeen(12, 0.0, 48)]
    for must_beat in (0.2, 0.3, 0.4, 0.5):
        hoeffding = upper_bound(tasks, 0.95, 2) < must_beat - 1e-9
        assert rejects(tasks, must_beat, 0.95, 2) == hoeffding


def test_the_binomial_test_stops_what_hoeffding_cannot_on_small_slices():
    """The LM zoo's shape: 4 skills x 96 dev rows, first slice 24 rows each; an offspring of
    the colors expert (parent fitness 0.2656) that lost part of the skill: 15 of 24 colors
    rows right, none elsewhere (estimate 0.156)."""
    tasks = [TaskSeen(24, 15 / 24, 96)] + [TaskSeen(24, 0.0, 96)] * 3
    assert upper_bound(tasks, 0.95, 2) > 0.2656  # Hoeffding: cannot tell yet
    assert rejects(tasks, 0.2656, 0.95, 2)
    assert not rejects(tasks, 0.2656, 1.0, 2)  # certainty: only the worst case counts


@pytest.mark.parametrize(
    "shares",
    [(0.3,), (0.9, 0.05, 0.1, 0.0), (1.0, 0.0, 0.0, 0.0), (0.5, 0.5, 0.2, 0.2)],
)
def test_the_binomial_test_errs_at_most_its_error_probability(shares):
    """Finite dev sets whose full-dev fitness is exactly the value to beat (the hardest
    case), tasks from uniform to as unequal as a specialist's: slices drawn at random without
    replacement are rejected at most ``1 - confidence`` of the time."""
    import random

    rng = random.Random(0)
    n, seen, confidence, trials = 96, 24, 0.9, 3000
    rows = [[1] * round(p * n) + [0] * (n - round(p * n)) for p in shares]
    full = sum(sum(r) / n for r in rows) / len(rows)
    wrong = 0
    for _ in range(trials):
        tasks = [TaskSeen(seen, sum(rng.sample(r, seen)) / seen, n) for r in rows]
        wrong += rejects(tasks, full, confidence, 1)
    assert wrong / trials <= (1 - confidence) + 0.02, wrong / trials


def test_evolver_settings_name_the_racing_field():
    with pytest.raises(ValueError, match=r"evolver\.racing_confidence"):
        EvolverSettings(racing_confidence=0.0)
    with pytest.raises(ValueError, match=r"evolver\.racing_first"):
        EvolverSettings(racing_first=1.5)


def test_evolver_asks_racing_only_when_on():
    from evoray.strategies.base import Problem

    def builds(**kw):
        ev = Evolver(EvolverSettings(generations=1, **kw), Problem(n_members=3, has_base=False))
        ev.state.fitness = [0.1, 0.2, 0.3]
        return next(ev.generation()).evaluate

    assert all(isinstance(b, Offspring) and b.race is None for b in builds())
    raced = builds(racing=True, racing_confidence=0.9, racing_first=0.5)
    assert [b.race for b in raced] == [
        Race([0.1, 0.2, 0.3][b.recipe.target], 0.9, 0.5) for b in raced
    ]


def test_config_types_and_tasks_checked(tmp_path: Path):
    base = {"models": {"zoo": {}}}
    with pytest.raises(ConfigError, match=r"evolver\.racing_confidence"):
        RunConfig.from_dict({**base, "evolver": {"racing_confidence": "high"}}, cwd=tmp_path)
    with pytest.raises(ConfigError, match=r"evolver\.racing"):
        RunConfig.from_dict({**base, "evolver": {"racing": "yes"}}, cwd=tmp_path)
    data = tmp_path / "lm.jsonl"
    data.write_text('{"text": "hello there"}\n{"text": "a b c"}\n')
    tasks = [{"name": "lm", "kind": "text", "data": {"dev": str(data)}}]
    with pytest.raises(ConfigError, match=r"evolver\.racing.*task 'lm' metric 'loglik'"):
        RunConfig.from_dict({**base, "tasks": tasks, "evolver": {"racing": True}}, cwd=tmp_path)
    RunConfig.from_dict({**base, "tasks": tasks}, cwd=tmp_path)  # racing off: fine


# -- a worker racing a tiny classifier ---------------------------------------------------------


@dataclass(frozen=True)
class TwoTasks(TaskPool):
    """Two 3-label tasks of different sizes and weights over the fixture texts."""

    kind: ClassVar[str] = "test_two"

    def names(self) -> list[str]:
        return ["a", "b"]

    def weight(self, task: str) -> float:
        return 1.0 if task == "a" else 2.0

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        out = {}
        for name, reps, shift in (("a", 6, 0), ("b", 4, 1)):
            texts = (TEXTS * reps)[: len(TEXTS) * reps]
            enc = tokenizer(texts, padding=True, return_tensors="pt")
            labels = (torch.arange(len(texts)) * 7 + shift) % 3
            out[name] = EncodedSplit(enc["input_ids"], enc["attention_mask"], labels)
        return out


def test_encoded_split_subset():
    s = EncodedSplit(torch.arange(10).view(5, 2), torch.ones(5, 2), torch.arange(5))
    sub = s.subset(1, 3)
    assert len(sub) == 2 and sub.labels.tolist() == [1, 2]


def test_worker_racing_at_certainty_accepts_exactly_what_full_dev_accepts(tmp_path: Path):
    members = [str(make_model(tmp_path / f"m{i}", "bert", seed=0, noise=0.3 * i)) for i in range(4)]
    pool = ModelPool(tuple(members))
    layout = pool.layout()
    worker = OffspringWorker(WorkerSpec(members[0], layout, TwoTasks()))
    flats = []
    for m in members:
        with open_checkpoint(m) as c:
            flats.append(flatten(c, layout).data)
    worker.set_population(*flats)
    parent = [worker.evaluate_vector(f)["fitness"] for f in flats]
    n = sum(len(d) for d in worker.dev.values())
    recipes = [
        Recipe(target=i % 4, refs=((i + 1 + i // 4) % 4,), F=0.9, CR=0.7, seed=i) for i in range(12)
    ]
    stopped = 0
    for r in recipes:
        full = worker.evaluate_recipe(r.to_dict())
        assert full["examples"] == n and not full["racing_stopped"]
        for confidence in (1.0, 0.6):
            race = Race(parent[r.target], confidence, 0.25)
            raced = worker.evaluate_recipe({**r.to_dict(), "race": race.to_dict()})
            if raced["racing_stopped"]:
                stopped += 1
                assert raced["examples"] < n
                assert raced["fitness"] < parent[r.target]  # never accepted
                if confidence == 1.0:
                    assert not full["fitness"] > parent[r.target]
            else:  # a survivor: only its unseen rows scored, combined into the full-dev scores
                assert raced["fitness"] == full["fitness"]  # exactly, not approximately
                metric = worker.spec.tasks.metric
                assert raced["scores"] == {
                    t: {metric(t): full["scores"][t][metric(t)]} for t in "ab"
                }
                assert raced["examples"] == n
    assert stopped  # the case is exercised
    # must-beat values above any offspring: certainty rejects them all early
    race = Race(2.0, 1.0, 0.25)
    assert worker.evaluate_recipe({**recipes[0].to_dict(), "race": race.to_dict()})[
        "racing_stopped"
    ]


def test_logs_from_before_racing_read_with_null_columns(tmp_path: Path):
    import datetime as dt

    import pyarrow as pa
    import pyarrow.parquet as pq

    from evoray.runlog import SCHEMA, read_log

    old = pa.schema([f for f in SCHEMA if f.name not in ("dev_examples", "racing_stopped")])
    (tmp_path / "log").mkdir()
    row = dict(
        run_id="r", strategy="evolver", generation=0, individual=0, parents=[0], operator="x",
        settings=[], seed=1, fitness=0.5, accepted=True, kinship_to_parent=None,
        wall_time_s=1.0, eval_time_s=1.0, node="n", device="cpu",
        timestamp=dt.datetime.now(dt.timezone.utc), scores=[("a", 1.0)],
    )  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row], schema=old), tmp_path / "log/gen-000000.parquet")
    df = read_log(tmp_path)
    assert df["racing_stopped"].tolist() == [None] and df["dev_examples"].isna().all()


# -- slices: shuffled, each row scored once ----------------------------------------------------


def test_race_order_is_a_fixed_permutation_per_task_the_same_in_any_process():
    import subprocess
    import sys

    order = race_order("books", 50)
    assert sorted(order) == list(range(50)) and order != list(range(50))
    assert race_order("books", 50) == order and race_order("movies", 50) != order
    code = "from evoray.strategies.racing import race_order; print(race_order('books', 50))"
    env = {"PYTHONHASHSEED": "123", "PYTHONPATH": str(Path(__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == str(order), out.stderr


def test_take_keeps_rows_in_the_given_order():
    from evoray.tasks.kinds import LMData

    s = EncodedSplit(torch.arange(10).view(5, 2), torch.ones(5, 2), torch.arange(5))
    assert s.take([3, 0]).labels.tolist() == [3, 0]
    lm = LMData(s, torch.arange(5), "dev", answers=tuple("abcde"), answer_lengths=torch.ones(5))
    sub = lm.take([4, 1])
    assert sub.answers == ("e", "b") and sub.split.input_ids.tolist() == [[8, 9], [2, 3]]
    assert len(sub.answer_lengths) == 2 and sub.tokenizer is None


@dataclass(frozen=True)
class SortedTasks(TaskPool):
    """Dev rows labelled by their row number; the 'model' scores a row 1 when its number is in
    the task's top ``share`` (so the data is sorted: all zeros, then all ones). Scored rows are
    recorded, per task, in the order they were scored."""

    kind: ClassVar[str] = "test_sorted"
    sizes: tuple = (("a", 400), ("b", 200))
    share: float = 0.5
    scored: dict = None  # type: ignore[assignment]

    def names(self) -> list[str]:
        return [t for t, _ in self.sizes]

    def encode(self, tokenizer: Any, split: str) -> dict[str, EncodedSplit]:
        return {
            t: EncodedSplit(torch.zeros(n, 1), torch.ones(n, 1), torch.arange(n))
            for t, n in self.sizes
        }

    def evaluate(self, model: Any, data: dict, *, batch_size: int = 512) -> dict:
        out = {}
        for t, d in data.items():
            n = dict(self.sizes)[t]
            self.scored.setdefault(t, []).extend(d.labels.tolist())
            out[t] = {"accuracy": float((d.labels >= n * (1 - self.share)).double().mean())}
        return out


def fake_worker(tasks: SortedTasks) -> Any:
    from types import SimpleNamespace

    spec = SimpleNamespace(tasks=tasks, batch_size=64)
    return SimpleNamespace(spec=spec, dev=tasks.encode(None, "dev"), model=None)


def test_slices_are_random_samples_of_sorted_dev_rows_and_each_row_is_scored_once():
    from evoray.execution.racing import race_scores

    tasks = SortedTasks(scored={})
    # full dev: 0.5 per task, above 0.45: accepted; prefix slices (all zeros) would reject it
    out = race_scores(fake_worker(tasks), Race(0.45, 0.95, 0.25))
    assert not out["racing_stopped"] and out["examples"] == 600
    assert out["fitness"] == 0.5 and out["scores"] == {
        "a": {"accuracy": 0.5},
        "b": {"accuracy": 0.5},
    }
    for t, n in tasks.sizes:
        rows = tasks.scored[t]
        assert sorted(rows) == list(range(n))  # every row once: nothing re-scored
        first = rows[: n // 4]
        assert 0.3 < sum(r >= n / 2 for r in first) / len(first) < 0.7  # a mixed first slice


def test_a_large_gap_is_rejected_at_the_first_slice():
    from evoray.execution.racing import race_scores

    # the classifier zoo's dev size: 4 tasks x 128 rows; a candidate at 0.3 racing a 0.7 parent
    sizes = tuple((t, 128) for t in "abcd")
    tasks = SortedTasks(sizes=sizes, share=0.3, scored={})
    out = race_scores(fake_worker(tasks), Race(0.7, 0.95, 0.25))
    assert out["racing_stopped"] and out["examples"] == 4 * 32
    assert out["fitness"] < 0.7
