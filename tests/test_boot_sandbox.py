"""The agent's boot path end to end: real agent processes in the sandbox, real loop devices,
real mounts and a real dockerd per instance.

Each test builds a state of the drive the way it happens in use (a save, a crash, a save
cut short, a second instance) and checks EC2's state, the mounts and the files afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from typing import Any

import pytest

from tests.boot_helpers import (
    DRIVE,
    assert_attached_here,
    assert_drive_tags,
    assert_mounted,
    calls,
    drive_snapshots,
    drive_volumes,
    manifest,
    mounts_at,
    mutating_calls,
    run_agent_cli,
    statuses,
    tags_of,
    the_volume,
    volume_exists,
    wait_status,
    write_tree,
)
from xdrive import tags
from xdrive.sandbox import dockerctl
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.settings import Latencies

pytestmark = pytest.mark.root

IMAGE = "xdrive/busybox:latest"
# A service that stops on SIGTERM (docker stop), as a well-behaved one does.
POLITE = ["sh", "-c", "trap 'exit 0' TERM; while :; do sleep 0.2; done"]
SNAP_ID = re.compile(r"snap-[0-9a-f]+")


def boot(sb: Sandbox, az: str, *, docker: bool = False, drive: str = DRIVE) -> Any:
    inst = sb.launch(az)
    sb.start_agent(inst.instance_id, sb.agent_config(inst, drive, docker=docker))
    sb.wait_ready(inst.instance_id)
    return inst


@pytest.mark.docker
def test_new_drive_is_formatted_mounted_and_runs_containers(sandbox: Sandbox) -> None:
    inst = boot(sandbox, "us-east-1a", docker=True)

    volume = the_volume(sandbox)
    assert_attached_here(volume, inst)
    assert_drive_tags(volume, generation=1)
    assert not volume.get("SnapshotId")
    assert tags_of(volume)[tags.INSTANCE] == inst.instance_id
    assert_mounted(sandbox, inst, volume["VolumeId"])
    assert len(calls(sandbox, "CreateVolume")) == 1

    said = inst.notify.messages()
    formatting = next(i for i, m in enumerate(said) if m.startswith("STATUS=formatting new"))
    ready = said.index("READY=1")
    assert formatting < ready  # READY only once the drive is mounted

    # docker runs on the drive: its root is /v1/docker, on the drive's filesystem
    docker_root = inst.root / "v1" / "docker"
    daemon_json = json.loads((inst.root / "etc/docker/daemon.json").read_text())
    assert daemon_json["data-root"] == str(docker_root)
    assert os.stat(docker_root).st_dev == os.stat(inst.root / "v1").st_dev
    assert os.stat(docker_root).st_dev != os.stat(inst.root).st_dev
    client = sandbox.docker(inst.instance_id)
    try:
        assert client.info()["DockerRootDir"] == str(docker_root)
        dockerctl.import_busybox_image(inst.docker_url, IMAGE)
        data = inst.root / "v1" / "data"
        data.mkdir()
        out = client.containers.run(
            IMAGE,
            ["sh", "-c", "echo hello from a container > /data/hello && cat /data/hello"],
            volumes={str(data): {"bind": "/data", "mode": "rw"}},
            network_mode="none",
            remove=True,
        )
        assert out == b"hello from a container\n"
        assert (data / "hello").read_text() == "hello from a container\n"
        client.volumes.create("cache")
        client.containers.run(
            IMAGE,
            ["sh", "-c", "echo kept > /cache/kept"],
            volumes={"cache": {"bind": "/cache", "mode": "rw"}},
            network_mode="none",
            remove=True,
        )
    finally:
        client.close()
    assert (docker_root / "volumes" / "cache" / "_data" / "kept").read_text() == "kept\n"


def test_restore_in_another_az_keeps_every_file(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a")
    first = the_volume(sandbox)["VolumeId"]
    write_tree(a.root / "v1" / "tree")
    saved = manifest(a.root / "v1")
    assert sandbox.stop_agent(a.instance_id) == 0

    # the save: a completed final snapshot of generation 1, the volume then deleted
    (snap,) = drive_snapshots(sandbox)
    snap_tags = tags_of(snap)
    assert snap["State"] == "completed"
    assert snap_tags[tags.KIND] == tags.FINAL
    assert snap_tags[tags.GENERATION] == "1"
    assert snap_tags[tags.SOURCE_VOLUME] == first
    assert not volume_exists(sandbox, first)
    assert mounts_at(a.root / "v1") == []

    b = boot(sandbox, "us-east-1b")
    volume = the_volume(sandbox)
    assert volume["AvailabilityZone"] == "us-east-1b"
    assert volume["SnapshotId"] == snap["SnapshotId"]
    assert_attached_here(volume, b)
    assert_drive_tags(volume, generation=2)
    assert_mounted(sandbox, b, volume["VolumeId"])
    assert manifest(b.root / "v1") == saved
    assert not any(s.startswith("formatting") for s in statuses(b))


def test_same_az_reattaches_a_saved_volume_instead_of_restoring(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a")
    volume_id = the_volume(sandbox)["VolumeId"]
    write_tree(a.root / "v1" / "tree")
    saved = manifest(a.root / "v1")
    # The save is cut short after the detach, while it waits for the snapshot: the volume
    # stays behind, saved (once the snapshot completes) but not deleted.
    sandbox.fidelity.set_latencies(Latencies(snapshot=3.0))
    assert a.agent is not None
    a.agent.send_signal(signal.SIGTERM)  # systemctl stop
    said = wait_status(a, r"^detached vol-.*; waiting for snap-")
    sandbox.kill_agent(a.instance_id)
    snap_id = SNAP_ID.search(said).group(0)  # type: ignore[union-attr]
    sandbox.crash(a.instance_id)
    assert volume_exists(sandbox, volume_id)
    sandbox.fidelity.set_latencies(Latencies())
    deadline = time.monotonic() + 30
    while drive_snapshots(sandbox)[0]["State"] != "completed":
        assert time.monotonic() < deadline
        time.sleep(0.2)

    sandbox.fidelity.clear_recorded()
    c = boot(sandbox, "us-east-1a")
    volume = the_volume(sandbox)
    assert volume["VolumeId"] == volume_id  # the same volume, reattached
    assert calls(sandbox, "CreateVolume") == []  # no restore: no lazy loading
    assert_attached_here(volume, c)
    assert_drive_tags(volume, generation=2)  # written from now on: newer than snap
    assert_mounted(sandbox, c, volume_id)
    assert manifest(c.root / "v1") == saved
    (snap,) = drive_snapshots(sandbox)
    assert snap["SnapshotId"] == snap_id and tags_of(snap)[tags.GENERATION] == "1"
    status = c.status()
    assert status is not None
    assert (status.volume_id, status.generation, status.restored_from) == (volume_id, 2, None)
    assert status.message.startswith(f"mounted {volume_id} (reattached, generation 2) at /v1")


def test_unsaved_volume_in_another_az_is_migrated_without_loss(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a")
    old = the_volume(sandbox)["VolumeId"]
    write_tree(a.root / "v1" / "tree", seed="unsaved")
    saved = manifest(a.root / "v1")
    sandbox.crash(a.instance_id)  # no notice, no save: the volume is the only copy
    assert drive_snapshots(sandbox) == []

    sandbox.fidelity.set_latencies(Latencies(snapshot=2.0))
    samples: list[tuple[bool, list[str]]] = []
    stop = threading.Event()

    def sample() -> None:
        # Volume first, then snapshots: a pending snapshot seen after a missing volume
        # means the volume was deleted before its content was saved.
        while not stop.is_set():
            exists = volume_exists(sandbox, old)
            states = [
                s["State"]
                for s in drive_snapshots(sandbox)
                if tags_of(s).get(tags.REASON) == "migration"
            ]
            samples.append((exists, states))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        b = boot(sandbox, "us-east-1b")
    finally:
        stop.set()
        sampler.join(timeout=10)

    (snap,) = drive_snapshots(sandbox)
    snap_tags = tags_of(snap)
    assert snap["State"] == "completed"
    assert snap_tags[tags.KIND] == tags.FINAL
    assert snap_tags[tags.REASON] == "migration"
    assert snap_tags[tags.SOURCE_VOLUME] == old
    assert snap_tags[tags.GENERATION] == "1"
    volume = the_volume(sandbox)  # the old one is gone, once saved
    assert volume["VolumeId"] != old and not volume_exists(sandbox, old)
    assert volume["SnapshotId"] == snap["SnapshotId"]
    assert_attached_here(volume, b)
    assert_drive_tags(volume, generation=2)
    assert manifest(b.root / "v1") == saved
    assert any(states == ["pending"] for _, states in samples)  # the window was watched
    for exists, states in samples:
        assert exists or states == ["completed"], samples


def test_pending_newest_snapshot_is_waited_for(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a")
    (a.root / "v1" / "state").write_text("one\n")
    assert sandbox.stop_agent(a.instance_id) == 0
    (older,) = drive_snapshots(sandbox)

    b = boot(sandbox, "us-east-1b")
    (b.root / "v1" / "state").write_text("two\n")
    write_tree(b.root / "v1" / "tree", seed="two")
    newest = manifest(b.root / "v1")
    sandbox.fidelity.set_latencies(Latencies(snapshot=3.0))
    results: list[int] = []
    stopper = threading.Thread(
        target=lambda: results.append(sandbox.stop_agent(b.instance_id)), daemon=True
    )
    stopper.start()
    said = wait_status(b, r"^detached vol-.*; waiting for snap-")
    pending_id = SNAP_ID.search(said).group(0)  # type: ignore[union-attr]

    c = sandbox.launch("us-east-1c")
    sandbox.start_agent(c.instance_id, sandbox.agent_config(c, DRIVE, docker=False))
    sandbox.wait_ready(c.instance_id)
    stopper.join(timeout=60)
    assert results == [0]

    volume = the_volume(sandbox)
    assert volume["AvailabilityZone"] == "us-east-1c"
    assert volume["SnapshotId"] == pending_id != older["SnapshotId"]
    assert_drive_tags(volume, generation=3)
    assert (c.root / "v1" / "state").read_text() == "two\n"
    assert manifest(c.root / "v1") == newest
    # it saw the snapshot pending and waited for it
    assert any(pending_id in s and "not complete yet" in s for s in statuses(c))


def test_second_instance_is_refused(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a")
    before = the_volume(sandbox)
    (a.root / "v1" / "mine").write_text("a's data\n")
    sandbox.fidelity.clear_recorded()

    for az in ("us-east-1a", "us-east-1b"):
        b = sandbox.launch(az)
        sandbox.fidelity.clear_recorded()
        sandbox.start_agent(b.instance_id, sandbox.agent_config(b, DRIVE, docker=False))
        assert sandbox.wait_agent_exit(b.instance_id, timeout_s=60) == 75
        assert mutating_calls(sandbox) == []
        said = statuses(b)[-1]
        assert said.startswith("waiting: ")
        assert before["VolumeId"] in said and a.instance_id in said
        assert "one writer per drive" in said
        status = b.status()
        assert status is not None and status.phase == "failed"
        assert before["VolumeId"] in status.message
        assert mounts_at(b.root / "v1") == []

    # the first instance's drive is untouched
    after = the_volume(sandbox)
    assert after["VolumeId"] == before["VolumeId"]
    assert tags_of(after) == tags_of(before)
    assert_attached_here(after, a)
    assert_mounted(sandbox, a, after["VolumeId"])
    assert a.agent is not None and a.agent.poll() is None
    assert (a.root / "v1" / "mine").read_text() == "a's data\n"
    assert len(drive_volumes(sandbox)) == 1


@pytest.mark.docker
def test_status_line_and_status_command_after_a_restore(sandbox: Sandbox) -> None:
    a = boot(sandbox, "us-east-1a", docker=True)
    dockerctl.import_busybox_image(a.docker_url, IMAGE)
    client = sandbox.docker(a.instance_id)
    try:  # a service that must come back wherever the drive goes
        client.containers.run(
            IMAGE,
            POLITE,
            name="service",
            detach=True,
            network_mode="none",
            restart_policy={"Name": "unless-stopped"},
        )
    finally:
        client.close()
    assert sandbox.stop_agent(a.instance_id) == 0

    b = boot(sandbox, "us-east-1b", docker=True)
    volume = the_volume(sandbox)
    snap_id = volume["SnapshotId"]
    line = statuses(b)[-1]
    assert line == (
        f"mounted {volume['VolumeId']} (from {snap_id}, generation 2) at /v1; "
        "docker on /v1/docker; watching for spot interruption, rebalance recommendation"
    )

    assert b.config_path is not None
    shown = run_agent_cli("status", "--config", str(b.config_path))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith(f"drive {DRIVE}: ready - {line}")
    assert f"{volume['VolumeId']} from {snap_id}, generation 2" in shown.stdout
    as_json = run_agent_cli("status", "--json", "--config", str(b.config_path))
    assert as_json.returncode == 0, as_json.stderr
    state = json.loads(as_json.stdout)
    assert state["phase"] == "ready"
    assert state["volume_id"] == volume["VolumeId"]
    assert state["restored_from"] == snap_id
    assert state["generation"] == int(tags_of(volume)[tags.GENERATION]) == 2
    assert state["instance_id"] == b.instance_id
    assert state["docker_root"] == str(b.root / "v1" / "docker")
    assert state["watching"] == ["spot interruption", "rebalance recommendation"]
    assert mounts_at(b.root / "v1") == [(state["device"], "ext4")]

    # docker's state travelled with the drive: the image, and the service restarted
    client = sandbox.docker(b.instance_id)
    try:
        assert client.info()["DockerRootDir"] == state["docker_root"]
        client.images.get(IMAGE)
        deadline = time.monotonic() + 30
        while client.containers.get("service").status != "running":
            assert time.monotonic() < deadline, "the service did not come back"
            time.sleep(0.2)
    finally:
        client.close()
