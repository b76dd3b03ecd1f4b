"""The EC2 wrapper (core/ec2.py) against moto over HTTP, plus botocore's Stubber for what
moto cannot produce (denied actions, pagination, pending and failed snapshots).
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests
from botocore.config import Config
from botocore.stub import Stubber
from moto.server import ThreadedMotoServer

from xdrive import __version__, tags
from xdrive.ec2 import (
    ActionDenied,
    Backoff,
    CredentialsError,
    Ec2,
    Ec2ApiError,
    Ec2Unreachable,
    WaitTimeout,
    instance_from_api,
    make_ec2_client,
    snapshot_from_api,
    volume_from_api,
)
from xdrive.errors import AwsError, ConfigError, PermissionDenied
from xdrive.sandbox.imds import ImdsFaults, ImdsIdentity, ImdsServer, RoleCredentials

REGION = "us-east-1"
AZ = "us-east-1a"
SAVED_AT = datetime(2024, 5, 1, 12, 0, 5, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def moto_url() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Fake keys, and nothing from this machine's AWS config or from an IMDS."""
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


class Calls:
    """Every EC2 request the wrapper made, with the parameters it passed."""

    def __init__(self) -> None:
        self.made: list[tuple[str, dict[str, Any]]] = []

    def record(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.made.append((model.name, dict(params)))

    def names(self) -> list[str]:
        return [name for name, _ in self.made]

    def params(self, name: str) -> dict[str, Any]:
        found = [p for n, p in self.made if n == name]
        assert len(found) == 1, (name, self.names())
        return found[0]


@pytest.fixture
def calls() -> Calls:
    return Calls()


@pytest.fixture
def ec2(moto_url: str, aws_env: None, calls: Calls) -> Ec2:
    requests.post(f"{moto_url}/moto-api/reset", timeout=10).raise_for_status()
    client = make_ec2_client(REGION, endpoint_url=moto_url)
    client.meta.events.register("before-parameter-build.ec2", calls.record)
    return Ec2(client, sleep=lambda _: None, now=lambda: SAVED_AT)


def run_instance(ec2: Ec2, az: str = AZ) -> str:
    answer = ec2.client.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType="t3.micro",
        Placement={"AvailabilityZone": az},
    )
    return answer["Instances"][0]["InstanceId"]


def raw_tags(ec2: Ec2, volume_id: str) -> dict[str, str]:
    answer = ec2.client.describe_volumes(VolumeIds=[volume_id])
    return tags.from_tag_list(answer["Volumes"][0].get("Tags"))


# --- volumes --------------------------------------------------------------------------------


def test_create_volume_is_tagged_encrypted_gp3_in_one_call(ec2: Ec2, calls: Calls) -> None:
    v = ec2.create_volume(
        "work",
        AZ,
        8,
        1,
        instance_id="i-0123456789abcdef0",
        extra_tags={"team": "ml", tags.NAME: "not-this"},
    )
    assert (v.drive, v.generation, v.size_gib, v.volume_type, v.encrypted) == (
        "work",
        1,
        8,
        "gp3",
        True,
    )
    expected = {
        tags.NAME: "work",
        tags.CONSOLE_NAME: "work",
        tags.GENERATION: "1",
        tags.VERSION: __version__,
        tags.INSTANCE: "i-0123456789abcdef0",
        "team": "ml",  # extra tags ride along but never override the drive's own
    }
    assert raw_tags(ec2, v.id) == expected
    assert dict(v.tags) == expected
    # tagged by the CreateVolume call itself: no window in which the volume is untagged
    assert calls.names() == ["CreateVolume", "DescribeVolumes"]
    request = calls.params("CreateVolume")
    assert request["TagSpecifications"][0]["ResourceType"] == "volume"
    assert "VolumeInitializationRate" not in request
    described = ec2.volume(v.id)
    assert described is not None and described.encrypted and described.volume_type == "gp3"


