"""daemon.json merge, the docker.service drop-in, and DockerControl."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from xdrive.agent import commands
from xdrive.agent.docker_setup import (
    DROPIN_RELPATH,
    DockerControl,
    docker_root_dir,
    install_docker_dropin,
    merge_daemon_json,
    render_docker_dropin,
)
from xdrive.errors import ConfigError, XdriveError

GPU_DAEMON_JSON = {
    "default-runtime": "nvidia",
    "runtimes": {"nvidia": {"args": [], "path": "nvidia-container-runtime"}},
    "log-driver": "json-file",
    "log-opts": {"max-size": "10m"},
}


def test_merge_sets_data_root_and_keeps_every_other_key(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text(json.dumps(GPU_DAEMON_JSON))
    assert merge_daemon_json(path, "/v1/docker") is True
    assert json.loads(path.read_text()) == {**GPU_DAEMON_JSON, "data-root": "/v1/docker"}


def test_merge_is_idempotent_and_does_not_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    merge_daemon_json(path, "/v1/docker")
    inode = path.stat().st_ino
    assert merge_daemon_json(path, "/v1/docker") is False
    assert path.stat().st_ino == inode  # an atomic rewrite would have a new inode
    assert merge_daemon_json(path, "/v2/docker") is True
    assert json.loads(path.read_text()) == {"data-root": "/v2/docker"}


def test_merge_creates_a_missing_file_and_keeps_an_existing_mode(tmp_path: Path) -> None:
    path = tmp_path / "etc" / "docker" / "daemon.json"
    assert merge_daemon_json(path, "/v1/docker") is True
    assert json.loads(path.read_text()) == {"data-root": "/v1/docker"}
    assert path.stat().st_mode & 0o777 == 0o644
    os.chmod(path, 0o600)
    merge_daemon_json(path, "/v9/docker")
    assert path.stat().st_mode & 0o777 == 0o600


@pytest.mark.parametrize(
    "content",
    ['{"runtimes": {"nvidia": ', "[1, 2]", "not json", b"\xff\xfe{}"],
    ids=["truncated", "array", "text", "binary"],
)
def test_merge_refuses_invalid_json_and_leaves_it_untouched(
    tmp_path: Path, content: str | bytes
) -> None:
    path = tmp_path / "daemon.json"
    raw = content if isinstance(content, bytes) else content.encode()
    path.write_bytes(raw)
    with pytest.raises(ConfigError, match="left unchanged"):
        merge_daemon_json(path, "/v1/docker")
    assert path.read_bytes() == raw
    assert [p.name for p in tmp_path.iterdir()] == ["daemon.json"]  # no temp files left


def test_merge_refuses_the_removed_graph_key(tmp_path: Path) -> None:
    path = tmp_path / "daemon.json"
    path.write_text('{"graph": "/data/docker"}')
    with pytest.raises(ConfigError, match="graph"):
        merge_daemon_json(path, "/v1/docker")
    assert json.loads(path.read_text()) == {"graph": "/data/docker"}


def _unit_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def test_dropin_orders_docker_after_the_agent_and_requires_the_drive() -> None:
    lines = _unit_lines(render_docker_dropin())
    assert lines == [
        "[Unit]",
        "After=xdrive-agent.service",
        "Requires=xdrive-agent.service",
        "AssertPathIsMountPoint=/v1",
    ]
    assert "Wants=" not in "\n".join(lines)  # Wants= would start docker without the drive
    custom = _unit_lines(render_docker_dropin("agent.service", "/mnt/drive"))
    assert "AssertPathIsMountPoint=/mnt/drive" in custom
    assert "After=agent.service" in custom


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None
    or not Path("/lib/systemd/system/docker.service").exists(),
    reason="needs systemd-analyze and Debian's docker.service",
)
def test_dropin_is_accepted_by_systemd_analyze(tmp_path: Path) -> None:
    for unit in ("docker.service", "docker.socket"):
        shutil.copy(Path("/lib/systemd/system") / unit, tmp_path / unit)
    (tmp_path / "xdrive-agent.service").write_text(
        "[Unit]\nDescription=stub\n[Service]\nType=notify\nExecStart=/bin/true\n"
    )
    dropin = tmp_path / "docker.service.d" / "xdrive.conf"
    dropin.parent.mkdir()
    dropin.write_text(render_docker_dropin())
    result = subprocess.run(
        ["systemd-analyze", "verify", "docker.service"],
        env={**os.environ, "SYSTEMD_UNIT_PATH": f"{tmp_path}:"},
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert "xdrive.conf" not in result.stderr  # no unknown or malformed keys


def test_install_dropin_under_root(tmp_path: Path) -> None:
    assert install_docker_dropin(tmp_path) is True
    target = tmp_path / DROPIN_RELPATH
    assert target == tmp_path / "etc/systemd/system/docker.service.d/xdrive.conf"
    assert target.read_text() == render_docker_dropin()
    assert install_docker_dropin(tmp_path) is False
    assert install_docker_dropin(tmp_path, mountpoint="/data") is True
    assert "AssertPathIsMountPoint=/data" in target.read_text()


def test_docker_control_runs_its_commands(tmp_path: Path) -> None:
    marker = tmp_path / "state"
    control = DockerControl(
        start_argv=("sh", "-c", f"echo started > {marker}"),
        stop_argv=("sh", "-c", f"echo stopped > {marker}"),
    )
    control.start()
    assert marker.read_text() == "started\n"
    control.stop(timeout_s=10)
    assert marker.read_text() == "stopped\n"


def test_docker_control_failures_and_timeouts_raise() -> None:
    with pytest.raises(commands.CommandFailed, match="exit status 1"):
        DockerControl(start_argv=("false",)).start()
    with pytest.raises(commands.CommandFailed, match="did not finish"):
        DockerControl(stop_argv=("sleep", "30")).stop(timeout_s=0.2)


def test_docker_control_defaults_stop_socket_and_service() -> None:
    control = DockerControl()
    assert control.start_argv == ("systemctl", "start", "docker.socket", "docker.service")
    assert control.stop_argv == ("systemctl", "stop", "docker.socket", "docker.service")


def test_docker_root_dir_without_a_daemon_is_a_clear_error(workdir: Path) -> None:
    with pytest.raises(XdriveError, match="cannot reach dockerd"):
        docker_root_dir(f"unix://{workdir}/nothing.sock", timeout_s=2)
