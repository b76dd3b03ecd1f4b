"""SIGKILL the agent at every step of its boot, restart it, and check the end state.

The sandbox's EC2 is given latencies so each step has a window; the agent is killed (its
whole process group, as systemd kills a unit's cgroup) the moment its STATUS line says the
step began. Then the agent starts again on the same instance and must finish the job: one
volume of the drive, in use here, tags intact, the data there (never formatted over), READY.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

import pytest

from tests.boot_helpers import (
    DRIVE,
    assert_attached_here,
    assert_drive_tags,
    assert_mounted,
    calls,
    drive_snapshots,
    drive_volumes,
    kill_agent_group,
    manifest,
    mounts_at,
    tags_of,
    the_volume,
    volume_exists,
    wait_status,
    write_tree,
)
from xdrive import tags
from xdrive.sandbox.core import Sandbox, SimInstance
from xdrive.sandbox.settings import Latencies

pytestmark = pytest.mark.root

Scenario = Literal["new", "restore", "migrate"]
WINDOWS = Latencies(volume_create=0.6, attach=0.6, device_appear=0.4, snapshot=1.0)


@dataclass(frozen=True)
class Crash:
    scenario: Scenario
    status: str  # regex on the STATUS line that starts the step the agent dies in
    at_kill: tuple[str, ...]  # what EC2 may show of the new volume then (see _phase)
    docker: bool = False

    @property
    def generation(self) -> int:
        return 1 if self.scenario == "new" else 2


CREATING = ("creating",)
ATTACHING = ("available", "attaching")  # killed right before or right after AttachVolume
ATTACHED = ("attached",)
CRASHES = {
    "new:creating": Crash("new", r"^creating vol-\S+ \(empty", CREATING),
    "new:attaching": Crash("new", r"^attaching vol-", ATTACHING),
    "new:formatting": Crash("new", r"^formatting new empty", ATTACHED),
    "new:mounted": Crash(
        "new", r"^mounted vol-\S+ \(generation 1\) at /v1$", ATTACHED, docker=True
    ),
    "new:starting-docker": Crash("new", r"; starting docker$", ATTACHED, docker=True),
    "restore:creating": Crash("restore", r"^creating vol-\S+ \(from snap-", CREATING),
    "restore:attaching": Crash("restore", r"^attaching vol-", ATTACHING),
    "restore:mounted": Crash("restore", r"^mounted vol-\S+ \(from snap-", ATTACHED),
    "migrate:deciding": Crash("migrate", r"unsaved in us-east-1a: saving it", ("none",)),
    "migrate:snapshotting": Crash(
        "migrate", r"^saving vol-\S+ from us-east-1a as snap-", ("none",)
    ),
    "migrate:restoring": Crash("migrate", r"^creating vol-\S+ \(from snap-", CREATING),
}


def _phase(sb: Sandbox) -> str:
    """How far the drive's volume in us-east-1b (the booting instance's AZ) has come."""
    here = [v for v in drive_volumes(sb) if v["AvailabilityZone"] == "us-east-1b"]
    if not here:
        return "none"
    (volume,) = here
    if volume["State"] != "in-use":
        return str(volume["State"])
    return str(volume["Attachments"][0]["State"])


def _prepare(sb: Sandbox, scenario: Scenario) -> tuple[dict[str, str], str]:
    """The drive's state before the boot under test: its files, and the old volume (if any)."""
    if scenario == "new":
        return {}, ""
    a = sb.launch("us-east-1a")
    sb.start_agent(a.instance_id, sb.agent_config(a, DRIVE, docker=False))
    sb.wait_ready(a.instance_id)
    old = the_volume(sb)["VolumeId"]
    write_tree(a.root / "v1" / "tree", seed=scenario)
    files = manifest(a.root / "v1")
    if scenario == "restore":
        assert sb.stop_agent(a.instance_id) == 0  # saved: a completed final snapshot
    else:
        sb.crash(a.instance_id)  # unsaved: the volume in us-east-1a is the only copy
    return files, old


def _kill_at(inst: SimInstance, status: str) -> None:
    wait_status(inst, status, timeout_s=60)
    kill_agent_group(inst)


@pytest.mark.parametrize(
    "name",
    [pytest.param(n, marks=[pytest.mark.docker] if c.docker else []) for n, c in CRASHES.items()],
)
def test_agent_killed_at_a_step_boundary_recovers(sandbox: Sandbox, name: str) -> None:
    crash = CRASHES[name]
    files, old = _prepare(sandbox, crash.scenario)
    snapshots_before = {s["SnapshotId"] for s in drive_snapshots(sandbox)}
    sandbox.fidelity.set_latencies(WINDOWS)
    sandbox.fidelity.clear_recorded()

    b = sandbox.launch("us-east-1b")
    config = sandbox.agent_config(b, DRIVE, docker=crash.docker)
    sandbox.start_agent(b.instance_id, config)
    _kill_at(b, crash.status)
    assert _phase(sandbox) in crash.at_kill  # the crash fell inside the step
    assert b.status() is None or b.status().phase != "ready"  # type: ignore[union-attr]
    if name == "migrate:snapshotting":
        (pending,) = [
            s for s in drive_snapshots(sandbox) if s["SnapshotId"] not in snapshots_before
        ]
        assert pending["State"] == "pending"
    written_after_mount = b.root / "v1" / "after-mount"
    mounted_before_crash = bool(mounts_at(b.root / "v1"))
    if mounted_before_crash:
        # What was written on the mounted drive before the crash must survive the restart.
        written_after_mount.write_text("written between mount and crash\n")
        os.sync()

    sandbox.start_agent(b.instance_id, config)
    status = sandbox.wait_ready(b.instance_id, timeout_s=90)

    volume = the_volume(sandbox)  # exactly one volume of the drive
    assert len(calls(sandbox, "CreateVolume")) == 1  # no second volume was created
    assert volume["AvailabilityZone"] == "us-east-1b"
    assert_attached_here(volume, b)
    assert_drive_tags(volume, crash.generation)
    assert tags_of(volume)[tags.INSTANCE] == b.instance_id
    assert_mounted(sandbox, b, volume["VolumeId"])
    assert status.volume_id == volume["VolumeId"]
    assert status.generation == crash.generation
    if crash.status.startswith(("^mounted", "; starting")):
        assert mounted_before_crash
    if mounted_before_crash:  # not formatted over
        assert written_after_mount.read_text() == "written between mount and crash\n"
    if crash.scenario == "new":
        assert not volume.get("SnapshotId")
    else:
        after = manifest(b.root / "v1")
        after.pop("after-mount", None)
        assert after == files
        assert not volume_exists(sandbox, old)  # the old volume went, once saved
    if crash.scenario == "migrate":
        new_snaps = [s for s in drive_snapshots(sandbox) if s["SnapshotId"] not in snapshots_before]
        (snap,) = new_snaps  # one migration snapshot, not one per attempt
        assert snap["State"] == "completed"
        assert tags_of(snap)[tags.KIND] == tags.FINAL
        assert tags_of(snap)[tags.REASON] == "migration"
        assert tags_of(snap)[tags.SOURCE_VOLUME] == old
        assert volume["SnapshotId"] == snap["SnapshotId"]
    if crash.docker:
        client = sandbox.docker(b.instance_id)
        try:
            assert client.info()["DockerRootDir"] == str(b.root / "v1" / "docker")
        finally:
            client.close()