def test_restore_passes_the_initialization_rate_only_with_a_snapshot(
    ec2: Ec2, calls: Calls
) -> None:
    base = ec2.create_volume("work", AZ, 4, 1, initialization_rate=300)
    assert "VolumeInitializationRate" not in calls.params("CreateVolume")
    snapshot = ec2.create_snapshot(base, "final", "shutdown", None)
    restored = ec2.create_volume(
        "work", "us-east-1b", None, 2, snapshot_id=snapshot.id, initialization_rate=300
    )
    request = [p for n, p in calls.made if n == "CreateVolume"][-1]
    assert request["VolumeInitializationRate"] == 300
    assert request["SnapshotId"] == snapshot.id
    assert "Size" not in request  # the snapshot's size
    assert restored.snapshot_id == snapshot.id
    assert restored.tags[tags.SOURCE_SNAPSHOT] == snapshot.id
    assert restored.generation == 2


def test_create_volume_checks_its_arguments(ec2: Ec2) -> None:
    with pytest.raises(ValueError):
        ec2.create_volume("work", AZ, 1, 0)
    with pytest.raises(ConfigError):
        ec2.create_volume("work", AZ, None, 1)


def test_attach_wait_detach_round_trip(ec2: Ec2, calls: Calls) -> None:
    instance = run_instance(ec2)
    v = ec2.create_volume("work", AZ, 1, 1)
    attachment = ec2.attach_volume(v.id, instance, "/dev/sdf")
    assert (attachment.instance_id, attachment.device) == (instance, "/dev/sdf")
    seen: list[str] = []
    attached = ec2.wait_attached(v.id, instance, on_progress=lambda vol: seen.append(vol.state))
    assert attached.attached_instance == instance
    assert attached.attachment is not None and attached.attachment.state == "attached"
    assert seen  # progress was reported

    ec2.detach_volume(v.id, instance)
    # always names the instance: never detaches whoever else might hold the volume
    assert calls.params("DetachVolume") == {
        "VolumeId": v.id,
        "InstanceId": instance,
        "Force": False,
    }
    detached = ec2.wait_detached(v.id, instance)
    assert detached is not None
    assert detached.state == "available" and detached.attached_instance is None


def test_wait_attached_fails_when_another_instance_got_it(ec2: Ec2) -> None:
    mine, other = run_instance(ec2), run_instance(ec2)
    v = ec2.create_volume("work", AZ, 1, 1)
    ec2.attach_volume(v.id, other, "/dev/sdf")
    with pytest.raises(AwsError, match=other):
        ec2.wait_attached(v.id, mine)


def test_delete_and_wait_until_deleted(ec2: Ec2) -> None:
    v = ec2.create_volume("work", AZ, 1, 1)
    assert ec2.wait_volume_state(v.id, "available") == ec2.volume(v.id)
    ec2.delete_volume(v.id)
    assert ec2.wait_volume_state(v.id, ("deleted",)) is None
    with pytest.raises(AwsError, match="no longer exists"):
        ec2.wait_volume_state(v.id, "available")


def test_set_volume_generation(ec2: Ec2, calls: Calls) -> None:
    v = ec2.create_volume("work", AZ, 1, 4)
    ec2.set_volume_generation(v.id, 5)
    after = ec2.volume(v.id)
    assert after is not None and after.generation == 5 and after.drive == "work"
    with pytest.raises(ValueError):
        ec2.set_volume_generation(v.id, 0)


# --- snapshots ------------------------------------------------------------------------------


def test_snapshot_is_tagged_at_creation_with_the_volumes_generation(ec2: Ec2, calls: Calls) -> None:
    v = ec2.create_volume("work", AZ, 1, 3)
    ec2.set_volume_generation(v.id, 4)
    current = ec2.volume(v.id)
    assert current is not None
    calls.made.clear()
    s = ec2.create_snapshot(current, "final", "spot-interruption", "i-0123456789abcdef0")
    expected = {
        tags.NAME: "work",
        tags.CONSOLE_NAME: "work",
        tags.GENERATION: "4",
        tags.KIND: "final",
        tags.SOURCE_VOLUME: v.id,
        tags.INSTANCE: "i-0123456789abcdef0",
        tags.REASON: "spot-interruption",
        tags.SAVED_AT: "2024-05-01T12:00:05+00:00",
        tags.VERSION: __version__,
    }
    described = ec2.snapshot(s.id)
    assert described is not None and dict(described.tags) == expected
    assert (s.generation, s.kind, s.source_volume, s.drive) == (4, "final", v.id, "work")
    request = calls.params("CreateSnapshot")
    assert request["TagSpecifications"][0]["ResourceType"] == "snapshot"
    assert "CreateTags" not in calls.names()
    assert "generation 4 final" in request["Description"]
    assert ec2.wait_snapshot_completed(s.id).state == "completed"


