"""The sandbox's EC2: moto behind the fidelity middleware, over HTTP, with real loop devices.

Each test asserts what real EC2 does and moto alone does not (see shared/aws-facts.md).
Latencies are set per test; assertions are about order and state, never about timing.
"""

from __future__ import annotations

import hashlib
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from xdrive.sandbox.blocks import by_id_name
from xdrive.sandbox.settings import Faults, Latencies

from .sandbox_fixtures import Ec2Sandbox, Mounts, loops_bound_to, wait_until

pytestmark = pytest.mark.root

AZ_A = "us-east-1a"
AZ_B = "us-east-1b"


def _error_code(excinfo: pytest.ExceptionInfo[ClientError]) -> str:
    return str(excinfo.value.response["Error"]["Code"])


def _volume(ec2: Any, volume_id: str) -> dict[str, Any]:
    volume: dict[str, Any] = ec2.describe_volumes(VolumeIds=[volume_id])["Volumes"][0]
    return volume


def _attach_state(ec2: Any, volume_id: str) -> str:
    attachments = _volume(ec2, volume_id)["Attachments"]
    return str(attachments[0]["State"]) if attachments else "detached"


def _new_volume(ec2: Any, az: str = AZ_A, **extra: Any) -> str:
    volume_id: str = ec2.create_volume(AvailabilityZone=az, Size=1, **extra)["VolumeId"]
    return volume_id


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- attach checks ---------------------------------------------------------------------------


