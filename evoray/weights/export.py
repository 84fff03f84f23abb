"""Write a merged model as a Hugging Face folder that ``from_pretrained`` loads directly.

Tensors are streamed into safetensors shards as they are produced, so peak memory is about one
shard rather than the whole model.  Everything goes into a hidden sibling temp folder that is
renamed into place on ``commit()``: a crash or Ctrl-C never leaves a half-written model that
looks complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file

from evoray.errors import CheckpointError
from evoray.weights.output_folder import (
    check_replaceable,
    clean_stale_temps,
    replace_folder,
    temp_name,
    writing,
)
from evoray.weights.sources import read_config

__all__ = ["MODEL_FILES", "TOKENIZER_FILES", "ModelFolderWriter", "write_flat_model"]
# Model-side files that accompany config.json (which is rewritten, not copied).
MODEL_FILES = ("generation_config.json",)
# Tokenizer files, copied verbatim when present.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "preprocessor_config.json",
)
TOKENIZER_GLOBS = ("*.model", "*.tiktoken", "additional_chat_templates/*.jinja")
CHAT_TEMPLATE_FILE = "chat_template.jinja"

_METADATA = {"format": "pt"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _set_dtype(config: dict[str, Any], name: str) -> None:
    """Record the dtype under both keys (transformers 5 reads ``dtype``, 4.x ``torch_dtype``),
    including in nested sub-configs (e.g. ``text_config``) that carry their own."""
    config["dtype"] = name
    config["torch_dtype"] = name
    for value in config.values():
        if isinstance(value, dict) and ("dtype" in value or "torch_dtype" in value):
            _set_dtype(value, name)


class ModelFolderWriter:
    """Streams a merged model into an HF folder; crash-safe: writes into a sibling temp dir,
    renames on commit.

    Use as a context manager: leaving the block without ``commit()`` (normally or by an
    exception) removes the temp dir and leaves ``out_dir`` untouched.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        max_shard_bytes: int = 5 * 2**30,
        overwrite: bool = False,
        protect: Iterable[tuple[str | os.PathLike, str]] = (),
    ) -> None:
        """``protect``: ``(path, what it is)`` pairs (the config, the input models) that
        ``--overwrite`` must never delete; see ``check_replaceable``."""
        if max_shard_bytes <= 0:
            raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
        self.out_dir = Path(out_dir).expanduser().absolute()
        self.max_shard_bytes = max_shard_bytes
        self.overwrite = overwrite
        self.protect = list(protect)
        if self.out_dir.exists():
            if not self.out_dir.is_dir():
                raise CheckpointError(
                    f"Output {self.out_dir} exists and is a file; choose a folder path."
                )
            if any(self.out_dir.iterdir()) and not overwrite:
                raise CheckpointError(
                    f"Output folder {self.out_dir} already exists and is not empty. Choose "
                    "another output path or pass --overwrite to replace it."
                )
            # Before any work: --overwrite replaces only an earlier merge's folder.
            check_replaceable(self.out_dir, self.protect)
        with writing(self.out_dir):
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_temps(self.out_dir)
        self.tmp_dir = self.out_dir.parent / (temp_name(self.out_dir.name))
        with writing(self.out_dir):  # named as the user gave it, not as the temp folder
            self.tmp_dir.mkdir()
        self._buffer: dict[str, torch.Tensor] = {}
        self._buffer_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []  # temp shard file, its tensor names
        self._names: set[str] = set()
        self._total_bytes = 0
        self._tokenizer_files: list[Path] = []
        self._chat_template: str | None = None
        self._done = False

    # -- tensors ------------------------------------------------------------------------------

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Buffer one tensor; a shard is flushed to disk once ``max_shard_bytes`` would be passed.

        The tensor is copied to its own compact CPU storage: safetensors rejects views and tensors
        sharing storage (tied weights), and the caller may reuse or modify its tensor afterwards.
        """
        self._check_open()
        if not isinstance(name, str) or not name:
            raise CheckpointError(f"Tensor name must be a non-empty string, got {name!r}.")
        if name in self._names:
            raise CheckpointError(
                f"Tensor {name!r} was added twice to {self.out_dir}; write each name once."
            )
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"Value for tensor {name!r} is a {type(tensor).__name__}.")
        t = tensor.detach()
        if t.device.type != "cpu":
            t = t.to("cpu").contiguous()  # the device copy is already fresh storage
        else:
            t = t.clone(memory_format=torch.contiguous_format)
        nbytes = t.numel() * t.element_size()
        if self._buffer and self._buffer_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._buffer[name] = t
        self._buffer_bytes += nbytes
        self._names.add(name)
        self._total_bytes += nbytes

    def _flush(self) -> None:
        if not self._buffer:
            return
        path = self.tmp_dir / f"shard-{len(self._shards) + 1:05d}.safetensors"
        with writing(path):
            save_file(self._buffer, str(path), metadata=_METADATA)
        self._shards.append((path, list(self._buffer)))
        self._buffer = {}
        self._buffer_bytes = 0

    @property
    def nbytes(self) -> int:
        """Total tensor bytes added so far."""
        return self._total_bytes

    # -- support files ------------------------------------------------------------------------

    def copy_support_files(
        self,
        folder: Path | None,
        *,
        dtype: torch.dtype | None,
        config: bool = True,
        tokenizer: bool = True,
    ) -> None:
        """Copy config, generation config and tokenizer files from a source model folder.

        ``config.json`` gets ``dtype``/``torch_dtype`` set to ``dtype`` so the saved weights and
        the config agree; custom ``*.py`` code travels along when the config has ``auto_map``.
        ``config=False`` / ``tokenizer=False`` skip a group, so the two can come from different
        folders; copying a tokenizer replaces the tokenizer files of an earlier call.
        """
        self._check_open()
        if folder is None:
            return
        with writing(self.tmp_dir):
            self._copy_support_files(Path(folder), dtype, config, tokenizer)

    def _copy_support_files(
        self, folder: Path, dtype: torch.dtype | None, config: bool, tokenizer: bool
    ) -> None:
        if config:
            self._copy_config(folder, dtype)
        if tokenizer:
            for old in self._tokenizer_files:
                old.unlink(missing_ok=True)
            self._tokenizer_files = []
            sources = [folder / name for name in TOKENIZER_FILES]
            sources += [p for pattern in TOKENIZER_GLOBS for p in sorted(folder.glob(pattern))]
            for src in sources:
                if src.is_file():
                    dst = self.tmp_dir / src.relative_to(folder)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(src, dst)
                    self._tokenizer_files.append(dst)

    def _copy_config(self, folder: Path, dtype: torch.dtype | None) -> None:
        data = read_config(folder)
        if data is not None:
            if dtype is not None:
                _set_dtype(data, _dtype_name(dtype))
            (self.tmp_dir / "config.json").write_text(
                json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8"
            )
            if data.get("auto_map"):
                for py in folder.glob("*.py"):
                    shutil.copyfile(py, self.tmp_dir / py.name)
        for name in MODEL_FILES:
            if (folder / name).is_file():
                shutil.copyfile(folder / name, self.tmp_dir / name)

    def set_chat_template(self, template: str) -> None:
        """Use ``template`` (a Jinja chat template) instead of the copied tokenizer's one.

        Applied at commit, so the order relative to ``copy_support_files`` does not matter.
        """
        self._check_open()
        if not isinstance(template, str) or not template.strip():
            raise CheckpointError("chat_template must be a non-empty Jinja template string.")
        self._chat_template = template

    def _apply_chat_template(self) -> None:
        # transformers 5 reads chat_template.jinja first; older readers use tokenizer_config.json.
        (self.tmp_dir / CHAT_TEMPLATE_FILE).write_text(self._chat_template, encoding="utf-8")
        (self.tmp_dir / "chat_template.json").unlink(missing_ok=True)
        tok_config = self.tmp_dir / "tokenizer_config.json"
        if tok_config.is_file():
            data = json.loads(tok_config.read_text(encoding="utf-8"))
            data["chat_template"] = self._chat_template
            tok_config.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")

    def write_card(
        self, *, recipe_yaml: str, base_model: str | None, models: list[str], method: str
    ) -> None:
        """Write README.md: hub metadata, what was merged and the exact recipe to reproduce it."""
        self._check_open()
        meta: dict[str, Any] = {}
        # The hub validates base_model as repo ids; local paths go only into the text.
        hub_ids = [m for m in ([base_model] if base_model else []) if _is_hub_id(m)]
        if hub_ids:
            meta["base_model"] = hub_ids[0]
        meta["library_name"] = "transformers"
        meta["tags"] = ["merge", "evoray"]
        front = yaml.safe_dump(meta, sort_keys=False).strip()

        lines = [
            "---",
            front,
            "---",
            "",
            f"# {self.out_dir.name}",
            "",
            f"This model was made by merging language models with evoray using `{method}`.",
            "",
        ]
        if base_model:
            lines += [f"Base model: `{base_model}`", ""]
        if models:
            lines += ["Models merged:", ""]
            lines += [f"- `{m}`" for m in models]
            lines.append("")
        fence = "```"
        while fence in recipe_yaml:
            fence += "`"
        lines += [
            "## Recipe",
            "",
            "Reproduce it with `evoray` and this configuration:",
            "",
            f"{fence}yaml",
            recipe_yaml.rstrip("\n"),
            fence,
            "",
        ]
        with writing(self.tmp_dir / "README.md"):
            (self.tmp_dir / "README.md").write_text("\n".join(lines), encoding="utf-8")

    # -- finishing ----------------------------------------------------------------------------

    def commit(self) -> Path:
        """Name shards, write the index, and move the folder into place; returns ``out_dir``."""
        self._check_open()
        self._flush()
        with writing(self.tmp_dir):
            return self._commit()

    def _commit(self) -> Path:
        if self._chat_template is not None:
            self._apply_chat_template()
        if not self._shards:
            raise CheckpointError(
                f"No tensors were written to {self.out_dir}; nothing to save. "
                "Check that the merge produced any tensors."
            )
        n = len(self._shards)
        if n == 1:
            self._shards[0][0].rename(self.tmp_dir / "model.safetensors")
        else:
            weight_map: dict[str, str] = {}
            for i, (path, names) in enumerate(self._shards, start=1):
                final = f"model-{i:05d}-of-{n:05d}.safetensors"
                path.rename(self.tmp_dir / final)
                weight_map.update(dict.fromkeys(names, final))
            index = {
                "metadata": {"total_size": self._total_bytes},
                "weight_map": dict(sorted(weight_map.items())),
            }
            (self.tmp_dir / "model.safetensors.index.json").write_text(
                json.dumps(index, indent=2) + "\n", encoding="utf-8"
            )
        self._move_into_place()
        self._done = True
        return self.out_dir

    def _move_into_place(self) -> None:
        if not self.out_dir.exists():
            os.replace(self.tmp_dir, self.out_dir)
            return
        if any(self.out_dir.iterdir()) and not self.overwrite:  # appeared while merging
            self._done = True  # keep the temp dir: it holds the finished result
            raise CheckpointError(
                f"Output folder {self.out_dir} was filled while merging; the result stays in "
                f"{self.tmp_dir}. Move it yourself or rerun with --overwrite."
            )
        try:
            replace_folder(
                self.tmp_dir, self.out_dir, protect=self.protect, require_merge_output=True
            )
        except CheckpointError as exc:  # the folder changed while merging: keep the result
            self._done = True
            raise CheckpointError(f"{exc} The new model stays in {self.tmp_dir}.") from None

    def abort(self) -> None:
        """Discard everything written so far; safe to call more than once."""
        self._buffer = {}
        self._buffer_bytes = 0
        if not self._done:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._done = True

    def _check_open(self) -> None:
        if self._done:
            raise CheckpointError(
                f"Writer for {self.out_dir} is already committed or aborted; create a new one."
            )

    def __enter__(self) -> ModelFolderWriter:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if not self._done:
            self.abort()


def write_flat_model(
    flat: Any,
    like: str,
    out_dir: Path,
    *,
    recipe_yaml: str,
    method: str,
    allow_pickle: bool = False,
) -> Path:
    """Write a flat weight vector (``FlatWeights``) as an HF folder: tensors in the layout from
    ``flat``, every other tensor, the config and tokenizer from checkpoint ``like``. A head the
    config ties to the embedding (``layout.tied``) is left out, as transformers saves it, so
    the reloaded model ties it to the evolved embedding rather than reading ``like``'s copy."""
    from evoray.weights.checkpoint import open_checkpoint

    layout = flat.layout
    tied = layout.tied_names
    with (
        open_checkpoint(like, allow_pickle=allow_pickle) as ckpt,
        ModelFolderWriter(out_dir, overwrite=True) as w,
    ):
        for name in ckpt.names():
            if name in tied:
                continue
            w.add(name, flat.tensor(name) if name in layout else ckpt.get(name))
        w.copy_support_files(ckpt.folder, dtype=layout.storage_dtype)
        w.write_card(recipe_yaml=recipe_yaml, base_model=None, models=[], method=method)
        return w.commit()


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.match(text)) and not Path(text).expanduser().exists()
