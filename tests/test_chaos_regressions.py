"""Regressions for what the chaos harness found, as deterministic sandbox scenarios."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from xdrive import tags
from xdrive.sandbox.core import Sandbox, SandboxError

pytestmark = pytest.mark.root
DRIVE = "regress"


def _frozen(mountpoint: os.PathLike[str]) -> bool:
    """Thaw to find out: fsfreeze -u succeeds only on a frozen filesystem."""
    thawed = subprocess.run(["fsfreeze", "-u", str(mountpoint)], capture_output=True)
    return thawed.returncode == 0


def test_a_later_copy_of_the_drive_is_refused_while_the_first_is_mounted(
    sandbox: Sandbox,
) -> None:
    """Seed 19: two restores of one snapshot in one zone; the later must not be mounted."""
    a = sandbox.launch("us-east-1b")
    sandbox.start_agent(a.instance_id, sandbox.agent_config(a, DRIVE, docker=False))
    sandbox.wait_ready(a.instance_id)
    assert sandbox.stop_agent(a.instance_id) == 0
    sandbox.terminate(a.instance_id)
    snap = sandbox.client().describe_snapshots(OwnerIds=["self"])["Snapshots"][0]["SnapshotId"]

    b = sandbox.launch("us-east-1b")
    sandbox.start_agent(b.instance_id, sandbox.agent_config(b, DRIVE, docker=False))
    sandbox.wait_ready(b.instance_id)

    c = sandbox.launch("us-east-1b")
    # C's own restore, landing after B's boot looked at the drive (a throttled CreateVolume).
    sandbox.client().create_volume(
        AvailabilityZone="us-east-1b",
        SnapshotId=snap,
        VolumeType="gp3",
        Encrypted=True,
        TagSpecifications=[
            {
                "ResourceType": "volume",
                "Tags": tags.to_tag_list(
                    {
                        tags.NAME: DRIVE,
                        tags.CONSOLE_NAME: DRIVE,
                        tags.GENERATION: "2",
                        tags.SOURCE_SNAPSHOT: snap,
                        tags.INSTANCE: c.instance_id,
                    }
                ),
            }
        ],
    )
    sandbox.start_agent(c.instance_id, sandbox.agent_config(c, DRIVE, docker=False))
    with pytest.raises(SandboxError, match="exited with 75"):
        sandbox.wait_ready(c.instance_id, timeout_s=60)
    assert os.path.ismount(b.root / "v1")
    assert not os.path.ismount(c.root / "v1")


def test_a_drive_left_frozen_by_a_killed_checkpoint_is_thawed(sandbox: Sandbox) -> None:
    a = sandbox.launch("us-east-1a")
    config = sandbox.agent_config(a, DRIVE, docker=False)
    sandbox.start_agent(a.instance_id, config)
    sandbox.wait_ready(a.instance_id)
    v1 = a.root / "v1"
    assert a.agent is not None
    # What a checkpoint does first; the SIGKILL lands before its thaw.
    subprocess.run(["fsfreeze", "-f", str(v1)], check=True)
    os.killpg(a.agent.pid, signal.SIGKILL)
    a.agent.wait()
    sandbox.start_agent(a.instance_id, config)  # systemd restarts it
    sandbox.wait_ready(a.instance_id, timeout_s=60)
    assert not _frozen(v1), "the restarted agent left the drive frozen"
    (v1 / "after-restart.txt").write_text("writes go through\n")

    # Frozen again at shutdown: the save thaws before unmounting, so the device is released.
    subprocess.run(["fsfreeze", "-f", str(v1)], check=True)
    assert sandbox.stop_agent(a.instance_id, timeout_s=60) == 0
    assert not os.path.ismount(v1)
    status = a.status()
    assert status is not None and status.last_save is not None
    assert status.last_save.kind == "final"
