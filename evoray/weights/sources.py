"""Where a model comes from: a local folder or file, or a Hugging Face hub id (downloaded or
taken from the cache, offline mode read at call time), and its ``config.json``.

Apart from reading tensors so that every loader (``open_checkpoint``, ``load_model``, the fusion
tokenizers) resolves a source the same way, with the same error messages.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from evoray.errors import CheckpointError

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


def resolve_source(
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


def resolve_model_folder(
    source: str | os.PathLike, *, allow_pickle: bool = False, revision: str | None = None
) -> Path:
    """Local folder for a model folder path or hub id (downloaded/cached as needed)."""
    text, path, _ = resolve_source(source, allow_pickle=allow_pickle, revision=revision)
    if not path.is_dir():
        raise CheckpointError(
            f"{text!r} is a single file; loading a model needs its folder with config.json. "
            "Give the model folder instead."
        )
    return path
