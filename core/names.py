"""Drive names: one rule, shared by the agent, the launcher and the sandbox.

A name ends up in EC2 tags, file paths, systemd status lines and shell commands in
user-data, so it is kept to a conservative alphabet that is safe in all of them.
"""

from __future__ import annotations

import re

from xdrive.errors import ConfigError

MAX_NAME_LENGTH = 63
_NAME_RE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")


def validate_drive_name(name: object) -> str:
    """Return ``name`` if it is a valid drive name, else raise ConfigError saying why."""
    if not isinstance(name, str) or not name:
        raise ConfigError(
            "drive name is empty",
            "give a name such as 'work' or 'ml-project' (a-z, 0-9 and '-')",
        )
    if len(name) > MAX_NAME_LENGTH:
        raise ConfigError(
            f"drive name {name[:20]!r}... is {len(name)} characters long",
            f"use at most {MAX_NAME_LENGTH} characters",
        )
    if not _NAME_RE.match(name):
        raise ConfigError(
            f"invalid drive name {name!r}",
            "use lowercase letters, digits and '-', starting and ending with a letter or digit",
        )
    return name
