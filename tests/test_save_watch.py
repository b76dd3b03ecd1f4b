"""What the watch does with each signal, in the sandbox: a notice caught through a run of
401s, a checkpoint on a rebalance recommendation while work goes on, a spot stop that keeps
the volume with the instance, and `xdrive-agent status` telling about all of it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.boot_helpers import statuses
from tests.test_save_support import (
    boot,
    check_snapshot,
    checkpoint_and_final,
    drive_snapshots,
    fsck,
    list_in_image,
    read_in_image,
    volume,
    wait_for,
    wait_phase,
    with_checkpoint,
)
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.imds import ImdsFaults

pytestmark = [pytest.mark.root]


def test_a_run_of_401s_does_not_hide_the_notice(sandbox: Sandbox) -> None:
    drive = "unauthorized"
    inst = boot(sandbox, drive, docker=False)
    # IMDS refuses even fresh tokens for a while (aws-node-termination-handler #229, #668).
    inst.imds.set_faults(ImdsFaults(fail_next_reads_with_401=20))
    sandbox.notice(inst.instance_id, "terminate", in_seconds=120)
    saved = wait_phase(sandbox, inst, "saved", timeout_s=60)
    assert inst.imds.status_counts().get(401, 0) >= 20
    (snap,) = drive_snapshots(sandbox, drive)
    assert snap.tags["xdrive:kind"] == "final"
    assert snap.tags["xdrive:reason"] == "spot-interruption"
    assert saved.last_save is not None and saved.last_save.snapshot_id == snap.id


WRITER = """
import os, sys, time
root = sys.argv[1]
os.makedirs(root, exist_ok=True)
i = 0
while True:
    i += 1
    with open(os.path.join(root, "f.%d" % i), "w") as f:
        f.write(("%d\\n" % i) * 1000)
        f.flush()
        os.fsync(f.fileno())
    time.sleep(0.01)