def test_snapshot_needs_a_drive_volume(ec2: Ec2) -> None:
    raw = ec2.client.create_volume(AvailabilityZone=AZ, Size=1)
    volume = ec2.volume(raw["VolumeId"])
    assert volume is not None
    with pytest.raises(ConfigError, match=tags.NAME):
        ec2.create_snapshot(volume, "final", "manual", None)


def test_drive_filters_return_only_that_drive(ec2: Ec2) -> None:
    mine = [ec2.create_volume("work", AZ, 1, 1) for _ in range(25)]
    others = [ec2.create_volume("other", AZ, 1, 1) for _ in range(3)]
    ec2.client.create_volume(AvailabilityZone=AZ, Size=1)  # untagged
    for v in mine[:4] + others:
        ec2.create_snapshot(v, "checkpoint", "periodic", None)
    ec2.delete_volume(mine[0].id)

    volumes = ec2.drive_volumes("work")
    assert {v.id for v in volumes} == {v.id for v in mine[1:]}
    assert all(v.drive == "work" for v in volumes)
    snapshots = ec2.drive_snapshots("work")
    assert len(snapshots) == 4 and all(s.drive == "work" for s in snapshots)
    assert {s.source_volume for s in snapshots} == {v.id for v in mine[:4]}
    assert ec2.drive_volumes("nothing") == () and ec2.drive_snapshots("nothing") == ()


def test_instances_reports_forgotten_ones_as_terminated(ec2: Ec2, calls: Calls) -> None:
    running, gone = run_instance(ec2), run_instance(ec2)
    ec2.client.terminate_instances(InstanceIds=[gone])
    forgotten = "i-0123456789abcdef0"
    found = ec2.instances([running, gone, forgotten, running])
    assert found[running].state == "running" and found[running].is_live
    assert found[running].availability_zone == AZ
    assert found[running].lifecycle == "on-demand"
    assert found[gone].state == "terminated" and not found[gone].is_live
    assert found[forgotten].state == "terminated" and found[forgotten].availability_zone is None
    assert set(found) == {running, gone, forgotten}
    calls.made.clear()
    assert ec2.instances([]) == {} and calls.made == []


def test_unknown_ids_read_as_none(ec2: Ec2) -> None:
    assert ec2.volume("vol-0123456789abcdef0") is None
    assert ec2.snapshot("snap-0123456789abcdef0") is None


# --- errors ---------------------------------------------------------------------------------


def test_an_ec2_error_code_names_the_action(ec2: Ec2) -> None:
    with pytest.raises(Ec2ApiError) as caught:
        ec2.delete_volume("vol-0123456789abcdef0")
    assert caught.value.code == "InvalidVolume.NotFound"
    assert caught.value.action == "ec2:DeleteVolume"
    assert "ec2:DeleteVolume" in str(caught.value)
    assert not isinstance(caught.value, PermissionDenied)


def test_missing_credentials_is_a_clear_error(
    moto_url: str, aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    ec2 = Ec2(make_ec2_client(REGION, endpoint_url=moto_url))
    with pytest.raises(CredentialsError, match="no AWS credentials"):
        ec2.drive_volumes("work")


@pytest.fixture
def instance_profile(
    aws_env: None, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ImdsServer, RoleCredentials]]:
    """An IMDS holding an instance profile's credentials, and no keys in the environment."""
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
        monkeypatch.delenv(var)
    role = RoleCredentials.issue("xdrive-agent", "ASIAPROFILETEST00001", timedelta(hours=6))
    identity = ImdsIdentity("i-0123456789abcdef0", AZ, REGION, "t3.micro", "spot")
    with ImdsServer(identity) as imds:
        imds.set_role(role)
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url + "/")
        yield imds, role


