"""What tensors a checkpoint holds and where, known from headers and indexes alone: safetensors
headers parsed and validated, sharded indexes, pickle state dicts (refused unless allowed).

Validated here, at open time, so that a truncated or corrupt download fails before a long merge
starts, not in the middle of it; pickle can run arbitrary code, so it needs ``allow_pickle``.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from evoray.errors import CheckpointError

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
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


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
class Entry:
    info: TensorInfo
    file: Path
    nbytes: int


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


def safetensors_entries(files: list[Path]) -> dict[str, Entry]:
    entries: dict[str, Entry] = {}
    for file in files:
        infos, sizes = read_safetensors_header(file)
        for name, info in infos.items():
            if name in entries:
                raise CheckpointError(
                    f"Tensor {name!r} appears in both {entries[name].file.name} and {file.name} "
                    f"in {file.parent}. Remove the stray file or add a {SAFETENSORS_INDEX}."
                )
            entries[name] = Entry(info, file, sizes[name])
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


def _sharded_entries(index_file: Path) -> dict[str, Entry]:
    folder = index_file.parent
    weight_map = _read_index(index_file)
    headers: dict[str, tuple[dict[str, TensorInfo], dict[str, int]]] = {}
    entries: dict[str, Entry] = {}
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
        entries[name] = Entry(infos[name], file, sizes[name])
    return entries


def pickle_refusal(what: Path) -> CheckpointError:
    return CheckpointError(
        f"{what} is a pickle checkpoint (.bin/.pt); loading pickle can run arbitrary code. "
        "Convert it to safetensors, or pass --allow-pickle (allow_pickle=True) only if you trust "
        "its source."
    )


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
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


def pickle_entries(files: list[Path], weight_map: dict[str, Path] | None) -> dict[str, Entry]:
    """Entries for pickle files; ``weight_map`` (name -> file) fixes order and placement."""
    loaded = {f: load_pickle(f) for f in files}
    if weight_map is None:
        weight_map = {name: f for f, sd in loaded.items() for name in sd}
    entries: dict[str, Entry] = {}
    for name, f in weight_map.items():
        t = loaded[f].get(name)
        if t is None:
            raise CheckpointError(
                f"The index places tensor {name!r} in {f}, but that shard does not contain it. "
                "Re-download the checkpoint."
            )
        info = TensorInfo(name, tuple(t.shape), t.dtype)
        entries[name] = Entry(info, f, info.nbytes)
    return entries


def folder_entries(
    folder: Path, *, source: str, allow_pickle: bool, from_hub: bool
) -> tuple[dict[str, Entry], str]:
    single = folder / SAFETENSORS_SINGLE
    index = folder / SAFETENSORS_INDEX
    if single.is_file():
        return safetensors_entries([single]), "safetensors"
    if index.is_file():
        return _sharded_entries(index), "safetensors"
    st_files = sorted(p for p in folder.glob("*.safetensors") if p.is_file())
    if st_files:
        return safetensors_entries(st_files), "safetensors"

    pickle_index = folder / PICKLE_INDEX
    pickle_single = folder / PICKLE_SINGLE
    if pickle_index.is_file() or pickle_single.is_file():
        if not allow_pickle:
            raise pickle_refusal(pickle_index if pickle_index.is_file() else pickle_single)
        if pickle_single.is_file():
            return pickle_entries([pickle_single], None), "pickle"
        weight_map = _read_index(pickle_index)
        for shard in dict.fromkeys(weight_map.values()):
            if not (folder / shard).is_file():
                raise CheckpointError(
                    f"Shard {shard!r} listed in {pickle_index} is missing from {folder}. "
                    "The download is incomplete; download the checkpoint again."
                )
        files = {name: folder / shard for name, shard in weight_map.items()}
        return pickle_entries(list(dict.fromkeys(files.values())), files), "pickle"

    others = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
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
