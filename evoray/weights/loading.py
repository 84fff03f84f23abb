"""``load_model``: a transformers model from a folder or hub id, with evoray's safety checks.

Custom code (``auto_map``) is refused unless ``trust_remote_code`` and pickle-only weights unless
``allow_pickle``, with the same messages as ``open_checkpoint``, before transformers sees them.
"""

from __future__ import annotations

import os
from typing import Any

from evoray.errors import CheckpointError
from evoray.weights.sources import read_config, resolve_model_folder
from evoray.weights.tensor_files import folder_entries


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
    folder_entries(folder, source=text, allow_pickle=allow_pickle, from_hub=False)

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
