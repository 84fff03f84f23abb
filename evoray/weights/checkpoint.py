"""Lazy, read-only access to model checkpoints.

A merge touches every tensor of several models but needs only a few in memory at a time, so
``open_checkpoint`` reads nothing but the safetensors headers up front: names, shapes and dtypes
come from those, and ``Checkpoint.get`` reads one tensor on demand.  Headers are validated at open
time so a truncated or corrupt download fails before a long merge starts, not in the middle of it.

Pickle checkpoints (``.bin``/``.pt``) can run arbitrary code when loaded and are refused unless the
caller opts in with ``allow_pickle`` (the CLI's ``--allow-pickle``).
"""

from __future__ import annotations

import json
import os
import re
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from evoray.errors import CheckpointError

__all__ = ["Checkpoint", "TensorInfo", "load_model", "open_checkpoint"]

# safetensors dtype tags -> torch dtypes.  Built with getattr so older torch builds still import.
_ST_DTYPES: dict[str, torch.dtype] = {
    tag: dt
    for tag, dt in {
        "F64": torch.float64,
        "F32": torch.float32,
        "F16": torch.float16,
        "BF16": torch.bfloat16,
        "I64": torch.int64,
        "I32": torch.int32,
        "I16": torch.int16,
        "I8": torch.int8,
        "U8": torch.uint8,
        "BOOL": torch.bool,
        "C64": getattr(torch, "complex64", None),
        "U64": getattr(torch, "uint64", None),
        "U32": getattr(torch, "uint32", None),
        "U16": getattr(torch, "uint16", None),
        "F8_E4M3": getattr(torch, "float8_e4m3fn", None),
        "F8_E5M2": getattr(torch, "float8_e5m2", None),
        "F8_E4M3FNUZ": getattr(torch, "float8_e4m3fnuz", None),
        "F8_E5M2FNUZ": getattr(torch, "float8_e5m2fnuz", None),
        "F8_E8M0": getattr(torch, "float8_e8m0fnu", None),
    }.items()
    if dt is not None
}

_MAX_HEADER_BYTES = 100_000_000  # the limit safetensors itself enforces

SAFETENSORS_SINGLE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")

# Files fetched from the hub: weights, configs and everything a tokenizer may need.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.model",
    "*.txt",
    "*.jinja",
    "*.tiktoken",
    "*.py",  # only executed by load_model with trust_remote_code=True
]
HUB_PICKLE_PATTERNS = ["*.bin", "*.bin.index.json", "*.pt", "*.pth"]

# Suffixes that make a non-existent source clearly a path rather than a hub id.
_PATH_SUFFIXES = {
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".json",
    ".gguf",
    ".pkl",
    ".h5",
    ".msgpack",
    ".onnx",
    ".npz",
    ".yaml",
    ".yml",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor, known without reading its data."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: Path
    nbytes: int


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
        entries: dict[str, _Entry],
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

    def _entry(self, name: str) -> _Entry:
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
                sd = _load_pickle(file)
                self._pickles[file] = sd
            return sd


# ---------------------------------------------------------------------------------------------
# safetensors headers


def read_safetensors_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, int]]:
    """Parse and validate a safetensors header; return infos and byte sizes, in header order.

    Checking offsets against the file size here catches truncated downloads at open time.
    """
    hint = "The file is truncated or corrupt; delete it and download it again."
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(
                    f"{file} is too short ({size} bytes) to be a safetensors file. {hint}"
                )
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
                raise CheckpointError(
                    f"{file} has a header length of {header_len} bytes but the file has only "
                    f"{size} bytes. {hint}"
                )
            raw = f.read(header_len)
    except OSError as e:
        raise CheckpointError(f"Cannot read {file}: {e}. Check the path and permissions.") from e
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file} has a header that is not valid JSON ({e}). {hint}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file} has a header that is not a JSON object. {hint}")

    data_size = size - 8 - header_len
    infos: dict[str, TensorInfo] = {}
    sizes: dict[str, int] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r} in {file}"
        if not isinstance(meta, dict):
            raise CheckpointError(f"{where} has a malformed header entry. {hint}")
        tag = meta.get("dtype")
        dtype = _ST_DTYPES.get(tag) if isinstance(tag, str) else None
        if dtype is None:
            raise CheckpointError(
                f"{where} has dtype {tag!r}, which evoray does not support "
                f"(known: {', '.join(_ST_DTYPES)}). Convert the checkpoint or re-download it."
            )
        shape = meta.get("shape")
        offsets = meta.get("data_offsets")
        if (
            not isinstance(shape, list)
            or not all(isinstance(d, int) and d >= 0 for d in shape)
            or not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) for o in offsets)
        ):
            raise CheckpointError(f"{where} has a malformed shape or data_offsets. {hint}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                f"{where} claims bytes {begin}..{end} but the file holds only {data_size} data "
                f"bytes. {hint}"
            )
        info = TensorInfo(name, tuple(shape), dtype)
        if end - begin != info.nbytes:
            raise CheckpointError(
                f"{where} has shape {tuple(shape)} of {tag} ({info.nbytes} bytes) but spans "
                f"{end - begin} bytes. {hint}"
            )
        infos[name] = info
        sizes[name] = end - begin
    return infos, sizes


