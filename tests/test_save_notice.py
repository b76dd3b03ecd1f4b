"""A spot interruption notice: the drive is saved before the deadline and comes back,
containers included, on an instance in another zone; a notice and a SIGTERM together make
exactly one save. Sandbox: real agent, real dockerd, real loop devices."""

from __future__ import annotations

import signal
import time

import pytest

from tests.boot_helpers import statuses
from tests.test_save_support import (
    boot,
    check_snapshot,
    checksums,
    docker_client,
    docker_volume_file,
    drive_snapshots,
    fsck,
    image_of,
    import_image,
    read_in_image,
    run_container,
    volume,
    wait_for,
    wait_phase,
    write_project,
)
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.settings import Latencies

pytestmark = [pytest.mark.root, pytest.mark.docker]

# A shell as PID 1 with no TERM handler: the kernel drops the stop signal, as it does for
# most `sh -c` containers.
WORKER = "i=0; while true; do i=$((i+1)); echo line-$i >> /data/log; sleep 0.1; done"


def test_notice_saves_before_the_deadline_and_the_drive_comes_back_in_another_zone(
    sandbox: Sandbox,
) -> None:
    drive = "travel"
    # Snapshots stay pending a moment: the volume may go only once one is completed.
    sandbox.fidelity.set_latencies(Latencies(snapshot=2.0))
    a = boot(sandbox, drive, "us-east-1a")
    ready = a.status()
    assert ready is not None and ready.volume_id and ready.generation == 1
    import_image(a)
    client = docker_client(a)
    try:
        run_container(client, "worker", WORKER, volume="work")
    finally:
        client.close()
    project = write_project(a.root / "v1/project")
    log_a = docker_volume_file(a, "work", "log")
    wait_for(lambda: log_a.exists() and log_a.read_text().count("\n") >= 5, "container writes")

    leaves_at = sandbox.notice(a.instance_id, "terminate", in_seconds=120)
    saved = wait_phase(sandbox, a, "saved", timeout_s=90)

    (snap,) = drive_snapshots(sandbox, drive)
    check_snapshot(
        snap,
        drive=drive,
        kind="final",
        reason="spot-interruption",
        generation=1,
        volume_id=ready.volume_id,
        instance_id=a.instance_id,
    )
    # Requested before the instance goes: EC2's StartTime (1 s resolution) and the agent's own
    # record of it, which also knows the volume went only after the snapshot completed.
    assert snap.start_time <= leaves_at
    record = saved.last_save
    assert record is not None and record.snapshot_id == snap.id
    assert record.kind == "final" and record.reason == "spot-interruption"
    assert record.seconds_to_deadline is not None and record.seconds_to_deadline > 0
    assert record.detached and record.completed and record.volume_deleted
    assert snap.state == "completed"
    assert volume(sandbox, ready.volume_id) is None
    # systemd heard STOPPING=1 once, then the steps in words.
    assert a.notify.messages().count("STOPPING=1") == 1
    assert any(s.startswith(f"requested {snap.id}") for s in statuses(a))

    image = image_of(sandbox, snap.id)
    assert fsck(image).returncode == 0, fsck(image).stdout
    saved_log = read_in_image(image, "/docker/volumes/work/_data/log").decode()
    assert saved_log.startswith("line-1\n") and saved_log.endswith("\n")

    sandbox.terminate(a.instance_id)  # SIGTERM: the agent has nothing left to do and exits
    assert a.agent is not None and a.agent.returncode == 0
    assert len(drive_snapshots(sandbox, drive)) == 1

    b = boot(sandbox, drive, "us-east-1b")
    restored = b.status()
    assert restored is not None
    assert restored.restored_from == snap.id and restored.generation == 2
    assert checksums(b.root / "v1/project") == project
    # dockerd on B restarted the container by its restart policy (it was never marked
    # stopped), and it carries on where the saved log ended.
    client = docker_client(b)
    try:
        worker = wait_for(
            lambda: next(iter(client.containers.list(filters={"name": "worker"})), None),
            "the worker container running on B",
        )
        assert worker.attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    finally:
        client.close()
    log_b = docker_volume_file(b, "work", "log")
    wait_for(lambda: len(log_b.read_text()) > len(saved_log), "the worker writing on B")
    assert log_b.read_text().startswith(saved_log)

    # `systemctl stop` on B: the same save, on the shutdown's budget, of generation 2.
    assert sandbox.stop_agent(b.instance_id) == 0
    final_b = [s for s in drive_snapshots(sandbox, drive) if s.id != snap.id]
    assert len(final_b) == 1
    check_snapshot(
        final_b[0],
        drive=drive,
        kind="final",
        reason="shutdown",
        generation=2,
        volume_id=restored.volume_id or "",
        instance_id=b.instance_id,
    )


@pytest.mark.parametrize("first", ["notice", "sigterm"])
def test_notice_and_sigterm_together_make_one_save(sandbox: Sandbox, first: str) -> None:
    drive = f"race-{first}"
    inst = boot(sandbox, drive, docker=False)
    ready = inst.status()
    assert ready is not None and inst.agent is not None
    if first == "notice":
        sandbox.notice(inst.instance_id, "terminate", in_seconds=100)
        inst.agent.send_signal(signal.SIGTERM)
    else:
        inst.agent.send_signal(signal.SIGTERM)
        sandbox.notice(inst.instance_id, "terminate", in_seconds=100)
    assert sandbox.wait_agent_exit(inst.instance_id, timeout_s=120) == 0

    snaps = drive_snapshots(sandbox, drive)
    assert len(snaps) == 1, snaps
    assert snaps[0].tags["xdrive:kind"] == "final"
    assert snaps[0].tags["xdrive:reason"] in ("spot-interruption", "shutdown")
    assert inst.notify.messages().count("STOPPING=1") == 1
    status = inst.status()
    assert status is not None and status.phase == "saved"
    assert status.last_save is not None and status.last_save.snapshot_id == snaps[0].id
    assert volume(sandbox, ready.volume_id or "") is None  # saved, detached, deleted
    # Nothing happens later either: no second save started after the first.
    time.sleep(1.0)
    assert len(drive_snapshots(sandbox, drive)) == 1