"""


def test_rebalance_checkpoints_while_work_goes_on(
    sandbox: Sandbox, child_procs: list[subprocess.Popen[bytes]]
) -> None:
    drive = "rebalance"
    inst = boot(sandbox, drive, docker=False)
    ready = inst.status()
    assert ready is not None and ready.volume_id
    work = inst.root / "v1/work"
    child_procs.append(subprocess.Popen([sys.executable, "-c", WRITER, str(work)], cwd="/"))
    wait_for(lambda: work.exists() and len(list(work.iterdir())) > 20, "the writer's first files")

    sandbox.rebalance(inst.instance_id)
    status = wait_for(lambda: with_checkpoint(inst), "the checkpoint")
    record = status.last_checkpoint
    assert record is not None
    assert record.kind == "checkpoint" and record.reason == "rebalance"
    assert status.phase == "ready"  # still watching: a checkpoint is no save

    # Work goes on: the writer keeps writing after the thaw.
    written = len(list(work.iterdir()))
    wait_for(lambda: len(list(work.iterdir())) > written + 20, "the writer going on")
    assert child_procs[0].poll() is None
    # The volume stays in use; the recommendation stays posted and makes no second one.
    kept = volume(sandbox, ready.volume_id)
    assert kept is not None and kept.attached_instance == inst.instance_id
    time.sleep(1.5)
    (snap,) = drive_snapshots(sandbox, drive)
    check_snapshot(
        snap,
        drive=drive,
        kind="checkpoint",
        reason="rebalance",
        generation=1,
        volume_id=ready.volume_id,
        instance_id=inst.instance_id,
    )
    assert snap.id == record.snapshot_id

    # Restore it as EC2 would and look at what it holds: a clean filesystem with the files
    # written up to the freeze, each whole (the last one may have been caught mid-write).
    restored = sandbox.client().create_volume(
        AvailabilityZone="us-east-1a", SnapshotId=snap.id, VolumeType="gp3"
    )
    image = sandbox.blocks.volume_path(restored["VolumeId"])
    checked = fsck(image)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    numbers = sorted(int(n.split(".")[1]) for n in list_in_image(image, "/work"))
    assert numbers == list(range(1, len(numbers) + 1))
    assert 20 < len(numbers) < len(list(work.iterdir()))
    for n in numbers[:-1]:
        assert read_in_image(image, f"/work/f.{n}") == f"{n}\n".encode() * 1000
    last = read_in_image(image, f"/work/f.{numbers[-1]}")
    assert (f"{numbers[-1]}\n".encode() * 1000).startswith(last)


def test_a_spot_stop_keeps_the_volume_with_the_instance(sandbox: Sandbox) -> None:
    """stop: checkpoint at the notice; the stop's shutdown unmounts and snapshots but does
    not detach; the instance resumes on the same volume, no restore."""
    drive = "stopping"
    inst = boot(sandbox, drive, docker=False)
    ready = inst.status()
    assert ready is not None and ready.volume_id and inst.agent is not None
    (inst.root / "v1/kept.txt").write_text("before the stop\n")
    sandbox.notice(inst.instance_id, "stop", in_seconds=120)
    wait_for(lambda: with_checkpoint(inst), "the checkpoint at the stop notice")
    # The OS shuts down for the stop: systemd stops the agent.
    assert sandbox.stop_agent(inst.instance_id) == 0
    checkpoint, final = checkpoint_and_final(drive_snapshots(sandbox, drive))
    assert checkpoint.tags["xdrive:kind"] == "checkpoint"
    assert checkpoint.tags["xdrive:reason"] == "spot-stop"
    check_snapshot(
        final,
        drive=drive,
        kind="final",
        reason="spot-stop",
        generation=1,
        volume_id=ready.volume_id,
        instance_id=inst.instance_id,
    )
    kept = volume(sandbox, ready.volume_id)
    assert kept is not None and kept.attached_instance == inst.instance_id
    status = inst.status()
    assert status is not None and status.last_save is not None
    assert not status.last_save.detached and status.last_save.kind == "final"

    # The instance starts again: the same volume, saved, so it moves on to generation 2.
    inst.imds.clear_notices()
    boot(sandbox, drive, inst=inst, docker=False)
    again = inst.status()
    assert again is not None
    assert again.volume_id == ready.volume_id and again.generation == 2
    assert (inst.root / "v1/kept.txt").read_text() == "before the stop\n"
    # What happened before the stop is still there to see.
    assert again.last_save is not None and again.last_save.snapshot_id == final.id
    assert again.last_checkpoint is not None
    assert again.last_checkpoint.snapshot_id == checkpoint.id


def test_status_command_shows_the_last_save_and_checkpoint(sandbox: Sandbox) -> None:
    drive = "told"
    inst = boot(sandbox, drive, docker=False)
    assert inst.config_path is not None and inst.agent is not None
    sandbox.rebalance(inst.instance_id)
    wait_for(lambda: with_checkpoint(inst), "the checkpoint")
    sandbox.notice(inst.instance_id, "terminate", in_seconds=120)
    wait_phase(sandbox, inst, "saved")
    inst.agent.send_signal(signal.SIGTERM)
    assert sandbox.wait_agent_exit(inst.instance_id) == 0
    checkpoint, final = checkpoint_and_final(drive_snapshots(sandbox, drive))

    def status_cmd(*extra: str) -> str:
        argv = [sys.executable, "-m", "xdrive.agent.main", "status"]
        done = subprocess.run(
            [*argv, "--config", str(inst.config_path), *extra],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout

    raw = json.loads(status_cmd("--json"))
    assert raw["phase"] == "saved"
    assert raw["last_save"]["snapshot_id"] == final.id
    assert raw["last_save"]["kind"] == "final"
    assert raw["last_save"]["reason"] == "spot-interruption"
    assert raw["last_save"]["volume_deleted"] is True
    assert raw["last_checkpoint"]["snapshot_id"] == checkpoint.id
    assert raw["last_checkpoint"]["reason"] == "rebalance"
    lines = status_cmd().splitlines()
    (save_line,) = [line for line in lines if line.strip().startswith("last save:")]
    (checkpoint_line,) = [line for line in lines if line.strip().startswith("last checkpoint:")]
    assert final.id in save_line and "spot-interruption" in save_line
    assert "volume deleted" in save_line
    assert checkpoint.id in checkpoint_line and "rebalance" in checkpoint_line
    assert any(s.startswith(f"requested {final.id}") for s in statuses(inst))