def _safetensors_entries(files: list[Path]) -> dict[str, _Entry]:
    entries: dict[str, _Entry] = {}
    for file in files:
        infos, sizes = read_safetensors_header(file)
        for name, info in infos.items():
            if name in entries:
                raise CheckpointError(
                    f"Tensor {name!r} appears in both {entries[name].file.name} and {file.name} "
                    f"in {file.parent}. Remove the stray file or add a {SAFETENSORS_INDEX}."
                )
            entries[name] = _Entry(info, file, sizes[name])
    return entries


def _read_index(index_file: Path) -> dict[str, str]:
    """weight_map of a sharded index, validated; shard names must stay inside the folder."""
    try:
        data = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(
            f"Cannot read index {index_file}: {e}. Re-download the checkpoint."
        ) from e
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise CheckpointError(
            f"Index {index_file} has no valid 'weight_map' (tensor name -> shard file). "
            "Re-download the checkpoint."
        )
    for shard in set(weight_map.values()):
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CheckpointError(
                f"Index {index_file} points to shard {shard!r} outside its folder; refusing it."
            )
    return weight_map


def _sharded_entries(index_file: Path) -> dict[str, _Entry]:
    folder = index_file.parent
    weight_map = _read_index(index_file)
    headers: dict[str, tuple[dict[str, TensorInfo], dict[str, int]]] = {}
    entries: dict[str, _Entry] = {}
    for name, shard in weight_map.items():
        file = folder / shard
        if shard not in headers:
            if not file.is_file():
                raise CheckpointError(
                    f"Shard {shard!r} listed in {index_file} is missing from {folder}. "
                    "The download is incomplete; download the checkpoint again."
                )
            headers[shard] = read_safetensors_header(file)
        infos, sizes = headers[shard]
        if name not in infos:
            raise CheckpointError(
                f"Index {index_file} places tensor {name!r} in {shard}, but that shard does not "
                "contain it. The index and shards do not match; re-download the checkpoint."
            )
        entries[name] = _Entry(infos[name], file, sizes[name])
    return entries


# ---------------------------------------------------------------------------------------------
# pickle


def _pickle_refusal(what: Path) -> CheckpointError:
    return CheckpointError(
        f"{what} is a pickle checkpoint (.bin/.pt); loading pickle can run arbitrary code. "
        "Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) only if you trust "
        "its source."
    )


def _load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """Load a pickled state dict with torch's restricted unpickler; mmap keeps it lazy."""
    try:
        try:
            obj = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            # Legacy (non-zip) torch files cannot be memory-mapped.
            obj = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"Cannot load pickle checkpoint {file}: {e}. It may be corrupt or contain more than "
            "tensors; re-download it or convert it to safetensors."
        ) from e
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()
    ):
        raise CheckpointError(
            f"{file} does not hold a flat state dict (tensor name -> tensor). "
            "Save the model's state_dict() or use safetensors."
        )
    return obj


def _pickle_entries(files: list[Path], weight_map: dict[str, Path] | None) -> dict[str, _Entry]:
    """Entries for pickle files; ``weight_map`` (name -> file) fixes order and placement."""
    loaded = {f: _load_pickle(f) for f in files}
    if weight_map is None:
        weight_map = {name: f for f, sd in loaded.items() for name in sd}
    entries: dict[str, _Entry] = {}
    for name, f in weight_map.items():
        t = loaded[f].get(name)
        if t is None:
            raise CheckpointError(
                f"The index places tensor {name!r} in {f}, but that shard does not contain it. "
                "Re-download the checkpoint."
            )
        info = TensorInfo(name, tuple(t.shape), t.dtype)
        entries[name] = _Entry(info, f, info.nbytes)
    return entries