def test_instance_profile_credentials_survive_imds_errors_when_asked_to_retry(
    moto_url: str, instance_profile: tuple[ImdsServer, RoleCredentials]
) -> None:
    """The agent's client asks IMDS again after 500s; botocore's default (once) fails."""
    imds, role = instance_profile
    imds.set_faults(ImdsFaults(fail_next_reads_with_500=3))
    patient = make_ec2_client(REGION, endpoint_url=moto_url, credential_attempts=5)
    assert Ec2(patient).drive_volumes("work") == ()
    assert imds.request_count(f"/latest/meta-data/iam/security-credentials/{role.role}") == 1

    imds.set_faults(ImdsFaults(fail_next_reads_with_500=3))
    hasty = make_ec2_client(REGION, endpoint_url=moto_url)
    with pytest.raises(CredentialsError, match="attach an instance profile"):
        Ec2(hasty).drive_volumes("work")


def test_unreachable_endpoint(aws_env: None) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again when the block ends: nothing listens
    client = boto3.client(
        "ec2",
        region_name=REGION,
        endpoint_url=f"http://127.0.0.1:{port}",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=2),
    )
    with pytest.raises(Ec2Unreachable, match="ec2:DescribeVolumes"):
        Ec2(client).drive_volumes("work")


@pytest.fixture
def stubbed(aws_env: None) -> Iterator[tuple[Ec2, Stubber, list[float]]]:
    """An Ec2 whose client answers from a script, with a fake clock driven by its sleeps."""
    client = make_ec2_client(REGION)
    clock = [0.0]
    slept: list[float] = []

    def sleep(seconds: float) -> None:
        slept.append(seconds)
        clock[0] += seconds

    with Stubber(client) as stubber:
        yield (
            Ec2(client, backoff=Backoff(), sleep=sleep, monotonic=lambda: clock[0]),
            stubber,
            slept,
        )


@pytest.mark.parametrize("code", ["UnauthorizedOperation", "AccessDenied", "AccessDeniedException"])
def test_denied_actions_say_which_policy_to_attach(
    stubbed: tuple[Ec2, Stubber, list[float]], code: str
) -> None:
    ec2, stubber, _ = stubbed
    stubber.add_client_error("create_volume", code, "You are not authorized", 403)
    with pytest.raises(ActionDenied) as caught:
        ec2.create_volume("work", AZ, 1, 1)
    assert isinstance(caught.value, PermissionDenied)
    assert caught.value.action == "ec2:CreateVolume"
    assert "ec2:CreateVolume" in str(caught.value) and "xdrive iam-policy" in str(caught.value)


def test_rejected_credentials(stubbed: tuple[Ec2, Stubber, list[float]]) -> None:
    ec2, stubber, _ = stubbed
    stubber.add_client_error("describe_volumes", "AuthFailure", "AWS was not able to validate", 401)
    with pytest.raises(CredentialsError, match="rejected the credentials"):
        ec2.drive_volumes("work")


def _volume(vid: str, state: str = "available") -> dict[str, Any]:
    return {
        "VolumeId": vid,
        "AvailabilityZone": AZ,
        "Size": 1,
        "State": state,
        "Encrypted": True,
        "VolumeType": "gp3",
        "CreateTime": SAVED_AT,
        "Attachments": [],
        "Tags": [{"Key": tags.NAME, "Value": "work"}],
    }


def _snapshot(sid: str, state: str, progress: str, message: str = "") -> dict[str, Any]:
    data = {
        "SnapshotId": sid,
        "VolumeId": "vol-1",
        "State": state,
        "Progress": progress,
        "StartTime": SAVED_AT,
        "VolumeSize": 1,
        "Tags": [{"Key": tags.NAME, "Value": "work"}],
    }
    if message:
        data["StateMessage"] = message
    return data


def test_drive_filters_follow_every_page(stubbed: tuple[Ec2, Stubber, list[float]]) -> None:
    ec2, stubber, _ = stubbed
    by_tag = [{"Name": f"tag:{tags.NAME}", "Values": ["work"]}]
    stubber.add_response(
        "describe_volumes",
        {"Volumes": [_volume("vol-1"), _volume("vol-2")], "NextToken": "page-2"},
        {"Filters": by_tag},
    )
    stubber.add_response(
        "describe_volumes",
        {"Volumes": [_volume("vol-3"), _volume("vol-4", "deleted")]},
        {"Filters": by_tag, "NextToken": "page-2"},
    )
    assert [v.id for v in ec2.drive_volumes("work")] == ["vol-1", "vol-2", "vol-3"]
    stubber.add_response(
        "describe_snapshots",
        {"Snapshots": [_snapshot("snap-1", "completed", "100%")], "NextToken": "p2"},
        {"OwnerIds": ["self"], "Filters": by_tag},
    )
    stubber.add_response(
        "describe_snapshots",
        {"Snapshots": [_snapshot("snap-2", "pending", "5%")]},
        {"OwnerIds": ["self"], "Filters": by_tag, "NextToken": "p2"},
    )
    assert [s.id for s in ec2.drive_snapshots("work")] == ["snap-1", "snap-2"]
    stubber.assert_no_pending_responses()


