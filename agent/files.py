"""The one place the agent writes files: atomically, so a crash never leaves half a file."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Union

from xdrive.errors import ConfigError

PathLike = Union[str, "os.PathLike[str]"]


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: PathLike, data: bytes | str, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data``: readers see the old file or the new one, never a mix.

    The temp file lives in the same directory (rename is atomic only within a filesystem);
    file and directory are fsynced so the new content survives a power loss. Missing
    parent directories are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp_name, target)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(target.parent)


def read_json(path: PathLike) -> dict[str, Any]:
    """The JSON object in ``path``; ``{}`` if the file is missing or holds only whitespace.

    Anything else that is not a JSON object raises ConfigError: a caller that would
    rewrite the file must not mistake a broken file for an empty one.
    """
    target = Path(path)
    try:
        raw = target.read_bytes()
    except FileNotFoundError:
        return {}
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise ConfigError(
            f"{target} is not valid JSON ({e})",
            f"fix or remove {target}; it was left unchanged",
        ) from e
    if not isinstance(value, dict):
        raise ConfigError(
            f"{target} holds a JSON {type(value).__name__}, not an object",
            f"fix or remove {target}; it was left unchanged",
        )
    return value


def write_json(path: PathLike, value: dict[str, Any], mode: int = 0o644) -> None:
    """Write ``value`` as indented JSON, atomically."""
    write_atomic(path, json.dumps(value, indent=2, sort_keys=True) + "\n", mode)
