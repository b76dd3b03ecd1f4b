"""Point dockerd at the drive and tie docker's lifetime to the agent's.

- ``merge_daemon_json``: set ``data-root`` in /etc/docker/daemon.json, keeping every other
  key (GPU images carry ``runtimes.nvidia`` there); a file that is not valid JSON is refused,
  never overwritten.
- ``render_docker_dropin`` / ``install_docker_dropin``: a docker.service drop-in ordering
  docker after the agent.
- ``DockerControl``: the commands that start and stop docker (systemctl in production, the
  sandbox's dockerctl CLI in tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from xdrive.agent import commands, files
from xdrive.errors import ConfigError, XdriveError

DATA_ROOT_KEY = "data-root"
DROPIN_RELPATH = Path("etc/systemd/system/docker.service.d/xdrive.conf")


def read_daemon_json(path: files.PathLike) -> dict[str, Any]:
    """The daemon.json at ``path`` ({} if missing), or ConfigError if xdrive cannot merge
    into it. The agent reads it before it touches EC2, so a bad file changes nothing."""
    target = Path(path)
    config = files.read_json(target)
    if "graph" in config:
        # dockerd refuses to start with both keys; docker 23+ rejects "graph" outright.
        raise ConfigError(
            f"{target} sets the removed key 'graph' ({config['graph']!r})",
            f"remove 'graph' from {target}; xdrive sets '{DATA_ROOT_KEY}' itself",
        )
    return config


def merge_daemon_json(path: files.PathLike, data_root: str) -> bool:
    """Set ``data-root`` in the daemon.json at ``path``; True if the file changed.

    A missing file is created. A file that is not a JSON object raises ConfigError and
    is left untouched: overwriting it would silently drop the user's docker settings.
    """
    target = Path(path)
    config = read_daemon_json(target)
    if config.get(DATA_ROOT_KEY) == data_root:
        return False
    config[DATA_ROOT_KEY] = data_root
    try:
        mode = os.stat(target).st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644
    files.write_json(target, config, mode)
    return True


def render_docker_dropin(agent_unit: str = "xdrive-agent.service", mountpoint: str = "/v1") -> str:
    """The text of ``docker.service.d/xdrive.conf``."""
    return f"""\
# Installed by xdrive: docker's data-root lives on the xdrive drive mounted at {mountpoint}.
[Unit]
# The agent is Type=notify: docker starts only once the agent says READY (drive restored,
# mounted, grown). Units stop in reverse start order, so at shutdown docker stops (and
# stops its containers) before the agent unmounts and snapshots the drive.
After={agent_unit}
# Requires=, not Wants=: when the agent fails to start, docker's start fails too, instead
# of starting on an empty {mountpoint}/docker on the root disk. Stopping or restarting the
# agent stops or restarts docker first. Not BindsTo=: that would also stop docker whenever
# the agent's process exits on its own, taking containers down while the drive is mounted.
Requires={agent_unit}
# The agent stays active after a save has unmounted the drive; socket activation must not
# start docker then.
AssertPathIsMountPoint={mountpoint}
"""


def install_docker_dropin(
    root: Path, agent_unit: str = "xdrive-agent.service", mountpoint: str = "/v1"
) -> bool:
    """Write the drop-in under ``root``; True if it changed (then run
    ``systemctl daemon-reload``)."""
    target = Path(root) / DROPIN_RELPATH
    text = render_docker_dropin(agent_unit, mountpoint)
    try:
        if target.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    files.write_atomic(target, text, 0o644)
    return True


def docker_root_dir(docker_url: str, timeout_s: float = 10.0) -> str:
    """The data-root the running dockerd actually uses (``docker info``'s DockerRootDir)."""
    import docker  # the agent imports the SDK only where it talks to dockerd
    import docker.errors

    try:
        client = docker.DockerClient(base_url=docker_url, timeout=int(max(1, timeout_s)))
    except docker.errors.DockerException as e:
        raise XdriveError(f"cannot reach dockerd at {docker_url}: {e}", "is docker running?") from e
    try:
        info = client.info()
    except (docker.errors.DockerException, OSError) as e:
        raise XdriveError(f"cannot reach dockerd at {docker_url}: {e}", "is docker running?") from e
    finally:
        client.close()
    return str(info["DockerRootDir"])


@dataclass(frozen=True)
class DockerControl:
    """How to start and stop docker. Both socket and service: stopping only the service
    lets socket activation start it again.

    In production ``start()`` must run after the agent sent READY=1: docker.service is
    ordered After= the agent, so a blocking ``systemctl start`` issued earlier would wait
    for the agent that waits for it.
    """

    start_argv: tuple[str, ...] = ("systemctl", "start", "docker.socket", "docker.service")
    stop_argv: tuple[str, ...] = ("systemctl", "stop", "docker.socket", "docker.service")

    def start(self, timeout_s: Optional[float] = None) -> None:
        commands.run(self.start_argv, timeout_s=timeout_s)

    def stop(self, timeout_s: Optional[float] = None) -> None:
        """Stop docker; dockerd stops containers without marking them user-stopped, so
        ``--restart unless-stopped`` containers come back on the next instance."""
        commands.run(self.stop_argv, timeout_s=timeout_s)
