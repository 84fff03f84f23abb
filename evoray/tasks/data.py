"""Reading a task's examples from the user's data: files, ``datasets`` folders or hub ids.

A split's source is a ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` file, a folder written by
``datasets`` (``save_to_disk``: a ``Dataset``, or a ``DatasetDict`` whose split is picked by
name) or, when no such path exists, a hub dataset id (``datasets.load_dataset``; needs network).
Rows come back as a list of dicts, so every kind checks its fields in one place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from evoray.errors import ConfigError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


def is_local(source: str) -> bool:
    """Whether ``source`` names a local file or folder (else it is taken as a hub id)."""
    return Path(source).exists()


def read_rows(source: str, split: str, *, limit: int | None = None) -> list[dict[str, Any]]:
    """The rows of one split, at most ``limit``; a ``ConfigError`` names an unreadable source."""
    path = Path(source)
    if path.is_file():
        rows = _read_file(path)
    elif path.is_dir():
        rows = _read_folder(path, split)
    else:
        rows = _read_hub(source, split)
    return rows[:limit] if limit is not None else rows


def _read_file(path: Path) -> list[dict[str, Any]]:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise ConfigError(f"{path}: unsupported data file type {suffix!r}; use {FILE_SUFFIXES}")
    import pandas as pd

    if suffix == ".jsonl":  # read as is: a missing key stays missing (pandas would fill NaN)
        rows = []
        for i, line in enumerate(path.read_text().splitlines()):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{path}: line {i + 1} is not JSON ({exc})") from None
        return rows
    try:
        if suffix == ".json":
            frame = pd.read_json(path, dtype=False)
        elif suffix == ".csv":
            frame = pd.read_csv(path, keep_default_na=False)
        else:
            frame = pd.read_parquet(path)
    except ValueError as exc:
        if path.stat().st_size == 0:
            return []
        raise ConfigError(f"{path}: cannot read as {suffix} ({exc})") from None
    return frame.to_dict(orient="records")


def _read_folder(path: Path, split: str) -> list[dict[str, Any]]:
    from datasets import DatasetDict, load_from_disk

    try:
        ds = load_from_disk(str(path))
    except FileNotFoundError as exc:
        raise ConfigError(
            f"{path}: not a folder written by datasets' save_to_disk ({exc}); give a data file"
        ) from None
    if isinstance(ds, DatasetDict):
        if split not in ds:
            raise ConfigError(f"{path}: no split {split!r} in this DatasetDict (has {list(ds)})")
        ds = ds[split]
    return ds.to_list()


def _read_hub(source: str, split: str) -> list[dict[str, Any]]:
    """A hub dataset (network). ``name:config`` picks a configuration."""
    from datasets import load_dataset

    name, _, config = source.partition(":")
    try:
        return load_dataset(name, config or None, split=split).to_list()
    except Exception as exc:  # hub errors come in many types; say what was tried
        raise ConfigError(
            f"{source}: not a local file or folder, and loading it as a hub dataset "
            f"(split {split!r}) failed: {exc}"
        ) from None


def check_rows(
    rows: list[dict[str, Any]],
    fields: dict[str, str],
    *,
    source: str,
    task: str,
    split: str,
    optional: tuple[str, ...] = (),
) -> None:
    """Refuse an empty split or a row without one of ``fields`` (role -> column name)."""
    if not rows:
        raise ConfigError(f"task {task!r}: split {split!r} ({source}) is empty; give examples")
    for role, column in fields.items():
        if column is None and role in optional:
            continue
        for i, row in enumerate(rows):
            value = row.get(column)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                have = sorted(row)
                raise ConfigError(
                    f"task {task!r}: {source} (split {split!r}) row {i} has no field "
                    f"{column!r} (the {role} field); its fields are {have}. Set "
                    f"fields.{role} to the column that holds it"
                )
