"""The generated user-data boots the agent under a real systemd, and the drive moves zones.

Each "instance" is a sandbox instance (id, zone, IMDS, loop devices for its volumes) with a
machine: a fresh Debian image booted by systemd-nspawn, cloud-init reading the user-data
through NoCloud. Nothing of the agent is started by the test: cloud-init installs it (url
mode, fetched from 127.0.0.1 and checked by sha256), systemd runs it, docker starts on the
drive. What is asserted is what systemd, the kernel (mounts inside the container) and EC2
say, not what the agent printed.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import Any

import pytest

from tests.boot_helpers import drive_snapshots, drive_volumes, tags_of
from tests.e2e.archive_server import ArchiveServer
from tests.e2e.conftest import BootMachine
from tests.e2e.machine import Machine, agent_config
from xdrive import tags
from xdrive.agent.state import AgentStatus, read_status
from xdrive.cloudinit.render import UserDataSettings, render_userdata
from xdrive.sandbox.blocks import by_id_name
from xdrive.sandbox.core import ZONES, Sandbox, SimInstance

pytestmark = [pytest.mark.e2e, pytest.mark.root, pytest.mark.timeout(1800)]

DRIVE = "e2e"
PROOF = "/v1/e2e/proof"
# A shutdown save is requested well under a second after SIGTERM; this long means the
# agent's `systemctl stop docker.socket docker.service` sat out its 120 s timeout.
SHUTDOWN_STALL_S = 60.0


def userdata(sandbox: Sandbox, inst: SimInstance, download: ArchiveServer) -> bytes:
    """What the launcher would pass to RunInstances for this instance (gzip'd, <= 16 KB)."""
    settings = UserDataSettings(
        drive=DRIVE,
        agent=agent_config(sandbox, inst, DRIVE, docker=True),
        distro="ubuntu",  # the apt path; Debian bookworm stands in for Ubuntu
        agent_source="url",  # the embedded agent is over the 16 KB limit
        agent_url=download.url,
        agent_sha256=download.archive.sha256,
    )
    return render_userdata(settings)


def assert_first_boot_done(m: Machine) -> None:
    """systemd finished starting (cloud-final, whose runcmd starts the agent, included)
    with no failed unit, and cloud-init reports no error."""
    c = m.container
    state = c.wait_booted()
    assert state == "running", f"{c.name} booted {state}:\n{m.diagnostics()}"
    status = c.run("cloud-init", "status", "--long", "--wait", check=False)
    assert status.returncode == 0 and "status: done" in status.stdout, status.stdout
    result = json.loads(c.path("/run/cloud-init/result.json").read_text())["v1"]
    assert result["errors"] == [], m.diagnostics()
    assert "NoCloud" in result["datasource"]


def attached_volume(sandbox: Sandbox, m: Machine) -> dict[str, Any]:
    """The drive's one volume attached to this machine's instance, as EC2 says."""
    here = [
        v
        for v in drive_volumes(sandbox, DRIVE)
        if any(a["InstanceId"] == m.instance_id for a in v.get("Attachments", []))
    ]
    assert len(here) == 1, here
    assert here[0]["AvailabilityZone"] == m.instance.availability_zone
    return here[0]


def assert_agent_serving(m: Machine, volume_id: str) -> AgentStatus:
    """The unit is active, its status line names the volume, /v1 is that volume's device
    (found through the by-id link, as udev would name it), docker's root is on it."""
    c = m.container
    props = c.unit_properties("xdrive-agent.service", "ActiveState", "SubState", "StatusText")
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), m.diagnostics()
    assert props["StatusText"].startswith(f"mounted {volume_id} "), props["StatusText"]
    assert "docker on /v1/docker" in props["StatusText"]
    shown = c.run("systemctl", "status", "xdrive-agent.service", "--no-pager").stdout
    assert f'Status: "mounted {volume_id} ' in shown

    source, fstype = c.run(
        "findmnt", "-n", "-o", "SOURCE,FSTYPE", "--mountpoint", "/v1"
    ).stdout.split()
    assert fstype == "ext4"
    by_id = c.run("readlink", "-f", f"/dev/disk/by-id/{by_id_name(volume_id)}").stdout.strip()
    assert source == by_id and source.startswith("/dev/loop")

    root = c.run("docker", "info", "--format", "{{.DockerRootDir}}").stdout.strip()
    assert root == "/v1/docker"
    # data-root merged into the image's daemon.json, whose own keys stay.
    daemon = json.loads(c.path("/etc/docker/daemon.json").read_text())
    assert daemon["data-root"] == "/v1/docker" and daemon["bridge"] == "none"

    status = read_status(c.path("/var/lib/xdrive"))
    assert status is not None and status.phase == "ready"
    assert (status.instance_id, status.volume_id) == (m.instance_id, volume_id)
    return status


