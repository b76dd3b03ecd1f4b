"""The agent as installed on an instance: exactly the launcher's own sources, nothing else.

The files are read from the installed ``xdrive`` package (core/ as ``xdrive/``, agent/ as
``xdrive/agent/``); the launcher, sandbox and cloudinit parts never go to an instance.
Relative paths are as under the instance's lib directory (``xdrive/agent/config.py``), for
both ways of shipping them: embedded in user-data, or as ``agent_archive()`` fetched from
a URL.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.metadata
import io
import tarfile
from dataclasses import dataclass
from importlib import resources
from typing import Optional

import xdrive
from xdrive.errors import XdriveError

# (package, directory under lib): the parts of xdrive the agent imports.
AGENT_PACKAGES: tuple[tuple[str, str], ...] = (
    ("xdrive", "xdrive"),
    ("xdrive.agent", "xdrive/agent"),
)
DISTRIBUTION = "xdrive"


@dataclass(frozen=True)
class AgentFile:
    relpath: str  # under the lib directory: "xdrive/agent/config.py"
    content: bytes


@dataclass(frozen=True)
class AgentArchive:
    """A gzip'd tar of ``agent_files()``, byte-for-byte reproducible, to upload for url mode."""

    data: bytes
    sha256: str
    version: str


def agent_version() -> str:
    return xdrive.__version__


def agent_files() -> tuple[AgentFile, ...]:
    """Every .py file of the agent's packages, sorted, as the installed package has them."""
    found: list[AgentFile] = []
    for package, reldir in AGENT_PACKAGES:
        entries = sorted(resources.files(package).iterdir(), key=lambda e: e.name)
        for entry in entries:
            if entry.is_file() and entry.name.endswith(".py"):
                found.append(AgentFile(f"{reldir}/{entry.name}", entry.read_bytes()))
    names = {f.relpath for f in found}
    for _, reldir in AGENT_PACKAGES:
        if f"{reldir}/__init__.py" not in names:
            raise XdriveError(
                f"the installed xdrive package has no {reldir}/__init__.py",
                "reinstall xdrive (pip install -e . in the repository)",
            )
    return tuple(found)


def agent_archive(files: Optional[tuple[AgentFile, ...]] = None) -> AgentArchive:
    """The archive the bootstrap unpacks as its lib directory (fixed times and owners, so
    the same sources always give the same sha256)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for item in files if files is not None else agent_files():
            info = tarfile.TarInfo(item.relpath)
            info.size = len(item.content)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(item.content))
    data = gzip.compress(buffer.getvalue(), compresslevel=9, mtime=0)
    return AgentArchive(data, hashlib.sha256(data).hexdigest(), agent_version())


def agent_requirements() -> tuple[str, ...]:
    """The agent's pip requirements (pyproject's ``dependencies``, without the extras)."""
    try:
        declared = importlib.metadata.requires(DISTRIBUTION) or []
    except importlib.metadata.PackageNotFoundError:
        raise XdriveError(
            "xdrive's package metadata is missing, so the agent's dependencies are unknown",
            "install xdrive (pip install -e . in the repository) instead of running from a copy",
        ) from None
    return tuple(r.strip() for r in declared if "extra ==" not in r.replace('"', " "))
