"""Tests for the Parquet run log (evoray.runlog)."""

from __future__ import annotations

import datetime as dt
import errno
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

import evoray.runlog as runlog_mod
from evoray.errors import EvorayError
from evoray.runlog import SCHEMA, RunLog, RunLogError, gen_path, read_log


def row(individual: int, generation: int = 0, **kw: Any) -> dict[str, Any]:
    base = {
        "individual": individual,
        "parents": [individual, individual + 1],
        "operator": "de/rand/1",
        "seed": 1000 * generation + individual,
        "fitness": 0.5 + 0.01 * individual + generation,
        "accepted": individual % 2 == 0,
        "wall_time_s": 2.0,
        "eval_time_s": 1.5,
        "device": "cuda:0",
        "scores": {"books/accuracy": 0.1 * individual, "movies/accuracy": 0.2},
    }
    return {**base, **kw}


def fill(log: RunLog, generation: int, n: int = 3, **kw: Any) -> None:
    for i in range(n):
        log.append(row(i, generation, **kw))


@pytest.fixture
def log(tmp_path: Path) -> RunLog:
    return RunLog(tmp_path, run_id="run-1", strategy="evolver")


def test_round_trip_several_generations(log: RunLog, tmp_path: Path) -> None:
    when = dt.datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone.utc)
    for g in (2, 0, 1):  # commit order does not matter
        for i in (2, 0, 1):  # nor append order
            log.append(
                row(i, g, settings={"F": 0.5, "CR": None}, kinship_to_parent=0.9, timestamp=when)
            )
        assert log.commit_generation(g) == gen_path(tmp_path, g)
    assert log.committed_generations() == [0, 1, 2]
    assert len(log) == 0

    df = read_log(tmp_path)
    assert len(df) == 9
    assert df["generation"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert df["individual"].tolist() == [0, 1, 2] * 3
    assert (df["run_id"] == "run-1").all() and (df["strategy"] == "evolver").all()
    assert [list(p) for p in df["parents"][:3]] == [[0, 1], [1, 2], [2, 3]]
    assert df["fitness"].tolist() == pytest.approx(
        [0.5, 0.51, 0.52, 1.5, 1.51, 1.52, 2.5, 2.51, 2.52]
    )
    assert df["accepted"].tolist() == [True, False, True] * 3
    assert df["F"].eq(0.5).all() and df["CR"].isna().all()
    assert df["timestamp"].eq(pd.Timestamp(when)).all()
    assert str(df["timestamp"].dtype) == "datetime64[us, UTC]"
    assert df["dev/books/accuracy"].tolist() == pytest.approx([0.0, 0.1, 0.2] * 3)
    assert df["dev/movies/accuracy"].eq(0.2).all()
    assert "scores" not in df.columns
    assert df["node"].ne("").all()  # defaults to the hostname


def test_file_has_the_schema(log: RunLog) -> None:
    fill(log, 0)
    table = pq.read_table(log.commit_generation(0))
    assert table.schema.equals(SCHEMA)


def test_scores_not_expanded_and_missing_scores(log: RunLog, tmp_path: Path) -> None:
    log.append(row(0, scores={"a/acc": 1.0}))
    log.append(row(1, scores={}))
    log.append({k: v for k, v in row(2).items() if k != "scores"})
    log.append(row(3, scores={"books/accuracy": 0.5}))
    log.commit_generation(0)
    raw = read_log(tmp_path, expand_scores=False)
    assert raw["scores"].tolist()[:2] == [{"a/acc": 1.0}, {}]
    wide = read_log(tmp_path)
    assert wide["dev/a/acc"].tolist()[0] == 1.0
    assert math.isnan(wide["dev/a/acc"].tolist()[1])
    assert wide.columns.tolist()[-3:] == ["timestamp", "dev/a/acc", "dev/books/accuracy"]


def test_empty_log_has_the_columns(log: RunLog, tmp_path: Path) -> None:
    df = read_log(tmp_path)
    assert df.empty
    assert df.columns.tolist() == [n for n in SCHEMA.names if n != "scores"]


def test_missing_run_dir_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(RunLogError, match="no run log"):
        read_log(tmp_path / "nope")


def test_buffered_rows_are_not_visible(log: RunLog, tmp_path: Path) -> None:
    fill(log, 0)
    log.commit_generation(0)
    fill(log, 1)
    assert len(log) == 3
    df = read_log(tmp_path)  # a reader during generation 1's evaluations
    assert df["generation"].unique().tolist() == [0]
    assert log.committed_generations() == [0]
    log.commit_generation(1)
    assert read_log(tmp_path)["generation"].unique().tolist() == [0, 1]


def test_recommit_replaces_never_duplicates(log: RunLog, tmp_path: Path) -> None:
    fill(log, 0)
    log.commit_generation(0)
    fill(log, 1, n=3)
    log.commit_generation(1)
    # resume: a new process re-evaluates generation 1 with different results
    again = RunLog(tmp_path, run_id="run-1", strategy="evolver")
    fill(again, 1, n=2, fitness=9.0)
    again.commit_generation(1)
    df = read_log(tmp_path)
    assert len(df) == 5
    g1 = df[df["generation"] == 1]
    assert g1["individual"].tolist() == [0, 1]
    assert g1["fitness"].eq(9.0).all()
    assert again.committed_generations() == [0, 1]
    assert sorted(p.name for p in (tmp_path / "log").iterdir()) == [
        "gen-000000.parquet",
        "gen-000001.parquet",
    ]


def test_empty_generation_commits(log: RunLog, tmp_path: Path) -> None:
    log.commit_generation(0)
    assert log.committed_generations() == [0]
    assert read_log(tmp_path).empty


def test_numpy_values_are_accepted(log: RunLog, tmp_path: Path) -> None:
    log.append(
        row(
            np.int64(0),
            seed=np.int64(7),
            fitness=np.float32(0.25),
            accepted=np.bool_(True),
            parents=(np.int32(1),),
            scores={"a/acc": np.float64(0.5)},
        )
    )
    log.commit_generation(0)
    df = read_log(tmp_path)
    assert df["fitness"].item() == 0.25 and df["accepted"].item()
    assert df["seed"].item() == 7


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"colour": "red"}, "colour"),
        ({"fitness": "high"}, "fitness"),
        ({"fitness": None}, "fitness"),
        ({"accepted": 1}, "accepted"),
        ({"individual": 1.0}, "individual"),
        ({"individual": True}, "individual"),
        ({"individual": -1}, "individual"),
        ({"seed": 2**64}, "seed"),
        ({"parents": [0, "1"]}, "parents"),
        ({"parents": 3}, "parents"),
        ({"F": "0.5"}, "F"),
        ({"operator": None}, "operator"),
        ({"timestamp": dt.datetime(2025, 1, 1)}, "timestamp"),
        ({"timestamp": "2025-01-01"}, "timestamp"),
        ({"scores": {"a": "x"}}, "scores"),
        ({"scores": [("a", 1.0)]}, "scores"),
        ({"run_id": "other"}, "run_id"),
    ],
)
def test_bad_rows_are_rejected(log: RunLog, change: dict[str, Any], field: str) -> None:
    with pytest.raises(ValueError, match=repr(field)):
        log.append({**row(0), **change})
    assert len(log) == 0


