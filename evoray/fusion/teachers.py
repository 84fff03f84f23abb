"""Fused teachers on disk: one Arrow IPC file, memory-mapped, read a row at a time.

FuseLLM trains on every text's fused top-k distributions; held in Python memory they grow with
the corpus (hundreds of bytes per token).  ``write_teacher_store`` streams ``(target ids,
(values, indices, mask))`` rows into a file in batches, and ``TeacherStore`` maps it back so the
training loop reads only the rows of its batch; the page cache, not the heap, holds the rest.
Source shards are read the same way (``sources.iter_source_rows``): one shard at a time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from evoray.fusion import FusionError

Dist = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

_SCHEMA = pa.schema(
    [
        ("ids", pa.list_(pa.int32())),
        ("k", pa.int32()),
        ("values", pa.list_(pa.float32())),
        ("indices", pa.list_(pa.int32())),
        ("mask", pa.list_(pa.bool_())),
    ]
)


def write_teacher_store(
    path: str | Path, rows: Iterable[tuple[list[int], Dist]], batch_rows: int = 512
) -> Path:
    """Write ``(ids, (values, indices, mask))`` rows to ``path`` (atomically: temp + rename),
    ``batch_rows`` at a time; returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cols: dict[str, list] = {name: [] for name in _SCHEMA.names}
    n = 0
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _SCHEMA) as writer:

        def flush() -> None:
            writer.write_batch(pa.record_batch(cols, schema=_SCHEMA))
            for c in cols.values():
                c.clear()

        for ids, (v, ix, m) in rows:
            if v.shape != ix.shape or v.dim() != 2 or m.shape != (v.shape[0],):
                raise FusionError(f"teacher {n}: values/indices [seq, k] and mask [seq] expected")
            cols["ids"].append(np.asarray(ids, dtype=np.int32))
            cols["k"].append(v.shape[1])
            cols["values"].append(v.float().numpy().reshape(-1))
            cols["indices"].append(ix.to(torch.int32).numpy().reshape(-1))
            cols["mask"].append(m.numpy())
            n += 1
            if len(cols["ids"]) >= batch_rows:
                flush()
        if cols["ids"]:
            flush()
    if n == 0:
        tmp.unlink()
        raise FusionError("no teacher rows to store (empty corpus?)")
    os.replace(tmp, path)
    return path


class _Ids:
    """Target token ids per text, read from the store's ``ids`` column on demand."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self._col = column

    def __len__(self) -> int:
        return len(self._col)

    def __getitem__(self, i: int) -> np.ndarray:
        return self._col[i].values.to_numpy(zero_copy_only=False)

    def __iter__(self) -> Iterator[np.ndarray]:
        for i in range(len(self)):
            yield self[i]


class TeacherStore:
    """Read-only, memory-mapped view of a ``write_teacher_store`` file, or of a folder of
    ``part-*.arrow`` files read in order (``build_teachers``): ``store[i]`` is text ``i``'s
    ``(values, indices, mask)`` and ``store.ids[i]`` its target ids."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        files = sorted(self.path.glob("part-*.arrow")) if self.path.is_dir() else [self.path]
        if not files:
            raise FusionError(f"no part-*.arrow teacher files in {self.path}")
        try:
            tables = [pa.ipc.open_file(pa.memory_map(str(f))).read_all() for f in files]
        except (OSError, pa.ArrowInvalid) as exc:
            raise FusionError(f"cannot read teacher store {self.path}: {exc}") from None
        self._table = pa.concat_tables(tables)  # zero-copy: chunks stay mapped
        self.ids = _Ids(self._table.column("ids"))
        self._k = self._table.column("k")
        self._values = self._table.column("values")
        self._indices = self._table.column("indices")
        self._mask = self._table.column("mask")

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, i: int) -> Dist:
        k = self._k[i].as_py()
        values = self._values[i].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        indices = self._indices[i].values.to_numpy(zero_copy_only=False).reshape(-1, k)
        mask = self._mask[i].values.to_numpy(zero_copy_only=False)
        return (
            torch.from_numpy(values.copy()),
            torch.from_numpy(indices.copy()),
            torch.from_numpy(mask.astype(bool)),
        )
