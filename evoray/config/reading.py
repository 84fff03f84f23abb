"""Reading config files: YAML parsed with the path in every error, unknown keys named with a
did-you-mean, so every config (merge, run, fuse) fails the same clear way."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml

from evoray.errors import ConfigError


def read_yaml(path: str | Path, what: str) -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ConfigError naming the path."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} {path} not found")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None


def unknown_key(key: Any, allowed: Any, where: str) -> ConfigError:
    """The error for a key not in ``allowed``, with a did-you-mean hint (``where`` names it)."""
    hint = difflib.get_close_matches(str(key), list(allowed), n=1)
    did = f" (did you mean '{hint[0]}'?)" if hint else ""
    return ConfigError(f"{where}{did}; allowed: {', '.join(allowed)}")


def check_keys(data: Any, allowed: Any, source: str, prefix: str) -> None:
    """ConfigError for the first key of mapping ``data`` not in ``allowed`` ('s.yml: unknown
    key 'fusion.lamb' (did you mean 'lam'?)'); ``prefix`` is the dotted path of the section."""
    for key in data:
        if key not in allowed:
            raise unknown_key(key, allowed, f"{source}: unknown key '{prefix}{key}'")
