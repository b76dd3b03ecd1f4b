"""User-data (#cloud-config) that installs the xdrive agent and starts it at first boot.

Only modules cloud-init 22.2 (Amazon Linux 2023's) knows, with keys older than 22.2:
``write_files`` (path, content, permissions), ``packages`` and ``runcmd``. What runs when:

- init stage, ``write_files``: agent config, unit, docker drop-in, entry script, bootstrap
  and, when embedded, the agent's sources. systemd cannot start the agent yet: its unit
  asserts the bootstrap's marker.
- final stage, ``packages``: pip/venv and the Python dependencies the distribution packages.
- final stage, ``runcmd`` (``set -e``: a failed step stops the rest):
  1. docker, unless the image has one (GPU images carry docker-ce and its nvidia runtime;
     Ubuntu's docker.io would replace it);
  2. the bootstrap (cloudinit/bootstrap.py): venv, missing dependencies, agent from the URL
     if any, import check, marker;
  3. ``systemctl daemon-reload``; enable docker; ``systemctl enable --now
     xdrive-agent.service``, which returns once the drive is mounted; start docker.

The agent runs on the distribution's python3 (3.9 on Amazon Linux 2023) from a venv with
``--system-site-packages`` at /opt/xdrive/venv, its code in /opt/xdrive/lib; xdrive never
comes from PyPI, and the code is exactly the launcher's (embedded, or checked by sha256).
"""

from __future__ import annotations

import gzip
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal, Optional, Union
from urllib.parse import urlsplit

from xdrive.agent.config import AgentConfig, parse_config
from xdrive.cloudinit import bundle, credentials, layout, units, yamltext
from xdrive.cloudinit.bootstrap import BootstrapSettings
from xdrive.errors import ConfigError, XdriveError
from xdrive.names import validate_drive_name

Distro = Literal["al2023", "ubuntu"]
AgentSource = Literal["embedded", "url"]
DISTROS: tuple[Distro, ...] = ("al2023", "ubuntu")
AGENT_SOURCES: tuple[AgentSource, ...] = ("embedded", "url")
USERDATA_LIMIT = 16384  # EC2: 16 KB of raw user-data, before base64
URL_SCHEMES = ("https", "http", "s3")  # the archive's sha256 is checked whatever the scheme

# Must exist in every release of the distribution: one unknown name fails the whole install.
_PACKAGES: Mapping[Distro, tuple[str, ...]] = {
    # python3 and python3-requests come with the image (cloud-init needs them).
    "al2023": ("python3-pip", "python3-requests"),
    "ubuntu": (
        "python3-pip",
        "python3-venv",
        "python3-boto3",
        "python3-requests",
        "python3-docker",
        "python3-systemd",
    ),
}
_INSTALL_DOCKER: Mapping[Distro, str] = {
    "al2023": "command -v dockerd >/dev/null || dnf install -y docker",
    "ubuntu": (
        "command -v dockerd >/dev/null || DEBIAN_FRONTEND=noninteractive"
        " apt-get install -y -q -o DPkg::Lock::Timeout=300 docker.io"
    ),
}
# Packages some AL2023 releases lack (python3-boto3 arrived in 2023, python3-docker is not
# packaged): strict=0 skips missing names, pip fills the gaps.
_OPTIONAL_PACKAGES: Mapping[Distro, Optional[str]] = {
    "al2023": "dnf install -y --setopt=strict=0 python3-boto3 python3-systemd || true",
    "ubuntu": None,
}
_DOCKER_UNITS = ("docker.socket", "docker.service")


class UserDataTooLarge(XdriveError):
    """The rendered user-data is over EC2's limit; nothing was written or launched."""

    def __init__(self, size: int, limit: int, compressed: bool, source: AgentSource) -> None:
        self.size = size
        self.limit = limit
        ways = [] if compressed else ["compress it (gzip; cloud-init unpacks it)"]
        if source == "embedded":
            ways.append(
                "use --agent-url to fetch the agent from S3 instead of embedding it "
                "(upload xdrive.cloudinit.bundle.agent_archive())"
            )
        super().__init__(
            f"user-data is {size} bytes{' gzip-compressed' if compressed else ''}, "
            f"over EC2's limit of {limit} bytes",
            ("; or ".join(ways) or "shorten the agent config") + ".",
        )


