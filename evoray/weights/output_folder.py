"""The output folder of a write, kept safe: replaced only whole and only when that deletes no
more than an old model, temp folders of killed writers cleaned up, write failures turned into
one-line errors that say what to do.

Apart from the folder writer because fusion saves and merges replace folders the same way.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import yaml
from safetensors import SafetensorError

from evoray.errors import CheckpointError

log = logging.getLogger(__name__)


def is_merge_output(folder: Path) -> bool:
    """True if ``folder`` looks like what an evoray or mergekit merge wrote: a model card
    tagged ``evoray`` or ``mergekit`` (both write one), or mergekit's ``mergekit_config.yml``."""
    if (folder / "mergekit_config.yml").is_file():
        return True
    card = folder / "README.md"
    try:
        text = card.read_text(encoding="utf-8", errors="replace")[:20_000]
    except OSError:
        return False
    if not text.startswith("---"):
        return False
    front = text[3:].split("\n---", 1)[0]
    try:
        meta = yaml.safe_load(front)
    except yaml.YAMLError:
        return False
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return isinstance(tags, list) and bool({"evoray", "mergekit"} & {str(t) for t in tags})


def check_replaceable(
    dest: Path,
    protect: Iterable[tuple[str | os.PathLike, str]] = (),
    *,
    require_merge_output: bool = True,
) -> None:
    """Refuse (CheckpointError saying why) to replace ``dest`` when that would delete more than
    an old model: the filesystem root, the home folder, the folder we run from or one above it,
    a folder holding any of ``protect`` (``(path, what it is)``: the config, input models), or,
    with ``require_merge_output``, a non-empty folder no evoray or mergekit merge wrote."""
    dest = Path(dest).expanduser().resolve()
    cwd = Path.cwd().resolve()
    home = Path.home().resolve()
    why = None
    if dest == Path(dest.anchor) or dest == home:
        why = "it is the filesystem root or your home folder"
    elif dest == cwd or dest in cwd.parents:
        why = f"it is the folder you are running from ({cwd}) or holds it"
    else:
        for path, what in protect:
            p = Path(path).expanduser().resolve()
            if p == dest or dest in p.parents:
                why = f"it holds {what} {p}"
                break
    nonempty = dest.is_dir() and any(dest.iterdir())
    if why is None and require_merge_output and nonempty and not is_merge_output(dest):
        why = (
            "it does not look like an earlier merge's output (no README.md model card "
            "tagged evoray or mergekit, no mergekit_config.yml)"
        )
    if why is not None:
        rule = (
            "--overwrite only replaces a folder an earlier evoray or mergekit merge wrote"
            if require_merge_output
            else "evoray never replaces such a folder with a model"
        )
        raise CheckpointError(
            f"Refusing to replace {dest}: {why}; {rule}. Choose a new output folder, or delete "
            "it yourself."
        )


def replace_folder(
    new: Path,
    dest: Path,
    *,
    protect: Iterable[tuple[str | os.PathLike, str]] = (),
    require_merge_output: bool = False,
) -> None:
    """Move the finished folder ``new`` to ``dest``, replacing any folder there.  The old one
    is renamed aside first so a failure can put it back: ``dest`` is never torn.

    An existing ``dest`` is first checked by ``check_replaceable`` (never the root, home, the
    working folder or its parents, nor a folder holding a ``protect`` path)."""
    if not dest.exists():
        os.replace(new, dest)
        return
    check_replaceable(dest, protect, require_merge_output=require_merge_output)
    old = dest.parent / f".{dest.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dest, old)
    try:
        os.replace(new, dest)
    except OSError:
        os.replace(old, dest)
        raise
    shutil.rmtree(old, ignore_errors=True)


HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32]


def temp_name(name: str) -> str:
    """A fresh temp folder name for output ``name``, matched by ``_temp_pattern``: the host and
    pid in it tell ``clean_stale_temps`` whether its writer is gone."""
    return f".{name}.tmp-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def _temp_pattern(name: str) -> re.Pattern[str]:
    """``.NAME.tmp-HOST-PID-HEX``: the temp folders this module makes for output ``NAME``."""
    return re.compile(
        rf"^\.{re.escape(name)}\.tmp-(?P<host>[A-Za-z0-9]*)-(?P<pid>\d+)-[0-9a-f]{{8}}$"
    )


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: alive, another user's
        return True
    return True


def clean_stale_temps(out_dir: Path) -> list[Path]:
    """Remove the temp folders that killed writers left beside ``out_dir`` (returns them).

    Only folders with this module's naming pattern whose process (the pid in the name, on this
    host) is gone: a live merge into the same ``out_dir``, here or on another host sharing the
    storage, keeps its own. Temp folders of older versions (no pid in the name) are only named
    in a warning, since nothing tells whether they are still being written."""
    removed = []
    pattern = _temp_pattern(out_dir.name)
    legacy = re.compile(rf"^\.{re.escape(out_dir.name)}\.tmp-[0-9a-f]{{8}}$")
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for entry in siblings:
        m = pattern.match(entry.name)
        if m and entry.is_dir() and m["host"] == HOST and not _pid_alive(int(m["pid"])):
            shutil.rmtree(entry, ignore_errors=True)
            log.info("removed %s, left by an interrupted write (pid %s)", entry, m["pid"])
            removed.append(entry)
        elif legacy.match(entry.name) and entry.is_dir():
            log.warning(
                "%s is the temp folder of an interrupted merge by an older evoray; delete it "
                "if no merge into %s is running",
                entry,
                out_dir,
            )
    return removed


def write_error(path: Path, exc: BaseException) -> CheckpointError:
    """A one-line error for a failed write under ``path``, saying what to do."""
    text = str(exc)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or any(
        s in text for s in ("No space left", "StorageFull", "Disk quota")
    )
    if full:
        try:
            free = f" ({shutil.disk_usage(path.parent).free / 2**30:.1f} GiB free)"
        except OSError:
            free = ""
        hint = f"the disk is full{free}: free space there or choose another output folder"
    elif isinstance(exc, PermissionError) or getattr(exc, "errno", None) in (
        errno.EACCES,
        errno.EPERM,
        errno.EROFS,
    ):
        hint = "the location is not writable: choose an output folder you can write to"
    else:
        hint = "check the output location (writable, enough space) or choose another folder"
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else text
    return CheckpointError(f"Cannot write {path}: {reason}; {hint}.")


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Turn OS and safetensors write failures under ``path`` into a CheckpointError."""
    try:
        yield
    except (OSError, SafetensorError) as exc:
        raise write_error(path, exc) from exc