def test_attach_across_zones_is_refused(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    instance = ec2_sandbox.run_instance(AZ_B)
    volume = _new_volume(ec2, AZ_A)
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    assert _error_code(excinfo) == "InvalidVolume.ZoneMismatch"
    assert _volume(ec2, volume)["State"] == "available"


def test_attach_of_volume_in_use_is_refused(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    first, second = ec2_sandbox.run_instance(AZ_A), ec2_sandbox.run_instance(AZ_A)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=first, Device="/dev/sdf")
    for instance in (second, first):
        with pytest.raises(ClientError) as excinfo:
            ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdg")
        assert _error_code(excinfo) == "VolumeInUse"
    assert _volume(ec2, volume)["Attachments"][0]["InstanceId"] == first


def test_attach_while_volume_creating_or_instance_stopped_is_refused(
    ec2_sandbox: Ec2Sandbox, ec2: Any
) -> None:
    instance = ec2_sandbox.run_instance(AZ_A)
    ec2_sandbox.fidelity.set_latencies(Latencies(volume_create=600))
    creating = _new_volume(ec2)
    assert _volume(ec2, creating)["State"] == "creating"
    found = ec2.describe_volumes(Filters=[{"Name": "status", "Values": ["creating"]}])
    assert [v["VolumeId"] for v in found["Volumes"]] == [creating]
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_volume(VolumeId=creating, InstanceId=instance, Device="/dev/sdf")
    assert _error_code(excinfo) == "IncorrectState"

    ec2_sandbox.fidelity.set_latencies(Latencies())
    ready = _new_volume(ec2)
    ec2.stop_instances(InstanceIds=[instance])
    with pytest.raises(ClientError) as excinfo:
        ec2.attach_volume(VolumeId=ready, InstanceId=instance, Device="/dev/sdf")
    assert _error_code(excinfo) == "IncorrectState"
    assert _volume(ec2, ready)["Attachments"] == []


def test_device_appears_only_after_attached(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    instance = ec2_sandbox.run_instance(AZ_A)
    root = ec2_sandbox.instance_root(instance)
    volume = _new_volume(ec2)
    ec2_sandbox.fidelity.set_latencies(Latencies(attach=0.5, device_appear=1.5))
    link = root / "dev/disk/by-id" / by_id_name(volume)

    reply = ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    assert reply["State"] == "attaching"
    seen: list[tuple[bool, str]] = []

    def observe() -> bool:
        present = link.is_symlink()  # look at the device first, then ask the API
        seen.append((present, _attach_state(ec2, volume)))
        return present

    wait_until(observe)
    # The device never exists while the API still says attaching...
    assert all(state == "attached" for present, state in seen if present)
    # ...and the API says attached a while before the device shows up (poll for it).
    assert (False, "attached") in seen
    assert os.readlink(link) == ec2_sandbox.blocks.device_of(volume)
    assert os.readlink(root / "dev/sdf") == os.readlink(link)


# -- snapshots -------------------------------------------------------------------------------


def test_snapshot_is_pending_then_completed(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    volume = _new_volume(ec2)
    ec2_sandbox.fidelity.set_latencies(Latencies(snapshot=1.5))
    snapshot = ec2.create_snapshot(VolumeId=volume)
    assert snapshot["State"] == "pending"

    def by_state(state: str) -> list[str]:
        found = ec2.describe_snapshots(Filters=[{"Name": "status", "Values": [state]}])
        return [s["SnapshotId"] for s in found["Snapshots"]]

    seen: list[tuple[str, int, bool, bool]] = []

    def completed() -> bool:
        described = ec2.describe_snapshots(SnapshotIds=[snapshot["SnapshotId"]])["Snapshots"][0]
        done = by_state("completed")  # asked first: once completed, never pending again
        pending = by_state("pending")
        seen.append(
            (
                described["State"],
                int(described["Progress"].rstrip("%")),
                snapshot["SnapshotId"] in pending,
                snapshot["SnapshotId"] in done,
            )
        )
        return bool(described["State"] == "completed")

    wait_until(completed)
    states = [state for state, *_ in seen]
    progress = [p for _, p, *_ in seen]
    assert "pending" in states and states == sorted(states, key=["pending", "completed"].index)
    assert progress == sorted(progress) and progress[-1] == 100
    assert all(p < 100 for state, p, *_ in seen if state == "pending")
    # The status filter follows the same timeline: pending first, then completed, never both.
    in_pending = [p for *_, p, _ in seen]
    in_completed = [c for *_, c in seen]
    assert True in in_pending and in_completed[-1]
    assert not any(p and c for p, c in zip(in_pending, in_completed))
    assert in_completed == sorted(in_completed)


def test_snapshot_content_is_point_in_time(
    ec2_sandbox: Ec2Sandbox, ec2: Any, mounts: Mounts
) -> None:
    first, second = ec2_sandbox.run_instance(AZ_A), ec2_sandbox.run_instance(AZ_B)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=first, Device="/dev/sdf")
    device = wait_until(lambda: ec2_sandbox.blocks.device_of(volume))
    point = mounts.mkfs_and_mount(device, ec2_sandbox.instance_root(first) / "v1")
    (point / "a.bin").write_bytes(os.urandom(256 * 1024))
    digest_a = _sha256(point / "a.bin")
    os.sync()  # what the agent's sync/fsfreeze does before it asks for a snapshot

    ec2_sandbox.fidelity.set_latencies(Latencies(snapshot=0.5))
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    (point / "b.bin").write_bytes(b"written after the snapshot")
    os.sync()

    # EC2 lets a volume be made from a pending snapshot: it has the point-in-time content.
    restored = ec2.create_volume(AvailabilityZone=AZ_B, SnapshotId=snapshot)["VolumeId"]
    assert _volume(ec2, restored)["Size"] == 1
    ec2.attach_volume(VolumeId=restored, InstanceId=second, Device="/dev/sdf")
    restored_device = wait_until(lambda: ec2_sandbox.blocks.device_of(restored))
    restored_point = mounts.mount(restored_device, ec2_sandbox.instance_root(second) / "v1")

    assert _sha256(restored_point / "a.bin") == digest_a
    assert not (restored_point / "b.bin").exists()
    assert (point / "b.bin").exists()


def test_restore_smaller_than_snapshot_is_refused(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    volume = ec2.create_volume(AvailabilityZone=AZ_A, Size=2)["VolumeId"]
    snapshot = ec2.create_snapshot(VolumeId=volume)["SnapshotId"]
    with pytest.raises(ClientError) as excinfo:
        ec2.create_volume(AvailabilityZone=AZ_A, SnapshotId=snapshot, Size=1)
    assert _error_code(excinfo) == "InvalidParameterValue"
    assert len(ec2.describe_volumes()["Volumes"]) == 1
    grown = ec2.create_volume(AvailabilityZone=AZ_A, SnapshotId=snapshot, Size=3)["VolumeId"]
    assert ec2_sandbox.blocks.volume_path(grown).stat().st_size == 3 * 1024**3


# -- detach ----------------------------------------------------------------------------------


def test_detach_of_mounted_volume_waits_for_unmount(
    ec2_sandbox: Ec2Sandbox, ec2: Any, mounts: Mounts
) -> None:
    instance = ec2_sandbox.run_instance(AZ_A)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    device = wait_until(lambda: ec2_sandbox.blocks.device_of(volume))
    point = mounts.mkfs_and_mount(device, ec2_sandbox.instance_root(instance) / "v1")

    reply = ec2.detach_volume(VolumeId=volume)  # no InstanceId: EC2 accepts that
    assert reply["State"] == "detaching" and reply["InstanceId"] == instance
    # No detach latency is set: only the mounted filesystem keeps it detaching.
    time.sleep(0.3)  # let the detach watcher look a few times
    for _ in range(3):
        assert _attach_state(ec2, volume) == "detaching"
        assert _volume(ec2, volume)["State"] == "in-use"
    found = ec2.describe_volumes(Filters=[{"Name": "attachment.status", "Values": ["detaching"]}])
    assert [v["VolumeId"] for v in found["Volumes"]] == [volume]
    assert ec2_sandbox.blocks.device_of(volume) == device
    with pytest.raises(ClientError) as excinfo:
        ec2.delete_volume(VolumeId=volume)
    assert _error_code(excinfo) == "VolumeInUse"

    mounts.umount(point)
    wait_until(lambda: _volume(ec2, volume)["State"] == "available")
    assert ec2_sandbox.blocks.device_of(volume) is None
    assert not loops_bound_to(ec2_sandbox.blocks.volume_path(volume))
    assert not (ec2_sandbox.instance_root(instance) / "dev/sdf").is_symlink()

    with pytest.raises(ClientError) as excinfo:
        ec2.detach_volume(VolumeId=volume)
    assert _error_code(excinfo) == "IncorrectState"
    ec2.delete_volume(VolumeId=volume)
    assert not ec2_sandbox.blocks.has_volume(volume)


def test_forced_detach_of_mounted_volume_pulls_the_device(
    ec2_sandbox: Ec2Sandbox, ec2: Any, mounts: Mounts
) -> None:
    instance = ec2_sandbox.run_instance(AZ_A)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    device = wait_until(lambda: ec2_sandbox.blocks.device_of(volume))
    point = mounts.mkfs_and_mount(device, ec2_sandbox.instance_root(instance) / "v1")

    ec2.detach_volume(VolumeId=volume, InstanceId=instance, Force=True)

    wait_until(lambda: _volume(ec2, volume)["State"] == "available")
    assert not os.path.ismount(point)
    wait_until(lambda: not loops_bound_to(ec2_sandbox.blocks.volume_path(volume)))


def test_detach_takes_its_latency_even_without_a_device(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    instance = ec2_sandbox.run_instance(AZ_A, register=False)  # no simulated root: no device
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    assert ec2_sandbox.blocks.device_of(volume) is None
    ec2_sandbox.fidelity.set_latencies(Latencies(detach=0.5))

    assert ec2.detach_volume(VolumeId=volume)["State"] == "detaching"
    states: list[str] = []

    def detached() -> bool:
        states.append(_attach_state(ec2, volume))
        return states[-1] == "detached"

    wait_until(detached)
    assert "detaching" in states
    assert states == sorted(states, key=["detaching", "detached"].index)
    assert _volume(ec2, volume)["State"] == "available"


def test_terminate_frees_attached_volumes(
    ec2_sandbox: Ec2Sandbox, ec2: Any, mounts: Mounts
) -> None:
    instance, successor = ec2_sandbox.run_instance(AZ_A), ec2_sandbox.run_instance(AZ_A)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    device = wait_until(lambda: ec2_sandbox.blocks.device_of(volume))
    point = mounts.mkfs_and_mount(device, ec2_sandbox.instance_root(instance) / "v1")

    ec2_sandbox.fidelity.set_latencies(Latencies(terminate_detach=1.0))
    reply = ec2.terminate_instances(InstanceIds=[instance])
    assert reply["TerminatingInstances"][0]["CurrentState"]["Name"] == "shutting-down"
    running = ec2.describe_instances(
        Filters=[{"Name": "instance-state-name", "Values": ["running"]}]
    )["Reservations"]
    assert [i["InstanceId"] for r in running for i in r["Instances"]] == [successor]
    seen: list[tuple[str, str, bool]] = []

    def freed() -> bool:
        reservations = ec2.describe_instances(InstanceIds=[instance])["Reservations"]
        state = reservations[0]["Instances"][0]["State"]["Name"]
        volume_state = _volume(ec2, volume)["State"]
        seen.append((state, volume_state, ec2_sandbox.blocks.device_of(volume) is not None))
        return volume_state == "available"

    wait_until(freed)
    # Until EC2 frees it the volume stays with the dying instance; a terminated instance
    # never holds a volume, and a volume is never available while its device is still there.
    assert ("shutting-down", "in-use", True) in seen
    assert all(v == "available" for state, v, _ in seen if state == "terminated")
    assert not any(device for _, v, device in seen if v == "available")
    assert not os.path.ismount(point)  # the device went away under the mount
    wait_until(lambda: not loops_bound_to(ec2_sandbox.blocks.volume_path(volume)))
    described = ec2.describe_instances(InstanceIds=[instance])["Reservations"]
    assert described[0]["Instances"][0]["State"]["Name"] == "terminated"
    ec2.attach_volume(VolumeId=volume, InstanceId=successor, Device="/dev/sdf")
    assert wait_until(lambda: ec2_sandbox.blocks.device_of(volume))


# -- faults ----------------------------------------------------------------------------------


def test_throttling_is_answered_like_ec2_and_survived_by_retries(
    ec2_sandbox: Ec2Sandbox,
) -> None:
    fidelity = ec2_sandbox.fidelity
    fidelity.set_faults(Faults(throttle_rate=1.0))
    raw = ec2_sandbox.client(config=Config(retries={"mode": "standard", "max_attempts": 1}))
    with pytest.raises(ClientError) as excinfo:
        raw.describe_volumes()
    assert _error_code(excinfo) == "RequestLimitExceeded"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503

    fidelity.set_faults(Faults(throttle_rate=0.5, seed=10))  # 2 throttles in 5 calls
    fidelity.clear_recorded()
    patient = ec2_sandbox.client(config=Config(retries={"mode": "standard", "max_attempts": 10}))
    for _ in range(5):
        patient.describe_volumes()
    calls = fidelity.recorded_actions()
    throttled = [c for c in calls if c.error_code == "RequestLimitExceeded"]
    assert throttled and all(c.status == 503 for c in throttled)
    assert sum(1 for c in calls if c.status == 200) == 5


def test_denied_action_is_unauthorized_and_changes_nothing(
    ec2_sandbox: Ec2Sandbox, ec2: Any
) -> None:
    ec2_sandbox.fidelity.set_faults(Faults(deny_actions=frozenset({"CreateVolume"})))
    with pytest.raises(ClientError) as excinfo:
        _new_volume(ec2)
    assert _error_code(excinfo) == "UnauthorizedOperation"
    assert excinfo.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    assert ec2.describe_volumes()["Volumes"] == []
    assert list(ec2_sandbox.blocks.volumes_dir.iterdir()) == []
    create = [c for c in ec2_sandbox.fidelity.recorded_actions() if c.action == "CreateVolume"]
    assert [(c.status, c.error_code) for c in create] == [(403, "UnauthorizedOperation")]


# -- plumbing --------------------------------------------------------------------------------


def test_actions_of_every_service_are_recorded(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    ec2_sandbox.client("sts").get_caller_identity()
    ec2.describe_volumes()
    actions = [c.iam_action for c in ec2_sandbox.fidelity.recorded_actions()]
    assert actions == ["sts:GetCallerIdentity", "ec2:DescribeVolumes"]


def test_run_instances_hook_gets_the_new_ids(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    launched: list[list[str]] = []
    ec2_sandbox.fidelity.on_run_instances = launched.append
    instance = ec2_sandbox.run_instance(AZ_A, register=False)
    assert launched == [[instance]]


def test_control_routes_are_served_under_sandbox(ec2_sandbox: Ec2Sandbox) -> None:
    def ping(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [f"pong {environ['PATH_INFO']}".encode()]

    ec2_sandbox.server.mount("ping", ping)
    with urllib.request.urlopen(f"{ec2_sandbox.url}/sandbox/ping/x") as reply:
        assert reply.read() == b"pong /x"
    with pytest.raises(urllib.error.HTTPError) as excinfo:
        urllib.request.urlopen(f"{ec2_sandbox.url}/sandbox/nothing")
    assert excinfo.value.code == 404


def test_reset_forgets_resources_devices_and_files(ec2_sandbox: Ec2Sandbox, ec2: Any) -> None:
    instance = ec2_sandbox.run_instance(AZ_A)
    volume = _new_volume(ec2)
    ec2.attach_volume(VolumeId=volume, InstanceId=instance, Device="/dev/sdf")
    path = ec2_sandbox.blocks.volume_path(volume)
    assert wait_until(lambda: loops_bound_to(path))
    ec2.create_snapshot(VolumeId=volume)

    ec2_sandbox.server.reset()

    assert ec2.describe_volumes()["Volumes"] == []
    assert ec2.describe_snapshots(OwnerIds=["self"])["Snapshots"] == []
    wait_until(lambda: not loops_bound_to(path))
    assert not any(ec2_sandbox.blocks.volumes_dir.iterdir())
    assert not any(ec2_sandbox.blocks.snapshots_dir.iterdir())
