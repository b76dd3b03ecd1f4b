"""A real dockerd per instance root, with its data-root on a mounted loop filesystem."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import docker
import pytest

from xdrive.agent import filesystem
from xdrive.agent.docker_setup import DockerControl, docker_root_dir, merge_daemon_json
from xdrive.errors import ConfigError, XdriveError
from xdrive.sandbox import dockerctl

pytestmark = [pytest.mark.docker, pytest.mark.root]

IMAGE = "xdrive/busybox:latest"
# Exits at once on SIGTERM (a shell as PID 1 has no default signal handlers).
POLITE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]
STUBBORN = ["sh", "-c", "trap '' TERM; while :; do sleep 0.2; done"]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if text.encode() in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@contextlib.contextmanager
def _loop_mounted(workdir: Path, mountpoint: Path) -> Iterator[str]:
    image = workdir / "drive.img"
    with open(image, "wb") as f:
        f.truncate(256 * 1024 * 1024)
    device = subprocess.run(
        ["losetup", "-f", "--show", str(image)], check=True, capture_output=True, text=True
    ).stdout.strip()
    try:
        filesystem.make_filesystem(device, "ext4", "xdrive")
        filesystem.mount(device, mountpoint, "ext4")
        yield device
    finally:
        subprocess.run(["umount", str(mountpoint)], check=False, capture_output=True)
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def instance(workdir: Path) -> Iterator[Path]:
    """An instance root whose daemon.json data-root is on a mounted loop filesystem."""
    root = workdir / "i"
    with _loop_mounted(workdir, root / "v1"):
        merge_daemon_json(root / "etc/docker/daemon.json", str(root / "v1" / "docker"))
        try:
            yield root
        finally:
            dockerctl.stop_dockerd(root, timeout_s=5)


def _client(root: Path) -> docker.DockerClient:
    return docker.DockerClient(base_url=dockerctl.docker_url(root))


def test_dockerd_runs_containers_on_the_drive_and_stops_completely(instance: Path) -> None:
    root = instance
    pid = dockerctl.start_dockerd(root)
    assert dockerctl.dockerd_running(root)
    assert dockerctl.start_dockerd(root) == pid  # idempotent: finds the running one
    containerd = [
        c for c in dockerctl._descendants(pid) if "containerd" in " ".join(dockerctl._cmdline(c))
    ]
    assert containerd, "dockerd should supervise its own containerd"

    url = dockerctl.docker_url(root)
    dockerctl.import_busybox_image(url)
    assert docker_root_dir(url) == str(root / "v1" / "docker")
    assert (root / "v1" / "docker" / "image").is_dir()  # dockerd's state is on the drive

    client = _client(root)
    try:
        out = client.containers.run(
            IMAGE, ["sh", "-c", "echo hi > /f && cat /f"], remove=True, network_mode="none"
        )
        assert out == b"hi\n"
        client.containers.run(IMAGE, POLITE, detach=True, network_mode="none")
    finally:
        client.close()
    shims = _pids_mentioning(str(root / "run" / "docker-exec" / "containerd"))
    assert any(s not in containerd for s in shims), "a running container has a shim"

    assert dockerctl.stop_dockerd(root, timeout_s=20)
    assert not dockerctl.dockerd_running(root)
    for gone in [pid, *containerd, *shims]:
        assert not _alive(gone), f"pid {gone} survived stop_dockerd"
    assert not dockerctl.stop_dockerd(root)  # already stopped: nothing to do
    # nothing holds the drive any more
    assert filesystem.processes_using(root / "v1") == []
    assert filesystem.unmount(root / "v1")


def test_stop_kills_a_dockerd_that_does_not_stop_in_time(instance: Path) -> None:
    root = instance
    pid = dockerctl.start_dockerd(root)
    url = dockerctl.docker_url(root)
    dockerctl.import_busybox_image(url)
    client = _client(root)
    try:
        container = client.containers.run(
            IMAGE, STUBBORN, detach=True, network_mode="none", stop_signal="SIGTERM"
        )
        container_pid = (
            container.attrs["State"]["Pid"]
            or client.api.inspect_container(container.id)["State"]["Pid"]
        )
    finally:
        client.close()
    tree = [pid, *dockerctl._descendants(pid)]
    shims = _pids_mentioning(str(root / "run" / "docker-exec" / "containerd"))
    assert container_pid

    # dockerd gives the container 10 s; we give dockerd 1 s, then SIGKILL everything.
    dockerctl.stop_dockerd(root, timeout_s=1)
    for gone in [*tree, *shims, container_pid]:
        assert not _alive(gone), f"pid {gone} survived stop_dockerd"
    # the container's rootfs mount is gone too, so the drive can be unmounted
    assert filesystem.unmount(root / "v1")


def test_cli_works_as_the_agents_docker_commands(instance: Path) -> None:
    root = instance
    cli = (sys.executable, "-m", "xdrive.sandbox.dockerctl")
    control = DockerControl(
        start_argv=(*cli, "start", "--root", str(root)),
        stop_argv=(*cli, "stop", "--root", str(root)),
    )
    control.start(timeout_s=60)
    assert dockerctl.dockerd_running(root)
    status = subprocess.run([*cli, "status", "--root", str(root)], capture_output=True)
    assert status.returncode == 0
    control.stop(timeout_s=60)
    assert not dockerctl.dockerd_running(root)
    status = subprocess.run([*cli, "status", "--root", str(root)], capture_output=True)
    assert status.returncode == 3


def test_without_data_root_dockerd_stays_inside_the_instance_root(workdir: Path) -> None:
    root = workdir / "bare"
    argv = dockerctl.dockerd_argv(root)
    assert argv[argv.index("--data-root") + 1] == str(root / "var/lib/docker")
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{"data-root": "/v1/docker"}')
    assert "--data-root" not in dockerctl.dockerd_argv(root)  # dockerd rejects both


def test_rejects_roots_too_long_for_unix_sockets(tmp_path: Path) -> None:
    root = tmp_path / ("x" * 90)
    with pytest.raises(ConfigError, match="too long"):
        dockerctl.start_dockerd(root)
    assert not root.exists()


def test_stale_pidfile_is_not_taken_for_dockerd(workdir: Path) -> None:
    root = workdir / "stale"
    (root / "run").mkdir(parents=True)
    # our own PID: alive, but not this root's dockerd; stop must not signal it
    (root / "run/docker.pid").write_text(str(os.getpid()))
    assert not dockerctl.dockerd_running(root)
    assert dockerctl.stop_dockerd(root) is False


def test_a_dockerd_that_cannot_start_is_reported_with_its_log(workdir: Path) -> None:
    root = workdir / "broken"
    (root / "etc/docker").mkdir(parents=True)
    (root / "etc/docker/daemon.json").write_text('{"no-such-option": true}')
    with pytest.raises(XdriveError, match="exited while starting") as err:
        dockerctl.start_dockerd(root, timeout_s=30)
    assert "no-such-option" in str(err.value)  # the log tail says why
    assert not dockerctl.dockerd_running(root)
