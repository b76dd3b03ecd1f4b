"""Put docker on the drive: data-root on /v1/docker, started after the drive is mounted."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable

from xdrive.agent import docker_setup
from xdrive.agent.config import AgentConfig
from xdrive.errors import XdriveError

log = logging.getLogger("xdrive.agent.docker")


def docker_data_root(config: AgentConfig) -> str:
    return str(config.mount_path / "docker")


def configure_docker(config: AgentConfig) -> str:
    """Merge data-root into daemon.json and install the docker.service drop-in."""
    data_root = docker_data_root(config)
    Path(data_root).mkdir(mode=0o710, exist_ok=True)
    if docker_setup.merge_daemon_json(config.host_path(config.docker.daemon_json), data_root):
        log.info("daemon.json: data-root set to %s", data_root)
    if docker_setup.install_docker_dropin(Path(config.root), mountpoint=config.mountpoint):
        log.info("installed the docker.service drop-in")
    return data_root


def start_docker_on_drive(
    config: AgentConfig,
    control: docker_setup.DockerControl,
    *,
    timeout_s: float = 120.0,
    sleep: Callable[[float], None] = time.sleep,
) -> str:
    """Start docker and wait until it reports the drive as its root; return that root.

    A dockerd already running elsewhere (started before the drive was mounted) is
    restarted, since data-root is read only at daemon start.
    """
    data_root = docker_data_root(config)
    url = config.docker.url
    current = _root_or_none(url)
    if current is not None and current != data_root:
        log.warning("dockerd runs on %s, not the drive: restarting it", current)
        control.stop(timeout_s=config.docker.stop_timeout_s)
        current = None
    if current is None:
        control.start(timeout_s=timeout_s)
    deadline = time.monotonic() + timeout_s
    while True:
        current = _root_or_none(url)
        if current == data_root:
            return data_root
        if current is not None:
            raise XdriveError(
                f"dockerd started with data-root {current}, not {data_root}",
                f"check {config.docker.daemon_json} and dockerd's command line (--data-root)",
            )
        if time.monotonic() > deadline:
            raise XdriveError(
                f"dockerd did not answer at {url} within {timeout_s:.0f} s",
                "see `journalctl -u docker`",
            )
        sleep(0.2)


def _root_or_none(url: str) -> str | None:
    try:
        return docker_setup.docker_root_dir(url, timeout_s=5.0)
    except XdriveError:
        return None