# What the user-data and the agent write, with the mode each must have (None: any mode that
# is not group- or world-writable). Owner root throughout.
WRITTEN_MODES: dict[str, int | None] = {
    "/etc/xdrive/agent.json": 0o644,  # no secret in it: the role's credentials come from IMDS
    "/etc/systemd/system/xdrive-agent.service": 0o644,
    "/etc/systemd/system/docker.service.d/xdrive.conf": 0o644,
    "/usr/local/bin/xdrive-agent": 0o755,
    "/etc/docker/daemon.json": None,  # the image's own mode is kept
    "/var/lib/xdrive/status.json": 0o644,
    "/v1/docker": 0o710,
}
WRITTEN_TREES = ("/opt/xdrive", "/var/lib/xdrive")  # every file and directory under them


def assert_written_safely(m: Machine) -> None:
    """Files hold the modes above, none writable by others, and no credential is in them,
    in the agent's journal or in cloud-init's output log."""
    c = m.container
    checked: dict[str, os.stat_result] = {p: c.path(p).stat() for p in WRITTEN_MODES}
    for tree in WRITTEN_TREES:
        top = c.path(tree)
        for found in top.rglob("*"):
            if not found.is_symlink():
                checked[f"{tree}/{found.relative_to(top)}"] = found.stat()
    assert len(checked) > len(WRITTEN_MODES) + 10, sorted(checked)  # the agent's files too
    for path, st in checked.items():
        assert st.st_uid == 0 and st.st_gid == 0, f"{path} is owned by {st.st_uid}:{st.st_gid}"
        assert st.st_mode & 0o022 == 0, f"{path} is writable by others: {st.st_mode & 0o777:o}"
        expected = WRITTEN_MODES.get(path)
        if expected is not None:
            assert st.st_mode & 0o777 == expected, f"{path}: {st.st_mode & 0o777:o}"

    role = m.instance.imds.role()
    assert role is not None
    texts = {
        "the agent's journal": c.journal("-u", "xdrive-agent.service", lines=100000),
        "cloud-init's output": c.path("/var/log/cloud-init-output.log").read_text(),
    }
    files = [p for p in checked if c.path(p).is_file() and not p.endswith(".tar.gz")]
    assert "/opt/xdrive/bootstrap.json" in files and "/etc/xdrive/agent.json" in files
    for inside in files:
        texts[inside] = c.path(inside).read_bytes().decode("utf-8", "replace")
    for name, text in texts.items():
        for secret in (*role.secret_values(), *m.instance.imds.issued_tokens()):
            assert secret not in text, f"a credential is written in {name}"


def final_snapshots_of(sandbox: Sandbox, volume_id: str) -> list[dict[str, Any]]:
    return [
        s
        for s in drive_snapshots(sandbox, DRIVE)
        if tags_of(s).get(tags.SOURCE_VOLUME) == volume_id
        and tags_of(s).get(tags.KIND) == tags.FINAL
        and s["State"] == "completed"
    ]