def test_missing_field_and_duplicate_individual(log: RunLog) -> None:
    bad = row(0)
    del bad["fitness"]
    with pytest.raises(ValueError, match="'fitness'"):
        log.append(bad)
    log.append(row(0))
    with pytest.raises(ValueError, match="already appended"):
        log.append(row(0))
    assert len(log) == 1


def test_generation_in_row_must_match_commit(log: RunLog) -> None:
    log.append({**row(0), "generation": 3})
    with pytest.raises(ValueError, match="'generation'"):
        log.commit_generation(4)
    assert log.commit_generation(3).name == "gen-000003.parquet"


def test_disk_full_keeps_earlier_generations(
    log: RunLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(log, 0)
    log.commit_generation(0)
    fill(log, 1)
    log.commit_generation(1)
    before = {p.name: p.read_bytes() for p in (tmp_path / "log").iterdir()}

    def full_disk(table, f) -> None:
        f.write(b"PAR1 half a file")  # some bytes land, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runlog_mod, "_write_table", full_disk)
    fill(log, 1, fitness=5.0)  # a retry of generation 1 fails ...
    with pytest.raises(RunLogError, match=r"gen-000001\.parquet") as err:
        log.commit_generation(1)
    assert isinstance(err.value, EvorayError)
    assert "intact" in str(err.value) and "No space left" in str(err.value)
    # ... leaving the old generation 1 and no temp file behind
    assert {p.name: p.read_bytes() for p in (tmp_path / "log").iterdir()} == before
    with pytest.raises(RunLogError, match=r"gen-000001\.parquet"):
        log.commit_generation(1)
    assert read_log(tmp_path)["fitness"].lt(5.0).all()

    monkeypatch.undo()  # space freed: the kept buffer commits
    assert len(log) == 3
    log.commit_generation(1)
    assert read_log(tmp_path).query("generation == 1")["fitness"].eq(5.0).all()


def test_crash_leftovers_are_ignored(log: RunLog, tmp_path: Path) -> None:
    fill(log, 0)
    good = log.commit_generation(0)
    # a process killed mid-write leaves a truncated temp file, and stray files may appear
    (tmp_path / "log" / "gen-000001.parquet.1a2b3c4d.tmp").write_bytes(good.read_bytes()[:40])
    (tmp_path / "log" / "gen-000002.parquet.tmp").write_bytes(b"PAR1")
    (tmp_path / "log" / "notes.txt").write_text("hello")
    assert log.committed_generations() == [0]
    df = read_log(tmp_path)
    assert df["generation"].unique().tolist() == [0]
    assert len(df) == 3


def test_folder_readers_skip_the_temp_file_of_a_write_in_progress(
    log: RunLog, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fill(log, 0)
    log.commit_generation(0)
    seen: list[pd.DataFrame] = []
    real_replace = runlog_mod.os.replace

    def read_mid_write(src, dst) -> None:  # the temp file is complete, not yet renamed
        assert Path(src).exists()
        seen.append(pd.read_parquet(tmp_path / "log"))
        real_replace(src, dst)

    monkeypatch.setattr(runlog_mod.os, "replace", read_mid_write)
    fill(log, 1)
    log.commit_generation(1)
    (mid,) = seen
    assert mid["generation"].unique().tolist() == [0]  # generation 1's temp file was skipped
    monkeypatch.undo()
    # a temp file left by a killed writer is skipped too
    (tmp_path / "log" / ".gen-000002.parquet.1a2b3c4d.tmp").write_bytes(b"PAR1 half")
    assert sorted(pd.read_parquet(tmp_path / "log")["generation"].unique()) == [0, 1]


def test_corrupt_committed_file_is_named(log: RunLog, tmp_path: Path) -> None:
    fill(log, 0)
    path = log.commit_generation(0)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(RunLogError, match=r"gen-000000\.parquet"):
        read_log(tmp_path)
