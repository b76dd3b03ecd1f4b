"""The deadline holds whatever runs on the drive: containers that do not stop, processes
that keep /v1 open, a snapshot that is still pending when time runs out."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.boot_helpers import statuses
from tests.test_save_support import (
    boot,
    check_snapshot,
    docker_client,
    drive_snapshots,
    fsck,
    image_of,
    import_image,
    read_in_image,
    run_container,
    volume,
    wait_for,
    wait_phase,
)
from xdrive.sandbox.core import Sandbox, SimInstance
from xdrive.sandbox.settings import Latencies

pytestmark = [pytest.mark.root, pytest.mark.docker]

# Catches SIGTERM and carries on: dockerd would wait its whole stop timeout.
STUBBORN = "trap 'echo ignoring TERM' TERM; while true; do sleep 1; done"
# Ignores SIGTERM (SIG_IGN): the signal never reaches it.
DEAF = "trap '' TERM; while true; do echo tick >> /data/ticks; sleep 0.2; done"


def test_containers_that_do_not_stop_cannot_push_the_snapshot_past_the_deadline(
    sandbox: Sandbox,
) -> None:
    drive = "stubborn"
    # 25 s to go, 20 s of them reserved for the snapshot: containers get about 5 s, not the
    # 300 s their stop timeout asks for.
    inst = boot(sandbox, drive, reserve_s=20.0)
    ready = inst.status()
    assert ready is not None
    import_image(inst)
    client = docker_client(inst)
    try:
        ids = {
            "stubborn": run_container(client, "stubborn", STUBBORN, stop_timeout=300),
            "deaf": run_container(client, "deaf", DEAF, volume="ticks", stop_timeout=300),
        }
        wait_for(lambda: len(client.containers.list()) == 2, "both containers running")
    finally:
        client.close()

    leaves_at = sandbox.notice(inst.instance_id, "terminate", in_seconds=25)
    saved = wait_phase(sandbox, inst, "saved", timeout_s=60)

    (snap,) = drive_snapshots(sandbox, drive)
    check_snapshot(
        snap,
        drive=drive,
        kind="final",
        reason="spot-interruption",
        generation=1,
        volume_id=ready.volume_id or "",
        instance_id=inst.instance_id,
    )
    assert snap.start_time <= leaves_at
    record = saved.last_save
    assert record is not None and record.snapshot_id == snap.id
    assert record.seconds_to_deadline is not None and record.seconds_to_deadline > 0
    assert record.detached
    said = statuses(inst)
    # The catching one was killed at the end of its budget; the deaf one never needed to
    # wait for it (its signal was dropped) and is not in that list.
    killed = [s for s in said if s.startswith("killing containers that did not stop in time")]
    assert killed == ["killing containers that did not stop in time: stubborn"]
    image = image_of(sandbox, snap.id)
    assert fsck(image).returncode == 0
    # Killed from outside while dockerd shut down, neither counts as stopped by the user:
    # their restart policy brings them back when docker starts on the next instance.
    for name, cid in ids.items():
        state = json.loads(read_in_image(image, f"/docker/containers/{cid}/config.v2.json"))
        assert state["HasBeenManuallyStopped"] is False, name
        assert state["State"]["Running"] is False, name


def hold_file_open(inst: SimInstance, procs: list[subprocess.Popen[bytes]]) -> Path:
    """A process outside docker that ignores SIGTERM and keeps appending to a file on /v1."""
    path = inst.root / "v1/held.log"
    script = (
        "trap '' TERM; exec 3>>\"$1\"; i=0; "
        'while true; do i=$((i+1)); echo "line-$i" >&3; sleep 0.02; done'
    )
    procs.append(subprocess.Popen(["sh", "-c", script, "holder", str(path)], cwd="/"))
    return path


def test_processes_holding_the_drive_are_ended_and_the_drive_saved_clean(
    sandbox: Sandbox, child_procs: list[subprocess.Popen[bytes]]
) -> None:
    drive = "held"
    inst = boot(sandbox, drive, docker=False, reserve_s=20.0)
    ready = inst.status()
    assert ready is not None
    held = hold_file_open(inst, child_procs)
    wait_for(lambda: held.exists() and held.read_text().count("\n") > 10, "the holder writing")

    sandbox.notice(inst.instance_id, "terminate", in_seconds=60)
    saved = wait_phase(sandbox, inst, "saved")

    # SIGTERM was ignored, so SIGKILL ended it.
    assert child_procs[0].wait(timeout=10) == -9
    (snap,) = drive_snapshots(sandbox, drive)
    assert snap.tags["xdrive:kind"] == "final"  # unmounted, not frozen
    assert saved.last_save is not None and saved.last_save.kind == "final"
    assert saved.last_save.detached
    image = image_of(sandbox, snap.id)
    checked = fsck(image)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    lines = read_in_image(image, "/held.log").decode().splitlines()
    # Every line whole and in order, up to where the holder was stopped.
    assert len(lines) > 10
    assert lines == [f"line-{i}" for i in range(1, len(lines) + 1)]
    assert any(re.match(r"ending processes that hold .*: SIGTERM", s) for s in statuses(inst))


def test_a_volume_stays_until_its_snapshot_is_completed(sandbox: Sandbox) -> None:
    """Time runs out while the snapshot is pending: the volume is detached but kept."""
    drive = "pending"
    sandbox.fidelity.set_latencies(Latencies(snapshot=120.0))
    inst = boot(sandbox, drive, docker=False, reserve_s=5.0)
    ready = inst.status()
    assert ready is not None and ready.volume_id
    sandbox.notice(inst.instance_id, "terminate", in_seconds=8)
    saved = wait_phase(sandbox, inst, "saved", timeout_s=60)

    (snap,) = drive_snapshots(sandbox, drive)
    assert snap.state == "pending" and snap.tags["xdrive:kind"] == "final"
    kept = volume(sandbox, ready.volume_id)
    assert kept is not None and kept.state == "available" and kept.attachment is None
    record = saved.last_save
    assert record is not None and record.detached
    assert not record.completed and not record.volume_deleted


def test_bind_mounts_of_the_drive_are_unmounted_too(sandbox: Sandbox, binds: list[Path]) -> None:
    """`mount --bind /v1/home /home`: /v1 alone unmounted would leave the filesystem live."""
    drive = "bound"
    inst = boot(sandbox, drive, docker=False)
    (inst.root / "v1/home").mkdir()
    (inst.root / "v1/home/file").write_text("kept\n")
    view = inst.root / "home"
    view.mkdir()
    subprocess.run(["mount", "--bind", str(inst.root / "v1/home"), str(view)], check=True)
    binds.append(view)
    sandbox.notice(inst.instance_id, "terminate", in_seconds=60)
    saved = wait_phase(sandbox, inst, "saved")
    assert saved.last_save is not None and saved.last_save.kind == "final"
    assert not os.path.ismount(view)
    (snap,) = drive_snapshots(sandbox, drive)
    image = image_of(sandbox, snap.id)
    assert snap.tags["xdrive:kind"] == "final"
    assert fsck(image).returncode == 0
    assert read_in_image(image, "/home/file") == b"kept\n"


def test_a_drive_that_will_not_unmount_is_frozen_and_saved_as_a_checkpoint(
    sandbox: Sandbox, loops: list[str]
) -> None:
    """A loop device backed by a file on /v1 keeps it busy with no process to end."""
    drive = "frozen"
    inst = boot(sandbox, drive, docker=False, reserve_s=10.0)
    ready = inst.status()
    assert ready is not None and ready.volume_id
    backing = inst.root / "v1/inner.img"
    with open(backing, "wb") as f:
        f.truncate(8 << 20)
    loops.append(
        subprocess.run(
            ["losetup", "--find", "--show", str(backing)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    (inst.root / "v1/data.txt").write_text("written before the notice\n")
    sandbox.notice(inst.instance_id, "terminate", in_seconds=30)
    saved = wait_phase(sandbox, inst, "saved")

    record = saved.last_save
    assert record is not None and record.kind == "checkpoint" and not record.detached
    (snap,) = drive_snapshots(sandbox, drive)
    check_snapshot(
        snap,
        drive=drive,
        kind="checkpoint",  # taken while mounted: never outranks the volume at the next boot
        reason="spot-interruption",
        generation=1,
        volume_id=ready.volume_id,
        instance_id=inst.instance_id,
    )
    image = image_of(sandbox, snap.id)
    assert fsck(image).returncode == 0  # frozen: consistent all the same
    assert read_in_image(image, "/data.txt") == b"written before the notice\n"
    # The volume stays attached and mounted, and thawed: writes go on until the end.
    kept = volume(sandbox, ready.volume_id)
    assert kept is not None and kept.attached_instance == inst.instance_id
    (inst.root / "v1/after.txt").write_text("thawed\n")


@pytest.fixture
def binds() -> Iterator[list[Path]]:
    points: list[Path] = []
    try:
        yield points
    finally:
        for point in points:
            if os.path.ismount(point):
                subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.fixture
def loops() -> Iterator[list[str]]:
    devices: list[str] = []
    try:
        yield devices
    finally:
        for device in devices:
            subprocess.run(["losetup", "-d", device], check=False)
