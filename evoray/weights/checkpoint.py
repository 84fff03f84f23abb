"""Lazy, read-only access to model checkpoints: ``open_checkpoint`` and the ``Checkpoint`` view.

A merge touches every tensor of several models but needs only a few in memory at a time, so
opening reads nothing but headers (``tensor_files``, validated there) and ``Checkpoint.get``
reads one tensor on demand. Sources (folders, files, hub ids) are resolved by ``sources``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evoray.errors import CheckpointError
from evoray.weights.sources import read_config, resolve_source
from evoray.weights.tensor_files import (
    PICKLE_SUFFIXES,
    Entry,
    TensorInfo,
    folder_entries,
    load_pickle,
    pickle_entries,
    pickle_refusal,
    safetensors_entries,
)

__all__ = ["Checkpoint", "open_checkpoint"]


class Checkpoint:
    """Lazy read-only view of one model's tensors; nothing is read until ``get()``.

    Built by :func:`open_checkpoint`.  File handles are opened on first use and kept, so reading
    many tensors from one shard pays the open cost once; ``close()`` (or ``with``) releases them.
    """

    def __init__(
        self,
        *,
        source: str,
        path: Path,
        folder: Path | None,
        config: dict | None,
        entries: dict[str, Entry],
        fmt: str,
    ) -> None:
        self.source = source
        self.path = path
        self.folder = folder
        self.config = config
        self.format = fmt  # "safetensors" or "pickle"
        self._entries = entries
        self._handles: dict[Path, Any] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._lock = threading.Lock()

    # -- metadata -----------------------------------------------------------------------------

    def names(self) -> list[str]:
        """All tensor names in file/index order."""
        return list(self._entries)

    def info(self, name: str) -> TensorInfo:
        """Shape and dtype of ``name`` from the headers; no tensor data is read."""
        return self._entry(name).info

    @property
    def files(self) -> list[Path]:
        """Weight files backing this checkpoint, in first-use order."""
        return list(dict.fromkeys(e.file for e in self._entries.values()))

    @property
    def nbytes(self) -> int:
        """Total bytes of all tensors, from the headers."""
        return sum(e.nbytes for e in self._entries.values())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __repr__(self) -> str:
        return f"Checkpoint({self.source!r}, tensors={len(self)}, format={self.format})"

    # -- data ---------------------------------------------------------------------------------

    def get(self, name: str) -> torch.Tensor:
        """Read only tensor ``name`` into CPU memory."""
        entry = self._entry(name)
        if self.format == "pickle":
            # Cloned so in-place edits by a caller cannot leak into later reads.
            return self._pickle_file(entry.file)[name].clone()
        handle = self._handle(entry.file)
        try:
            return handle.get_tensor(name)
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(
                f"Cannot read tensor {name!r} from {entry.file} (checkpoint {self.source!r}): {e}. "
                "The file may have changed or be damaged since it was opened; re-download it."
            ) from e

    def file_of(self, name: str) -> Path:
        """The weight file that holds tensor ``name`` (for error messages)."""
        return self._entry(name).file

    def check_finite(self, name: str, tensor: torch.Tensor) -> None:
        """CheckpointError naming file, tensor and count if ``tensor`` (read from this
        checkpoint as ``name``) holds NaN or Inf: merged or compared, such values silently
        poison the result (a NaN merge, ``nan`` kinship)."""
        if not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()):
            return
        bad = tensor.numel() - int(torch.isfinite(tensor).sum())
        raise CheckpointError(
            f"{self.file_of(name)}: tensor {name!r} of {self.source!r} has {bad:,} non-finite "
            f"values (NaN or Inf) out of {tensor.numel():,}; the result would be NaN. Repair or "
            "re-download the checkpoint, or pass --allow-nonfinite to use it anyway"
        )

    def close(self) -> None:
        """Release open file handles; the checkpoint can still be used and reopens them."""
        with self._lock:
            self._handles.clear()
            self._pickles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------------

    def _entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise CheckpointError(
                f"Tensor {name!r} is not in checkpoint {self.source!r} ({len(self)} tensors). "
                "Check the tensor name, or that all models share one architecture."
            ) from None

    def _handle(self, file: Path) -> Any:
        with self._lock:
            handle = self._handles.get(file)
            if handle is None:
                try:
                    handle = safe_open(str(file), framework="pt", device="cpu")
                except Exception as e:
                    raise CheckpointError(
                        f"Cannot open {file} (checkpoint {self.source!r}): {e}. "
                        "The file may be corrupt; re-download it."
                    ) from e
                self._handles[file] = handle
            return handle

    def _pickle_file(self, file: Path) -> dict[str, torch.Tensor]:
        with self._lock:
            sd = self._pickles.get(file)
            if sd is None:
                sd = load_pickle(file)
                self._pickles[file] = sd
            return sd


def open_checkpoint(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> Checkpoint:
    """Open a model folder, a ``.safetensors`` file or a hub id ``org/name`` lazily.

    Only headers are read here (validated, so a damaged file fails now rather than mid-merge).
    """
    text, path, from_hub = resolve_source(source, allow_pickle=allow_pickle, revision=revision)
    if path.is_dir():
        entries, fmt = folder_entries(
            path, source=text, allow_pickle=allow_pickle, from_hub=from_hub
        )
        return Checkpoint(
            source=text,
            path=path,
            folder=path,
            config=read_config(path),
            entries=entries,
            fmt=fmt,
        )
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        entries, fmt = safetensors_entries([path]), "safetensors"
    elif suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise pickle_refusal(path)
        entries, fmt = pickle_entries([path], None), "pickle"
    else:
        raise CheckpointError(
            f"Cannot open {path}: expected a model folder, a .safetensors file or (with "
            "--allow-pickle) a .bin/.pt/.pth file."
        )
    return Checkpoint(source=text, path=path, folder=None, config=None, entries=entries, fmt=fmt)