@dataclass(frozen=True)
class UserDataSettings:
    drive: str
    agent: AgentConfig  # written as /etc/xdrive/agent.json
    distro: Distro = "al2023"
    agent_source: AgentSource = "embedded"
    agent_url: Optional[str] = None  # https (e.g. S3 presigned), http or s3:// (instance profile)
    agent_sha256: Optional[str] = None  # of agent_archive().data uploaded to agent_url
    compress: bool = True

    def __post_init__(self) -> None:
        validate_drive_name(self.drive)
        if self.agent.drive != self.drive:
            raise ConfigError(
                f"the agent config is for drive {self.agent.drive!r}, not {self.drive!r}",
                "build the agent config with the same drive name",
            )
        if self.distro not in DISTROS:
            raise ConfigError(f"unknown distro {self.distro!r}", f"use one of {', '.join(DISTROS)}")
        if self.agent_source not in AGENT_SOURCES:
            raise ConfigError(
                f"unknown agent source {self.agent_source!r}", "use 'embedded' or 'url'"
            )
        if self.agent_source == "embedded":
            if self.agent_url or self.agent_sha256:
                raise ConfigError(
                    "an agent URL was given for an embedded agent", "use agent_source='url'"
                )
        else:
            _check_url(self.agent_url)
            _check_sha256(self.agent_sha256)


@dataclass(frozen=True)
class UserDataSizes:
    raw: int
    gzip: int
    limit: int = USERDATA_LIMIT


def render_userdata(
    settings: UserDataSettings, *, environ: Optional[Mapping[str, str]] = None
) -> bytes:
    """The user-data to pass to RunInstances (gzip'd when ``settings.compress``).

    Raises ``UserDataTooLarge`` over 16 KB and ``CredentialsInUserData`` when anything
    looks like a credential. ``environ`` (default: os.environ) supplies the AWS credential
    variables whose values must not appear.
    """
    text = render_document(settings, environ=environ).encode("utf-8")
    data = compress(text) if settings.compress else text
    if len(data) > USERDATA_LIMIT:
        raise UserDataTooLarge(len(data), USERDATA_LIMIT, settings.compress, settings.agent_source)
    return data


def write_userdata(
    settings: UserDataSettings,
    path: Union[str, Path],
    *,
    environ: Optional[Mapping[str, str]] = None,
) -> int:
    """Render, then write ``path`` atomically; a refused render leaves ``path`` untouched."""
    data = render_userdata(settings, environ=environ)
    target = Path(path)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", dir=str(target.parent or "."))
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
        os.chmod(temp, 0o644)
        os.replace(temp, target)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return len(data)


def userdata_sizes(
    settings: UserDataSettings, *, environ: Optional[Mapping[str, str]] = None
) -> UserDataSizes:
    """Raw and gzip'd size of the user-data for ``settings``, whether or not it fits."""
    text = render_document(settings, environ=environ).encode("utf-8")
    return UserDataSizes(raw=len(text), gzip=len(compress(text)))


def compress(data: bytes) -> bytes:
    """gzip, reproducibly (no time, no name). cloud-init tries gunzip on all user-data."""
    return gzip.compress(data, compresslevel=9, mtime=0)


