"""The run log: one Parquet row per evaluated individual, one file per generation.

Search runs last hours and evaluate thousands of offspring; the log must be readable (with
pandas) while the run is going and must lose nothing that was committed when the process dies.
So rows are buffered per generation and each generation is written as its own file
``run_dir/log/gen-000123.parquet`` by temp file + fsync + rename: a reader sees either the whole
generation or none of it, and a crash or a full disk never touches earlier generations.
Committing a generation again replaces its file, so a resumed or retried generation is never
counted twice.

Per-task scores vary by run, so they are stored in one ``scores`` map column (``"<task>/<metric>"``
→ value) and ``read_log`` expands them into ``"dev/<task>/<metric>"`` columns.
"""

from __future__ import annotations

import datetime as dt
import json
import numbers
import os
import re
import socket
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from evoray.errors import EvorayError

SCHEMA = pa.schema(
    [
        pa.field("run_id", pa.string(), nullable=False),
        pa.field("strategy", pa.string(), nullable=False),
        pa.field("generation", pa.int32(), nullable=False),
        pa.field("individual", pa.int32(), nullable=False),
        pa.field("parents", pa.list_(pa.int32()), nullable=False),
        pa.field("operator", pa.string(), nullable=False),
        # The strategy's own per-row settings (Evolver's F, CR, mutation; a merge method...),
        # JSON-encoded scalars; ``read_log`` decodes them into columns of their names.
        pa.field("settings", pa.map_(pa.string(), pa.string()), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("fitness", pa.float64(), nullable=False),
        pa.field("accepted", pa.bool_(), nullable=False),
        pa.field("kinship_to_parent", pa.float64()),
        pa.field("wall_time_s", pa.float64(), nullable=False),
        pa.field("eval_time_s", pa.float64(), nullable=False),
        pa.field("node", pa.string(), nullable=False),
        pa.field("device", pa.string(), nullable=False),
        # Racing (evoray.strategies.racing): dev examples scored, and whether racing stopped
        # the build early. Null in logs written before these columns existed.
        pa.field("dev_examples", pa.int64()),
        pa.field("racing_stopped", pa.bool_()),
        pa.field("timestamp", pa.timestamp("us", tz="UTC"), nullable=False),
        pa.field("scores", pa.map_(pa.string(), pa.float64()), nullable=False),
    ]
)
SCORE_PREFIX = "dev/"
LOG_DIR = "log"
_GEN_FILE = re.compile(r"^gen-(\d{6,})\.parquet$")

# Fields a caller must give; the rest are filled in: run_id/strategy from the RunLog,
# generation at commit, kinship_to_parent None, node the hostname, timestamp now, scores and
# settings {}.
REQUIRED = (
    "individual",
    "parents",
    "operator",
    "seed",
    "fitness",
    "accepted",
    "wall_time_s",
    "eval_time_s",
    "device",
)
_INT = {"generation", "individual", "seed"}
_FLOAT = {"fitness", "wall_time_s", "eval_time_s"}
_NULLABLE_FLOAT = {"kinship_to_parent"}
_NULLABLE = {"dev_examples", "racing_stopped"}
_STR = {"run_id", "strategy", "operator", "node", "device"}
_INT32_MAX = 2**31 - 1


class RunLogError(EvorayError):
    """The run log cannot be written or read (disk full, unwritable folder, corrupt file)."""


def gen_path(run_dir: Path, generation: int) -> Path:
    """Where generation ``generation``'s rows live."""
    return Path(run_dir) / LOG_DIR / f"gen-{generation:06d}.parquet"


def _committed(log_dir: Path) -> dict[int, Path]:
    out = {}
    if log_dir.is_dir():
        for p in log_dir.iterdir():
            m = _GEN_FILE.match(p.name)
            if m:
                out[int(m.group(1))] = p
    return dict(sorted(out.items()))


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_float(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check(name: str, value: Any) -> Any:
    """Validate one field and return it in the form pyarrow takes; ValueError names the field."""

    def bad(expected: str) -> ValueError:
        return ValueError(
            f"run log field {name!r}: expected {expected}, got {type(value).__name__} {value!r}"
        )

    if name in _NULLABLE and value is None:
        return None
    if name == "dev_examples":
        if not _is_int(value) or value < 0:
            raise bad("a non-negative int or None")
        return int(value)
    if name == "racing_stopped":
        if not isinstance(value, (bool, np.bool_)):
            raise bad("a bool or None")
        return bool(value)
    if name in _INT:
        if not _is_int(value):
            raise bad("an int")
        value = int(value)
        if name != "seed" and not 0 <= value <= _INT32_MAX:
            raise bad("a non-negative int32")
        if name == "seed" and not -(2**63) <= value < 2**63:
            raise bad("an int64")
        return value
    if name in _FLOAT or name in _NULLABLE_FLOAT:
        if value is None and name in _NULLABLE_FLOAT:
            return None
        if not _is_float(value):
            raise bad("a float" + (" or None" if name in _NULLABLE_FLOAT else ""))
        return float(value)
    if name in _STR:
        if not isinstance(value, str):
            raise bad("a str")
        return value
    if name == "accepted":
        if not isinstance(value, (bool, np.bool_)):
            raise bad("a bool")
        return bool(value)
    if name == "parents":
        if not isinstance(value, (list, tuple)) or not all(_is_int(p) for p in value):
            raise bad("a list of ints")
        if not all(0 <= p <= _INT32_MAX for p in value):
            raise bad("a list of non-negative int32")
        return [int(p) for p in value]
    if name == "timestamp":
        if not isinstance(value, dt.datetime):
            raise bad("a datetime")
        if value.tzinfo is None:
            raise bad("a timezone-aware datetime (naive ones are ambiguous)")
        return value.astimezone(dt.timezone.utc)
    if name == "scores":
        if not isinstance(value, dict):
            raise bad("a dict of str to float")
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise bad("non-empty str keys")
            if not _is_float(v):
                raise ValueError(f"run log field 'scores' key {k!r}: expected a float, got {v!r}")
        return {k: float(v) for k, v in value.items()}
    if name == "settings":
        if not isinstance(value, dict):
            raise bad("a dict of str to JSON scalars")
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise bad("non-empty str keys")
            if v is not None and not isinstance(v, (str, bool, numbers.Real)):
                raise ValueError(
                    f"run log field 'settings' key {k!r}: expected a str, number, bool or None, "
                    f"got {v!r}"
                )
        return {
            k: json.dumps(v.item() if isinstance(v, np.generic) else v) for k, v in value.items()
        }
    raise ValueError(f"unknown run log field {name!r}; known fields: {', '.join(SCHEMA.names)}")


def _write_table(table: pa.Table, f) -> None:
    """The actual bytes-out step (a seam for tests that simulate a full disk)."""
    pq.write_table(table, f)


class RunLog:
    """Streams a search run's evaluations to ``run_dir/log/`` one generation at a time.

    ``append`` buffers rows of the generation being evaluated; ``commit_generation`` makes them
    durable and visible. Safe to call from several threads of one process.
    """

    def __init__(self, run_dir: Path, *, run_id: str, strategy: str) -> None:
        self.run_dir = Path(run_dir)
        self.log_dir = self.run_dir / LOG_DIR
        self.run_id = _check("run_id", run_id)
        self.strategy = _check("strategy", strategy)
        self._node = socket.gethostname()
        self._rows: list[dict[str, Any]] = []
        self._individuals: set[int] = set()
        self._lock = threading.Lock()
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RunLogError(f"cannot create run log folder {self.log_dir}: {e}") from e

    def __len__(self) -> int:
        """Rows buffered and not yet committed."""
        return len(self._rows)

    def append(self, row: dict[str, Any]) -> None:
        """Validate and buffer one evaluation; ValueError names a missing, unknown or bad field.

        ``generation`` may be given (it must then match the later commit); ``run_id`` and
        ``strategy``, if given, must match this log's.
        """
        unknown = sorted(set(row) - set(SCHEMA.names))
        if unknown:
            raise ValueError(
                f"unknown run log field {unknown[0]!r}; known fields: {', '.join(SCHEMA.names)}"
            )
        missing = [k for k in REQUIRED if k not in row]
        if missing:
            raise ValueError(f"run log row is missing required field {missing[0]!r}")
        out = {k: _check(k, v) for k, v in row.items()}
        for k in ("run_id", "strategy"):
            if k in out and out[k] != getattr(self, k):
                raise ValueError(
                    f"run log field {k!r}: row says {out[k]!r} but this log is {getattr(self, k)!r}"
                )
        out["run_id"], out["strategy"] = self.run_id, self.strategy
        out.setdefault("node", self._node)
        out.setdefault("timestamp", dt.datetime.now(dt.timezone.utc))
        out.setdefault("scores", {})
        out.setdefault("settings", {})
        for k in (*_NULLABLE_FLOAT, *_NULLABLE):
            out.setdefault(k, None)
        with self._lock:
            if out["individual"] in self._individuals:
                raise ValueError(
                    f"run log field 'individual': {out['individual']} was already appended "
                    "in this generation"
                )
            self._individuals.add(out["individual"])
            self._rows.append(out)

    def commit_generation(self, generation: int) -> Path:
        """Write the buffered rows as generation ``generation`` atomically; returns the file.

        Replaces an existing file for the same generation (resume/retry). On a write error the
        buffer is kept, so the commit can be retried, and no committed file is touched.
        """
        generation = _check("generation", generation)
        with self._lock:
            rows = self._rows
            wrong = [r for r in rows if r.get("generation", generation) != generation]
            if wrong:
                raise ValueError(
                    f"run log field 'generation': individual {wrong[0]['individual']} was "
                    f"appended for generation {wrong[0]['generation']}, committing {generation}"
                )
            rows = [{**r, "generation": generation} for r in rows]
            rows.sort(key=lambda r: r["individual"])
            table = pa.Table.from_pylist(rows, schema=SCHEMA)
            path = gen_path(self.run_dir, generation)
            _atomic_write(table, path)
            self._rows = []
            self._individuals = set()
        return path

    def committed_generations(self) -> list[int]:
        """Generations with a complete file on disk, ascending."""
        return list(_committed(self.log_dir))


def _atomic_write(table: pa.Table, path: Path) -> None:
    # A leading '.': pyarrow datasets and pd.read_parquet(log_dir) skip hidden files, so a
    # reader listing the folder mid-write never opens a half-written temp file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            _write_table(table, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunLogError(
            f"could not write run log file {path}: {e}. Earlier generations are intact; "
            "free space (or fix the folder) and commit this generation again."
        ) from e
    try:  # make the rename itself durable; not every filesystem allows fsync on a folder
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def read_log(run_dir: Path, *, expand_scores: bool = True) -> pd.DataFrame:
    """All committed generations as one DataFrame, sorted by generation then individual.

    Safe while the run is writing: temp files are ignored and generation files appear only
    complete. With ``expand_scores`` each score key ``k`` becomes a float column ``"dev/" + k``
    (NaN where a row lacks it) and the ``scores`` column is dropped; otherwise ``scores`` holds
    dicts. ``settings`` holds each row's decoded strategy settings, and each setting is also a
    column of its own name (None where a row lacks it) unless a log column has that name.
    """
    log_dir = Path(run_dir) / LOG_DIR
    if not log_dir.is_dir():
        raise RunLogError(f"no run log under {run_dir} (expected folder {log_dir})")
    tables = []
    for path in _committed(log_dir).values():
        try:
            tables.append(pq.read_table(path, schema=SCHEMA))
        except (OSError, pa.ArrowException) as e:
            raise RunLogError(f"run log file {path} is unreadable: {e}") from e
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    table = table.sort_by([("generation", "ascending"), ("individual", "ascending")])
    df = table.drop_columns(["scores", "settings"]).to_pandas()
    settings = [
        {k: json.loads(v) for k, v in d.items()}
        for d in table.column("settings").to_pandas(maps_as_pydicts="strict").tolist()
    ]
    at = df.columns.get_loc("operator") + 1  # the settings go beside the operator
    df.insert(at, "settings", pd.Series(settings, index=df.index, dtype=object))
    for i, key in enumerate(sorted({k for d in settings for k in d} - set(df.columns))):
        df.insert(at + 1 + i, key, [d.get(key) for d in settings])
    scores = table.column("scores").to_pandas(maps_as_pydicts="strict").tolist()
    if not expand_scores:
        df["scores"] = pd.Series(scores, index=df.index, dtype=object)
        return df
    # Python dicts, not the map's flat keys/items buffers: those ignore the slicing that
    # sort_by/concat leave behind.
    wide = pd.DataFrame.from_records(scores, index=df.index).astype("float64")
    wide = wide[sorted(wide.columns)]
    wide.columns = [SCORE_PREFIX + k for k in wide.columns]
    return pd.concat([df, wide], axis=1)
