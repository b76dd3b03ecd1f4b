"""The user-data a drive's instances boot with: the agent config for the drive, and the
agent fetched from S3 (``agentstore``), rendered by ``xdrive.cloudinit.render``.

`xdrive userdata NAME` uploads the agent archive to the account's agent bucket first (once
per version; skipped when it is there), so what it prints works as is. With ``--agent-url``
and ``--agent-sha256`` it prints user-data for an archive the caller hosts and calls no AWS
API at all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from xdrive.agent.config import AgentConfig, VolumeSettings
from xdrive.cloudinit.bundle import AgentArchive, agent_archive
from xdrive.cloudinit.render import Distro, UserDataSettings, render_userdata
from xdrive.errors import ConfigError
from xdrive.launcher.agentstore import AgentObject, agent_object, default_bucket, upload_agent
from xdrive.launcher.aws import Aws
from xdrive.names import validate_drive_name

DEFAULT_SIZE_GIB = 20


@dataclass(frozen=True)
class AgentSource:
    """Where instances fetch the agent: an S3 object of ours, or a URL the caller gives."""

    url: str
    sha256: str
    target: Optional[AgentObject] = None  # set when the launcher uploads it


@dataclass(frozen=True)
class UserDataResult:
    data: bytes
    drive: str
    distro: Distro
    compressed: bool
    agent: AgentSource
    uploaded: bool  # the agent archive was uploaded by this call


def agent_config(drive: str, size_gib: int = DEFAULT_SIZE_GIB) -> AgentConfig:
    """The production agent config: endpoints, region and instance from IMDS on the instance."""
    if not 1 <= size_gib <= 16384:
        raise ConfigError(f"--size {size_gib} GiB is out of range", "use 1..16384 GiB")
    return AgentConfig(drive=drive, volume=VolumeSettings(size_gib=size_gib))


def render(
    drive: str,
    source: AgentSource,
    *,
    distro: Distro = "al2023",
    size_gib: int = DEFAULT_SIZE_GIB,
    compress: bool = True,
) -> bytes:
    """The user-data bytes (gzip'd when ``compress``); raises before anything is created."""
    settings = UserDataSettings(
        drive=validate_drive_name(drive),
        agent=agent_config(drive, size_gib),
        distro=distro,
        agent_source="url",
        agent_url=source.url,
        agent_sha256=source.sha256,
        compress=compress,
    )
    return render_userdata(settings)


def s3_agent_source(aws: Aws, bucket: Optional[str]) -> tuple[AgentArchive, AgentSource]:
    """This launcher's agent archive and its object in ``bucket`` (default: the account's)."""
    archive = agent_archive()
    target = agent_object(archive, bucket or default_bucket(aws.account_id, aws.region))
    return archive, AgentSource(target.url, archive.sha256, target)


def given_agent_source(url: Optional[str], sha256: Optional[str]) -> Optional[AgentSource]:
    if not url and not sha256:
        return None
    if not url or not sha256:
        raise ConfigError(
            "--agent-url and --agent-sha256 go together",
            "give both (the sha256 of the archive at the URL), or neither to use S3",
        )
    return AgentSource(url, sha256.lower())


def publish_agent(aws: Aws, archive: AgentArchive, source: AgentSource) -> bool:
    """Upload the archive to its S3 object unless it is there; True if uploaded."""
    if source.target is None:
        return False
    return upload_agent(aws.client("s3"), archive, source.target, aws.region, aws.account_id)


def userdata(
    aws: Optional[Aws],
    drive: str,
    *,
    distro: Distro = "al2023",
    size_gib: int = DEFAULT_SIZE_GIB,
    compress: bool = False,
    agent_url: Optional[str] = None,
    agent_sha256: Optional[str] = None,
    agent_bucket: Optional[str] = None,
) -> UserDataResult:
    """`xdrive userdata`: render, uploading the agent first unless a URL is given."""
    validate_drive_name(drive)
    given = given_agent_source(agent_url, agent_sha256)
    if given is not None:
        data = render(drive, given, distro=distro, size_gib=size_gib, compress=compress)
        return UserDataResult(data, drive, distro, compress, given, uploaded=False)
    if aws is None:
        raise ConfigError(
            "user-data needs the agent's URL", "give --agent-url and --agent-sha256, or AWS access"
        )
    archive, source = s3_agent_source(aws, agent_bucket)
    data = render(drive, source, distro=distro, size_gib=size_gib, compress=compress)
    uploaded = publish_agent(aws, archive, source)
    return UserDataResult(data, drive, distro, compress, source, uploaded)