def test_wait_snapshot_reports_progress_and_backs_off(
    stubbed: tuple[Ec2, Stubber, list[float]],
) -> None:
    ec2, stubber, slept = stubbed
    for state, progress in (("pending", "10%"), ("pending", "60%"), ("completed", "100%")):
        stubber.add_response(
            "describe_snapshots", {"Snapshots": [_snapshot("snap-1", state, progress)]}
        )
    seen: list[int] = []
    done = ec2.wait_snapshot_completed("snap-1", on_progress=lambda s: seen.append(s.progress))
    assert done.state == "completed"
    assert seen == [10, 60, 100]
    assert slept == [1.0, 1.5]


def test_an_error_snapshot_raises(stubbed: tuple[Ec2, Stubber, list[float]]) -> None:
    ec2, stubber, _ = stubbed
    stubber.add_response(
        "describe_snapshots", {"Snapshots": [_snapshot("snap-1", "pending", "50%")]}
    )
    stubber.add_response(
        "describe_snapshots", {"Snapshots": [_snapshot("snap-1", "error", "50%", "internal error")]}
    )
    with pytest.raises(AwsError, match="snap-1 of vol-1 is error: internal error"):
        ec2.wait_snapshot_completed("snap-1")


def test_waits_give_up_at_the_timeout(stubbed: tuple[Ec2, Stubber, list[float]]) -> None:
    ec2, stubber, slept = stubbed
    for _ in range(10):
        stubber.add_response("describe_volumes", {"Volumes": [_volume("vol-1", "creating")]})
    with pytest.raises(WaitTimeout, match="vol-1 to be available; it is creating"):
        ec2.wait_volume_state("vol-1", "available", timeout=5)
    assert sum(slept) == pytest.approx(5)  # the fake clock: never waits past the timeout
    assert slept == [1.0, 1.5, 2.25, pytest.approx(0.25)]


def test_a_volume_in_error_stops_the_wait(stubbed: tuple[Ec2, Stubber, list[float]]) -> None:
    ec2, stubber, _ = stubbed
    stubber.add_response("describe_volumes", {"Volumes": [_volume("vol-1", "error")]})
    with pytest.raises(AwsError, match="vol-1 is error"):
        ec2.wait_volume_state("vol-1", "available")


# --- parsing --------------------------------------------------------------------------------


def test_parsing_reads_missing_or_bad_tags_conservatively() -> None:
    bad = _volume("vol-1") | {"Tags": [{"Key": tags.GENERATION, "Value": "x"}]}
    assert volume_from_api(bad).generation == 0
    negative = _volume("vol-1") | {"Tags": [{"Key": tags.GENERATION, "Value": "-3"}]}
    assert volume_from_api(negative).generation == 0
    untagged = snapshot_from_api(_snapshot("snap-1", "pending", "") | {"Tags": []})
    assert untagged.kind == "checkpoint"  # not known to be clean: never counts as a save
    assert untagged.source_volume == "vol-1"  # falls back to EC2's own VolumeId
    assert untagged.progress == 0 and untagged.drive is None
    spot = instance_from_api(
        {"InstanceId": "i-1", "State": {"Name": "running"}, "InstanceLifecycle": "spot"}
    )
    assert spot.lifecycle == "spot" and spot.availability_zone is None
    attached = volume_from_api(
        _volume("vol-1", "in-use")
        | {
            "Attachments": [
                {"InstanceId": "i-old", "State": "detached", "Device": "/dev/sdf"},
                {"InstanceId": "i-new", "State": "attaching", "Device": "/dev/sdg"},
            ]
        }
    )
    assert attached.attached_instance == "i-new"