def assert_not_attached(sandbox: Sandbox, volume_id: str) -> None:
    """Detached (or already deleted, its content being in a completed snapshot)."""
    for v in drive_volumes(sandbox, DRIVE):
        if v["VolumeId"] == volume_id:
            assert v["State"] == "available" and not v.get("Attachments"), v


def test_userdata_boots_agent_saves_on_stop_and_restores_in_another_zone(
    sandbox: Sandbox, boot: BootMachine, agent_download: ArchiveServer
) -> None:
    # --- instance A, first zone: an empty drive is created, docker runs on it ----------
    inst_a = sandbox.launch(ZONES[0])
    a = boot(inst_a, userdata(sandbox, inst_a, agent_download))
    assert_first_boot_done(a)
    volume_a = attached_volume(sandbox, a)["VolumeId"]
    status_a = assert_agent_serving(a, volume_a)
    assert status_a.restored_from is None and status_a.generation == 1
    assert agent_download.downloads >= 1
    assert_written_safely(a)

    token = secrets.token_hex(16)
    a.container.run("sh", "-c", f"mkdir -p {os.path.dirname(PROOF)} && echo {token} > {PROOF}")

    # --- `systemctl stop xdrive-agent`: docker stops first, then the agent saves -------
    a.container.systemctl("stop", "xdrive-agent.service", timeout_s=200)
    assert a.container.unit_properties("xdrive-agent.service", "ActiveState") == {
        "ActiveState": "inactive"
    }
    assert a.container.unit_properties("docker.service", "ActiveState") == {
        "ActiveState": "inactive"
    }
    assert a.container.run("findmnt", "/v1", check=False).returncode == 1
    saved = final_snapshots_of(sandbox, volume_a)
    assert len(saved) == 1, drive_snapshots(sandbox, DRIVE)
    snapshot_a = saved[0]["SnapshotId"]
    assert tags_of(saved[0])[tags.REASON] == "shutdown"
    assert_not_attached(sandbox, volume_a)
    after_stop = read_status(a.container.path("/var/lib/xdrive"))
    assert after_stop is not None and after_stop.last_save is not None
    assert after_stop.last_save.snapshot_id == snapshot_a

    assert a.container.poweroff() == 0
    sandbox.client().terminate_instances(InstanceIds=[a.instance_id])

    # --- instance B, another zone: a fresh machine restores the saved drive -----------
    inst_b = sandbox.launch(ZONES[1])
    b = boot(inst_b, userdata(sandbox, inst_b, agent_download))
    assert_first_boot_done(b)
    volume_b = attached_volume(sandbox, b)
    assert tags_of(volume_b)[tags.SOURCE_SNAPSHOT] == snapshot_a
    status_b = assert_agent_serving(b, volume_b["VolumeId"])
    assert status_b.restored_from == snapshot_a and status_b.generation == 2
    assert b.container.run("cat", PROOF).stdout.strip() == token
    assert agent_download.downloads >= 2  # each machine's bootstrap fetched the agent

    # --- poweroff: systemd stops docker, then the agent, which saves B's volume --------
    assert b.container.poweroff() == 0
    saved_b = final_snapshots_of(sandbox, volume_b["VolumeId"])
    assert [tags_of(s)[tags.REASON] for s in saved_b] == ["shutdown"]
    assert_not_attached(sandbox, volume_b["VolumeId"])
    # The machine is off; its disk (the overlay) is still there to read.
    last = read_status(b.container.root / "var/lib/xdrive")
    assert last is not None and last.last_save is not None
    assert last.last_save.snapshot_id == saved_b[0]["SnapshotId"]
    waited = last.last_save.seconds_from_notice or 0.0
    # At shutdown docker.socket's stop job is ordered after the agent's (via sockets.target):
    # a blocking `systemctl stop docker.socket` from the agent would wait for the agent
    # itself. The save must not wait for that command.
    assert waited <= SHUTDOWN_STALL_S, (
        f"the shutdown save was requested {waited:.0f} s after SIGTERM"
    )
