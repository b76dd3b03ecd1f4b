"""Helpers shared by the save-path tests (test_save_*.py); no tests of its own.

Everything runs in the sandbox: the real agent in its own process, moto behind the
fidelity middleware, loop devices, a real dockerd per instance. Snapshot contents are read
from the block plane's image files with e2fsprogs (debugfs, e2fsck -n): no extra mounts,
nothing to clean up.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import pytest

from xdrive import tags
from xdrive.agent.config import AgentConfig
from xdrive.agent.state import AgentStatus
from xdrive.ec2 import Ec2, Snapshot, Volume
from xdrive.sandbox import dockerctl
from xdrive.sandbox.core import Sandbox, SimInstance

IMAGE = "xdrive/busybox:latest"
T = TypeVar("T")


def agent_config(
    sb: Sandbox,
    inst: SimInstance,
    drive: str,
    *,
    docker: bool = True,
    reserve_s: Optional[float] = None,
    poll_interval_s: float = 0.5,
) -> AgentConfig:
    config = sb.agent_config(inst, drive, docker=docker, poll_interval_s=poll_interval_s)
    if reserve_s is not None:
        config = replace(config, watch=replace(config.watch, snapshot_reserve_s=reserve_s))
    return config


def boot(
    sb: Sandbox,
    drive: str,
    az: str = "us-east-1a",
    *,
    inst: Optional[SimInstance] = None,
    **settings: Any,
) -> SimInstance:
    """Launch a spot instance (or reuse ``inst``) and start the agent; return once it watches."""
    inst = inst or sb.launch(az)
    sb.start_agent(inst.instance_id, agent_config(sb, inst, drive, **settings))
    sb.wait_ready(inst.instance_id, timeout_s=90)
    return inst


def ec2(sb: Sandbox) -> Ec2:
    return Ec2(sb.client())


def drive_snapshots(sb: Sandbox, drive: str) -> tuple[Snapshot, ...]:
    return ec2(sb).drive_snapshots(drive)


def checkpoint_and_final(snaps: tuple[Snapshot, ...]) -> tuple[Snapshot, Snapshot]:
    """The one checkpoint and the one final (moto's StartTime has 1 s resolution, so the
    order of two snapshots taken within a second is not theirs)."""
    (checkpoint,) = [s for s in snaps if s.tags.get(tags.KIND) == tags.CHECKPOINT]
    (final,) = [s for s in snaps if s.tags.get(tags.KIND) == tags.FINAL]
    return checkpoint, final


def volume(sb: Sandbox, volume_id: str) -> Optional[Volume]:
    return ec2(sb).volume(volume_id)


def wait_for(check: Callable[[], Optional[T]], what: str, timeout_s: float = 60.0) -> T:
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(0.1)


def wait_phase(sb: Sandbox, inst: SimInstance, phase: str, timeout_s: float = 90.0) -> AgentStatus:
    """Until the agent's status file says ``phase``; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout_s
    while True:
        status = inst.status()
        if status is not None and status.phase == phase:
            return status
        agent = inst.agent
        if agent is not None and agent.poll() is not None:
            status = inst.status()
            if status is not None and status.phase == phase:
                return status
            pytest.fail(
                f"agent exited with {agent.returncode} before '{phase}':\n"
                + sb.agent_log_tail(inst.instance_id, 60)
            )
        if time.monotonic() > deadline:
            pytest.fail(
                f"agent not '{phase}' within {timeout_s:.0f} s:\n"
                + sb.agent_log_tail(inst.instance_id, 60)
            )
        time.sleep(0.1)


def with_checkpoint(inst: SimInstance) -> Optional[AgentStatus]:
    """The agent's status once it records a checkpoint, else None (for wait_for)."""
    status = inst.status()
    return status if status is not None and status.last_checkpoint is not None else None


def check_snapshot(
    snap: Snapshot,
    *,
    drive: str,
    kind: str,
    reason: str,
    generation: int,
    volume_id: str,
    instance_id: str,
) -> None:
    """The tags every snapshot the agent takes must carry."""
    assert snap.tags[tags.NAME] == drive
    assert snap.tags[tags.KIND] == kind
    assert snap.tags[tags.REASON] == reason
    assert snap.generation == generation
    assert snap.tags[tags.SOURCE_VOLUME] == volume_id == snap.volume_id
    assert snap.tags[tags.INSTANCE] == instance_id


# --- reading a snapshot's filesystem without mounting it -----------------------------------


def image_of(sb: Sandbox, snapshot_id: str) -> Path:
    return sb.blocks.snapshot_path(snapshot_id)


def fsck(image: Path) -> subprocess.CompletedProcess[str]:
    """``e2fsck -fn``: a full check that opens the image read-only and changes nothing."""
    return subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)


def read_in_image(image: Path, path: str) -> bytes:
    done = subprocess.run(["debugfs", "-R", f"cat {path}", str(image)], capture_output=True)
    assert done.returncode == 0, done.stderr
    return done.stdout


def list_in_image(image: Path, directory: str) -> list[str]:
    """File names in ``directory`` of the image (``debugfs ls -p``: /ino/mode/uid/gid/name/...)."""
    done = subprocess.run(
        ["debugfs", "-R", f"ls -p {directory}", str(image)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    names = [line.split("/")[5] for line in done.stdout.splitlines() if line.startswith("/")]
    return [n for n in names if n not in (".", "..")]


# --- files and containers ------------------------------------------------------------------


def write_project(root: Path, files: int = 6, size: int = 256 * 1024) -> dict[str, str]:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(files):
        (root / f"data-{i}.bin").write_bytes(os.urandom(size))
    (root / "notes.txt").write_text("the project's notes\n")
    return checksums(root)


def checksums(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def docker_client(inst: SimInstance) -> Any:
    import docker

    return docker.DockerClient(base_url=inst.docker_url, timeout=30)


def import_image(inst: SimInstance) -> None:
    dockerctl.import_busybox_image(inst.docker_url, IMAGE)


def run_container(
    client: Any,
    name: str,
    script: str,
    *,
    volume: Optional[str] = None,
    stop_timeout: Optional[int] = None,
    restart: str = "unless-stopped",
) -> str:
    """Create and start a busybox container (the low-level API: it knows stop_timeout)."""
    api = client.api
    host_config = api.create_host_config(
        binds=[f"{volume}:/data:rw"] if volume else None,
        network_mode="none",
        restart_policy={"Name": restart},
    )
    created = api.create_container(
        IMAGE,
        ["sh", "-c", script],
        name=name,
        host_config=host_config,
        stop_timeout=stop_timeout,
    )
    api.start(created["Id"])
    return str(created["Id"])


def docker_volume_file(inst: SimInstance, volume: str, name: str) -> Path:
    return inst.root / "v1/docker/volumes" / volume / "_data" / name