# ---------------------------------------------------------------------------------------------
# source resolution


def _looks_like_path(source: str) -> bool:
    return (
        os.path.isabs(source)
        or source.startswith((".", "~"))
        or source.count("/") > 1
        or "\\" in source
        or Path(source).suffix.lower() in _PATH_SUFFIXES
        or not _HUB_ID.match(source)
    )


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def _hub_offline() -> bool:
    """Offline mode, read at call time so env changes after import still count."""
    try:
        from huggingface_hub import constants

        const = bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover - very old huggingface_hub
        const = False
    return const or _env_true("HF_HUB_OFFLINE") or _env_true("TRANSFORMERS_OFFLINE")


def _hub_cache_dir() -> str | None:
    """The hub cache, read at call time (huggingface_hub freezes it at import)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return os.path.expanduser(os.path.expandvars(os.environ[var]))
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.path.expandvars(os.environ["HF_HOME"])), "hub")
    return None


def _hub_download(repo_id: str, *, revision: str | None, allow_pickle: bool) -> Path:
    from huggingface_hub import snapshot_download

    patterns = HUB_PATTERNS + (HUB_PICKLE_PATTERNS if allow_pickle else [])
    rev = f" (revision {revision!r})" if revision else ""
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision,
            allow_patterns=patterns,
            cache_dir=_hub_cache_dir(),
            local_files_only=_hub_offline(),
        )
    except Exception as e:  # offline, not found, gated, network: all reported the same way
        raise CheckpointError(
            f"Cannot get model {repo_id!r}{rev} from the Hugging Face hub or its local cache: "
            f"{type(e).__name__}: {e}\n"
            "If it is a local folder, check the path. Otherwise download it first with "
            f"`huggingface-cli download {repo_id}` (then HF_HUB_OFFLINE=1 works offline), "
            "log in with `huggingface-cli login` for gated or private models, or pass a local path."
        ) from e
    return Path(folder)


def _resolve_source(
    source: str | os.PathLike, *, allow_pickle: bool, revision: str | None
) -> tuple[str, Path, bool]:
    """Map a user-given source to (source string, local path, came-from-hub)."""
    text = os.fspath(source)
    if not text.strip():
        raise CheckpointError("Empty checkpoint path; give a folder, a .safetensors file or an id.")
    local = Path(text).expanduser()
    if local.exists():
        return text, local, False
    if isinstance(source, Path) or _looks_like_path(text):
        raise CheckpointError(
            f"Checkpoint {text!r} not found: no such file or folder ({local.absolute()}). "
            "Check the path; a Hugging Face hub model is given as 'org/name'."
        )
    return text, _hub_download(text, revision=revision, allow_pickle=allow_pickle), True


def read_config(folder: Path) -> dict | None:
    """``folder/config.json`` as a dict (None if absent); unreadable or not an object is a
    CheckpointError naming the file."""
    cfg = folder / "config.json"
    if not cfg.is_file():
        return None
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"Cannot parse {cfg}: {e}. Fix or re-download the file.") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{cfg} is not a JSON object. Fix or re-download the file.")
    return data


def _folder_entries(
    folder: Path, *, source: str, allow_pickle: bool, from_hub: bool
) -> tuple[dict[str, _Entry], str]:
    single = folder / SAFETENSORS_SINGLE
    index = folder / SAFETENSORS_INDEX
    if single.is_file():
        return _safetensors_entries([single]), "safetensors"
    if index.is_file():
        return _sharded_entries(index), "safetensors"
    st_files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if st_files:
        return _safetensors_entries(st_files), "safetensors"

    pickle_index = folder / PICKLE_INDEX
    pickle_single = folder / PICKLE_SINGLE
    if pickle_index.is_file() or pickle_single.is_file():
        if not allow_pickle:
            raise _pickle_refusal(pickle_index if pickle_index.is_file() else pickle_single)
        if pickle_single.is_file():
            return _pickle_entries([pickle_single], None), "pickle"
        weight_map = _read_index(pickle_index)
        for shard in dict.fromkeys(weight_map.values()):
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"Shard {shard!r} listed in {pickle_index} is missing from {folder}. "
                    "The download is incomplete; download the checkpoint again."
                )
        files = {name: folder / shard for name, shard in weight_map.items()}
        return _pickle_entries(list(dict.fromkeys(files.values())), files), "pickle"

    others = sorted(p.name for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES)
    where = f"hub model {source!r} (cached at {folder})" if from_hub else f"folder {folder}"
    hint = (
        "It may only have pickle weights; pass --allow-pickle only if you trust it."
        if from_hub and not allow_pickle
        else "Point evoray at a model folder saved with save_pretrained, or at a .safetensors file."
    )
    if others and not allow_pickle:
        hint = f"It has pickle files ({', '.join(others[:3])}); convert them to safetensors. {hint}"
    raise CheckpointError(
        f"No weights found in {where}: expected {SAFETENSORS_SINGLE}, {SAFETENSORS_INDEX} or "
        f"other *.safetensors files. {hint}"
    )


def open_checkpoint(
    source: str | os.PathLike,
    *,
    allow_pickle: bool = False,
    revision: str | None = None,
) -> Checkpoint:
    """Open a model folder, a ``.safetensors`` file or a hub id ``org/name`` lazily.

    Only headers are read here (validated, so a damaged file fails now rather than mid-merge).
    """
    text, path, from_hub = _resolve_source(source, allow_pickle=allow_pickle, revision=revision)
    if path.is_dir():
        entries, fmt = _folder_entries(
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
        entries, fmt = _safetensors_entries([path]), "safetensors"
    elif suffix in _PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refusal(path)
        entries, fmt = _pickle_entries([path], None), "pickle"
    else:
        raise CheckpointError(
            f"Cannot open {path}: expected a model folder, a .safetensors file or (with "
            "--allow-pickle) a .bin/.pt/.pth file."
        )
    return Checkpoint(source=text, path=path, folder=None, config=None, entries=entries, fmt=fmt)


def resolve_model_folder(
    source: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None
) -> Path:
    """Local folder for a model folder path or hub id (downloaded/cached as needed)."""
    text, path, _ = _resolve_source(source, allow_pickle=allow_pickle, revision=revision)
    if not path.is_dir():
        raise CheckpointError(
            f"{text!r} is a single file; loading a model needs its folder with config.json. "
            "Give the model folder instead."
        )
    return path


def load_model(
    source: str | os.PathLike,
    *,
    model_cls: Any = None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    revision: str | None = None,
    **kwargs: Any,
) -> Any:
    """Instantiate a transformers model (``AutoModel`` unless ``model_cls``) from a folder or id.

    Weights must be safetensors unless ``allow_pickle``; models whose config names custom code
    (``auto_map``) are refused unless ``trust_remote_code``, since that code would run here.
    """
    folder = resolve_model_folder(source, allow_pickle=allow_pickle, revision=revision)
    text = os.fspath(source)
    config = read_config(folder)
    if config is None:
        raise CheckpointError(
            f"{folder} has no config.json, so transformers cannot build model {text!r}. "
            "Give a folder saved with save_pretrained."
        )
    if config.get("auto_map") and not trust_remote_code:
        from transformers import CONFIG_MAPPING

        extra = ""
        if config.get("model_type") in CONFIG_MAPPING:
            extra = (
                f" transformers supports model_type {config['model_type']!r} natively; removing "
                "'auto_map' from config.json loads it without custom code."
            )
        raise CheckpointError(
            f"Model {text!r} needs its own Python code (config.json has 'auto_map' at {folder}). "
            "Pass --trust-remote-code (trust_remote_code=True) only if you trust its source."
            + extra
        )
    # Refuses pickle-only folders with the usual message before transformers sees them.
    _folder_entries(folder, source=text, allow_pickle=allow_pickle, from_hub=False)

    if model_cls is None:
        from transformers import AutoModel

        model_cls = AutoModel
    kwargs.setdefault("use_safetensors", None if allow_pickle else True)
    try:
        return model_cls.from_pretrained(str(folder), trust_remote_code=trust_remote_code, **kwargs)
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"transformers could not load model {text!r} from {folder}: {e}. "
            "Check that the folder is a complete save_pretrained output for this model class."
        ) from e