def render_document(
    settings: UserDataSettings, *, environ: Optional[Mapping[str, str]] = None
) -> str:
    """The #cloud-config text, checked for credentials but not for size."""
    env = os.environ if environ is None else environ
    config_json = settings.agent.to_json()
    # The instance must accept it: a config the agent refuses would fail at boot, far away.
    parse_config(json.loads(config_json), source="agent config")
    credentials.check_config(json.loads(config_json), env)
    if settings.agent_url:
        credentials.check_url(settings.agent_url, env)
    docker = settings.agent.docker.enabled
    version = bundle.agent_version()
    bootstrap_settings = BootstrapSettings(
        prefix=layout.PREFIX,
        version=version,
        requirements=bundle.agent_requirements(),
        agent_url=settings.agent_url,
        agent_sha256=settings.agent_sha256,
    )
    files: list[Mapping[str, yamltext.Scalar]] = [
        _file(layout.CONFIG_FILE, config_json),
        _file(layout.UNIT_FILE, units.render_unit()),
    ]
    if docker:
        dropin = units.render_docker_dropin(mountpoint=settings.agent.mountpoint)
        files.append(_file(layout.DOCKER_DROPIN_FILE, dropin))
    files += [
        _file(layout.ENTRY_SCRIPT, units.render_entry_script(), "0755"),
        _file(layout.VERSION_FILE, version + "\n"),
        _file(layout.BOOTSTRAP_SCRIPT, _bootstrap_source()),
        _file(layout.BOOTSTRAP_SETTINGS, bootstrap_settings.to_json()),
    ]
    if settings.agent_source == "embedded":
        for item in bundle.agent_files():
            files.append(_file(f"{layout.LIB_DIR}/{item.relpath}", item.content.decode("utf-8")))
    document: dict[str, Sequence[yamltext.Item]] = {
        "write_files": files,
        "packages": list(_PACKAGES[settings.distro]),
        "runcmd": _runcmd(settings.distro, docker),
    }
    header = (
        "#cloud-config\n"
        f"# xdrive {version}: agent for drive {settings.drive} on {settings.distro}"
        f" ({settings.agent_source}). No credentials: the instance profile gives AWS access.\n"
    )
    text = header + yamltext.dump(document)
    credentials.check_document(text, settings.agent_url, env)
    return text


def _runcmd(distro: Distro, docker: bool) -> list[yamltext.Item]:
    commands: list[yamltext.Item] = ["set -eu"]
    if docker:
        # Before the bootstrap: Ubuntu's docker.io starts docker during its install, which
        # must fail (the unit's assert), not start the agent in the middle of apt.
        commands.append(_INSTALL_DOCKER[distro])
    optional = _OPTIONAL_PACKAGES[distro]
    if optional:
        commands.append(optional)
    commands += [
        [layout.SYSTEM_PYTHON, layout.BOOTSTRAP_SCRIPT, layout.BOOTSTRAP_SETTINGS],
        ["systemctl", "daemon-reload"],
    ]
    if docker:
        commands.append(["systemctl", "enable", *_DOCKER_UNITS])
    # Blocks until the agent says READY (drive mounted), so cloud-init's "done" means ready.
    commands.append(["systemctl", "enable", "--now", layout.AGENT_UNIT])
    if docker:
        commands.append(["systemctl", "start", *_DOCKER_UNITS])
    return commands


def _file(path: str, content: str, permissions: str = "0644") -> Mapping[str, yamltext.Scalar]:
    return {"path": path, "permissions": permissions, "content": content}


def _bootstrap_source() -> str:
    return resources.files("xdrive.cloudinit").joinpath("bootstrap.py").read_text("utf-8")


def _check_url(url: Optional[str]) -> None:
    fix = "give the https:// (e.g. S3 presigned) or s3:// URL of agent_archive()'s upload"
    if not url:
        raise ConfigError("agent_source is 'url' but no agent URL was given", fix)
    if any(c.isspace() or c in "\"'\\`" or not c.isprintable() for c in url):
        raise ConfigError("the agent URL contains spaces, quotes or control characters", fix)
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES or not parts.netloc:
        raise ConfigError(f"the agent URL must start with {', '.join(URL_SCHEMES)}://", fix)
    if parts.scheme == "s3" and not parts.path.strip("/"):
        raise ConfigError("the agent URL names an S3 bucket but no object", fix)


def _check_sha256(digest: Optional[str]) -> None:
    if not digest or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ConfigError(
            "agent_sha256 must be the 64 lowercase hex digits of the agent archive's sha256",
            "use agent_archive().sha256 for the archive uploaded to the agent URL",
        )
