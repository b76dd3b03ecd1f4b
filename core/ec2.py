"""The one wrapper that talks to EC2, shared by the agent and the launcher.

It returns frozen dataclasses, never boto3 dicts, and turns every botocore failure into an
``XdriveError`` that says what to do (``aws_errors``). Every volume and snapshot it creates
is tagged in the same call (``TagSpecifications``), so no drive resource is ever untagged,
not even for a moment a crash could make permanent.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, Callable, Literal, Optional, TypeVar, Union, cast

from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    PartialCredentialsError,
    ReadTimeoutError,
)

from xdrive import __version__, tags
from xdrive.errors import AwsError, ConfigError, PermissionDenied, XdriveError
from xdrive.tags import SnapshotKind

if TYPE_CHECKING:
    from mypy_boto3_ec2.client import EC2Client

AttachmentState = Literal["attaching", "attached", "detaching", "detached", "busy"]
VolumeState = Literal["creating", "available", "in-use", "deleting", "deleted", "error"]
SnapshotState = Literal["pending", "completed", "error", "recoverable", "recovering"]
InstanceState = Literal["pending", "running", "shutting-down", "terminated", "stopping", "stopped"]
Lifecycle = Literal["spot", "on-demand", "scheduled", "capacity-block"]

# Instances that still exist as a possible writer: a stopped instance keeps its volumes and
# may start again, so it counts. shutting-down/terminated ones are on their way out.
LIVE_INSTANCE_STATES: frozenset[str] = frozenset({"pending", "running", "stopping", "stopped"})

_PERMISSION_CODES = ("UnauthorizedOperation", "AccessDenied", "AccessDeniedException")
_CREDENTIAL_CODES = (
    "AuthFailure",
    "InvalidClientTokenId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "RequestExpired",
)
_POLICY_FIX = (
    "attach the IAM policy printed by `xdrive iam-policy` to the instance profile's role "
    "(on an instance) or to your IAM user or role (on your machine)"
)
_MAX_FILTER_VALUES = 100  # EC2 accepts up to 200 values per filter; stay well below
IMDS_CREDENTIAL_TIMEOUT_S = 2.0  # per attempt, for the instance profile's credentials


# --- errors -------------------------------------------------------------------------------


class Ec2ApiError(AwsError):
    """EC2 answered with an error code (after botocore's retries)."""

    def __init__(self, action: str, code: str, message: str) -> None:
        self.action = action
        self.code = code
        self.aws_message = message
        super().__init__(
            f"{action} failed: {code}: {message}",
            "check the ids and the state of the resources named above, then retry",
        )


class ActionDenied(PermissionDenied):
    """IAM does not allow ``action``."""

    def __init__(self, action: str, code: str) -> None:
        self.action = action
        self.code = code
        super().__init__(f"AWS denied {action} ({code})", _POLICY_FIX)


class CredentialsError(AwsError):
    """No AWS credentials, or AWS rejected them."""


class Ec2Unreachable(AwsError):
    """The EC2 endpoint could not be reached (network, DNS, timeout)."""


class WaitTimeout(AwsError):
    """A resource did not reach the wanted state in time."""


def translate_client_error(action: str, error: ClientError) -> XdriveError:
    info = error.response.get("Error", {})
    code = str(info.get("Code", "Unknown"))
    message = str(info.get("Message", ""))
    if code in _PERMISSION_CODES or code.startswith("AccessDenied"):
        return ActionDenied(action, code)
    if code in _CREDENTIAL_CODES:
        return CredentialsError(
            f"AWS rejected the credentials used for {action} ({code}: {message})",
            "check that the instance profile (or AWS_PROFILE) holds valid, unexpired keys "
            "and that the clock is right",
        )
    return Ec2ApiError(action, code, message)


@contextmanager
def aws_errors(action: str) -> Iterator[None]:
    """Turn botocore failures inside the block into XdriveErrors naming ``action``."""
    try:
        yield
    except ClientError as e:
        raise translate_client_error(action, e) from e
    except (NoCredentialsError, PartialCredentialsError) as e:
        raise CredentialsError(
            f"no AWS credentials found for {action}",
            "on an instance, attach an instance profile; on your machine, set AWS_PROFILE "
            "or run `aws configure`",
        ) from e
    except NoRegionError as e:
        raise ConfigError(f"no AWS region set for {action}", "pass --region") from e
    except (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError) as e:
        raise Ec2Unreachable(
            f"cannot reach EC2 for {action}: {e}",
            "check the network, the region and the endpoint URL",
        ) from e
    except BotoCoreError as e:
        raise AwsError(f"{action} failed: {e}", "check the request and the boto3 version") from e


# --- dataclasses --------------------------------------------------------------------------


def _generation(tag_values: Mapping[str, str]) -> int:
    """The generation tag as an int; 0 (older than anything) when missing or malformed."""
    try:
        value = int(tag_values.get(tags.GENERATION, "0"))
    except ValueError:
        return 0
    return max(value, 0)


@dataclass(frozen=True)
class Attachment:
    instance_id: str
    state: AttachmentState
    device: str


@dataclass(frozen=True)
class Volume:
    id: str
    availability_zone: str
    size_gib: int
    state: VolumeState
    encrypted: bool
    volume_type: str
    create_time: datetime
    snapshot_id: Optional[str] = None
    attachments: tuple[Attachment, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def drive(self) -> Optional[str]:
        return self.tags.get(tags.NAME)

    @property
    def generation(self) -> int:
        return _generation(self.tags)

    @property
    def attachment(self) -> Optional[Attachment]:
        """The attachment that still holds the volume (anything but ``detached``)."""
        for attachment in self.attachments:
            if attachment.state != "detached":
                return attachment
        return None

    @property
    def attached_instance(self) -> Optional[str]:
        attachment = self.attachment
        return attachment.instance_id if attachment else None

    @property
    def created_by(self) -> Optional[str]:
        """The instance whose agent created this volume (tag), if recorded."""
        return self.tags.get(tags.INSTANCE)


@dataclass(frozen=True)
class Snapshot:
    id: str
    volume_id: str
    state: SnapshotState
    progress: int  # percent
    start_time: datetime
    volume_size_gib: int
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    state_message: str = ""

    @property
    def drive(self) -> Optional[str]:
        return self.tags.get(tags.NAME)

    @property
    def generation(self) -> int:
        return _generation(self.tags)

    @property
    def kind(self) -> SnapshotKind:
        # Only an explicit "final" counts as a clean save: an untagged snapshot may have been
        # taken while mounted, so it is read as a checkpoint.
        return tags.FINAL if self.tags.get(tags.KIND) == tags.FINAL else tags.CHECKPOINT

    @property
    def source_volume(self) -> str:
        return self.tags.get(tags.SOURCE_VOLUME) or self.volume_id


@dataclass(frozen=True)
class InstanceInfo:
    id: str
    state: InstanceState
    availability_zone: Optional[str]  # None: EC2 no longer knows the instance
    instance_type: Optional[str]
    lifecycle: Optional[Lifecycle]

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_INSTANCE_STATES


def _parse_progress(value: object) -> int:
    try:
        return int(str(value).rstrip("%") or 0)
    except ValueError:
        return 0


def volume_from_api(data: Mapping[str, Any]) -> Volume:
    return Volume(
        id=data["VolumeId"],
        availability_zone=data["AvailabilityZone"],
        size_gib=int(data.get("Size", 0)),
        state=cast(VolumeState, data["State"]),
        encrypted=bool(data.get("Encrypted", False)),
        volume_type=str(data.get("VolumeType", "")),
        create_time=data["CreateTime"],
        snapshot_id=data.get("SnapshotId") or None,
        attachments=tuple(
            Attachment(
                instance_id=a["InstanceId"],
                state=cast(AttachmentState, a.get("State", "attached")),
                device=a.get("Device", ""),
            )
            for a in data.get("Attachments") or []
        ),
        tags=tags.from_tag_list(data.get("Tags")),
    )


def snapshot_from_api(data: Mapping[str, Any]) -> Snapshot:
    return Snapshot(
        id=data["SnapshotId"],
        volume_id=data.get("VolumeId", ""),
        state=cast(SnapshotState, data["State"]),
        progress=_parse_progress(data.get("Progress", "")),
        start_time=data["StartTime"],
        volume_size_gib=int(data.get("VolumeSize", 0)),
        tags=tags.from_tag_list(data.get("Tags")),
        state_message=str(data.get("StateMessage", "")),
    )


def instance_from_api(data: Mapping[str, Any]) -> InstanceInfo:
    return InstanceInfo(
        id=data["InstanceId"],
        state=cast(InstanceState, data["State"]["Name"]),
        availability_zone=data.get("Placement", {}).get("AvailabilityZone"),
        instance_type=data.get("InstanceType"),
        # EC2 omits InstanceLifecycle for on-demand instances.
        lifecycle=cast(Lifecycle, data.get("InstanceLifecycle") or "on-demand"),
    )


def forgotten_instance(instance_id: str) -> InstanceInfo:
    """EC2 drops terminated instances from its answers after a while: that is what absence means."""
    return InstanceInfo(instance_id, "terminated", None, None, None)


# --- what the launcher reads and writes (the agent never calls these) ----------------------

MarketType = Literal["spot", "on-demand"]


@dataclass(frozen=True)
class InstanceDetails:
    """An instance as the launcher shows it: ``InstanceInfo`` plus tags, times and options."""

    id: str
    state: InstanceState
    availability_zone: Optional[str]
    instance_type: Optional[str]
    lifecycle: Optional[Lifecycle]
    launch_time: Optional[datetime] = None
    image_id: Optional[str] = None
    subnet_id: Optional[str] = None
    http_tokens: Optional[str] = None  # "required": IMDSv2 only
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)

    @property
    def drive(self) -> Optional[str]:
        return self.tags.get(tags.NAME)

    @property
    def info(self) -> InstanceInfo:
        return InstanceInfo(
            self.id, self.state, self.availability_zone, self.instance_type, self.lifecycle
        )

    @property
    def is_live(self) -> bool:
        return self.state in LIVE_INSTANCE_STATES


def instance_details_from_api(data: Mapping[str, Any]) -> InstanceDetails:
    info = instance_from_api(data)
    return InstanceDetails(
        id=info.id,
        state=info.state,
        availability_zone=info.availability_zone,
        instance_type=info.instance_type,
        lifecycle=info.lifecycle,
        launch_time=data.get("LaunchTime"),
        image_id=data.get("ImageId"),
        subnet_id=data.get("SubnetId"),
        http_tokens=(data.get("MetadataOptions") or {}).get("HttpTokens"),
        tags=tags.from_tag_list(data.get("Tags")),
    )


@dataclass(frozen=True)
class InstanceSpec:
    """What to launch: the one mapping to RunInstances and to launch templates."""

    image_id: str
    instance_type: str
    user_data: bytes  # raw (gzip'd or not); base64 is the wire format's business
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)
    market: MarketType = "spot"
    max_price: Optional[str] = None  # USD per hour, as EC2 spells it ("0.35")
    subnet_id: Optional[str] = None
    security_group_ids: tuple[str, ...] = ()
    key_name: Optional[str] = None
    instance_profile: Optional[str] = None  # name of the instance profile


@dataclass(frozen=True)
class InstanceTypeInfo:
    name: str
    architectures: tuple[str, ...]  # "x86_64", "arm64", ...
    vcpus: int
    memory_mib: int
    gpus: int


@dataclass(frozen=True)
class SpotPrice:
    availability_zone: str
    instance_type: str
    price: float  # USD per hour
    timestamp: datetime


@dataclass(frozen=True)
class Subnet:
    id: str
    vpc_id: str
    availability_zone: str
    default_for_az: bool


@dataclass(frozen=True)
class LaunchTemplate:
    id: str
    name: str
    default_version: int
    latest_version: int
    tags: Mapping[str, str] = field(default_factory=dict, hash=False)


class UnknownInstanceType(ConfigError):
    def __init__(self, name: str) -> None:
        self.name = name
        super().__init__(
            f"unknown instance type {name!r}",
            "check the spelling (for example t3.micro, m7g.large, g5.xlarge); "
            "`aws ec2 describe-instance-types` lists them",
        )


# --- the client ---------------------------------------------------------------------------


def make_ec2_client(
    region: str,
    endpoint_url: Optional[str] = None,
    profile: Optional[str] = None,
    connect_timeout: float = 5.0,
    read_timeout: float = 30.0,
    credential_attempts: Optional[int] = None,
) -> EC2Client:
    """A boto3 EC2 client with adaptive retries (throttling backs off client-side too).

    ``credential_attempts``: on an instance, how often boto3 asks IMDS for the instance
    profile's credentials before it gives up (botocore's default is once, with a 1 s
    timeout: one IMDS hiccup at boot would fail the restore). Left unset on the user's
    machine, where there is no IMDS to wait for.
    """
    import boto3  # here, so importing this module stays cheap for the dataclasses alone
    import botocore.session

    config = Config(
        retries={"mode": "adaptive", "max_attempts": 10},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    with aws_errors("boto3 session"):
        core = botocore.session.Session(profile=profile)
        if credential_attempts is not None:
            core.set_config_variable("metadata_service_num_attempts", credential_attempts)
            core.set_config_variable("metadata_service_timeout", IMDS_CREDENTIAL_TIMEOUT_S)
        session = boto3.session.Session(botocore_session=core, region_name=region)
        return session.client("ec2", endpoint_url=endpoint_url, config=config)


@dataclass(frozen=True)
class Backoff:
    """Polling cadence of the wait helpers: ``initial`` seconds, times ``factor``, capped."""

    initial: float = 1.0
    factor: float = 1.5
    maximum: float = 10.0


T = TypeVar("T")


class Ec2:
    """EC2 calls the drive needs. ``client`` is a boto3 EC2 client (see ``make_ec2_client``)."""

    def __init__(
        self,
        client: EC2Client,
        *,
        backoff: Optional[Backoff] = None,
        sleep: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        self.client = client
        self._backoff = backoff or Backoff()
        self._sleep = sleep
        self._monotonic = monotonic
        self._now = now

    # -- reads --

    def drive_volumes(self, name: str) -> tuple[Volume, ...]:
        """Every volume of drive ``name`` that is not gone, oldest first."""
        found: list[Volume] = []
        with aws_errors("ec2:DescribeVolumes"):
            pages = self.client.get_paginator("describe_volumes").paginate(
                Filters=[{"Name": f"tag:{tags.NAME}", "Values": [name]}]
            )
            for page in pages:
                found.extend(volume_from_api(v) for v in page.get("Volumes", []))
        live = [v for v in found if v.state != "deleted"]
        return tuple(sorted(live, key=lambda v: (v.create_time, v.id)))

    def drive_snapshots(self, name: str) -> tuple[Snapshot, ...]:
        """Every snapshot of drive ``name`` owned by this account, oldest first."""
        found: list[Snapshot] = []
        with aws_errors("ec2:DescribeSnapshots"):
            pages = self.client.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"],
                Filters=[{"Name": f"tag:{tags.NAME}", "Values": [name]}],
            )
            for page in pages:
                found.extend(snapshot_from_api(s) for s in page.get("Snapshots", []))
        return tuple(sorted(found, key=lambda s: (s.start_time, s.id)))

    def instances(self, ids: Iterable[str]) -> dict[str, InstanceInfo]:
        """State of each instance; ids EC2 does not know are reported as terminated."""
        wanted = sorted(set(ids))
        result: dict[str, InstanceInfo] = {}
        # A filter, not InstanceIds: one unknown id would fail the whole InstanceIds call.
        for start in range(0, len(wanted), _MAX_FILTER_VALUES):
            chunk = wanted[start : start + _MAX_FILTER_VALUES]
            with aws_errors("ec2:DescribeInstances"):
                pages = self.client.get_paginator("describe_instances").paginate(
                    Filters=[{"Name": "instance-id", "Values": chunk}]
                )
                for page in pages:
                    for reservation in page.get("Reservations", []):
                        for data in reservation.get("Instances", []):
                            info = instance_from_api(data)
                            result[info.id] = info
        return {i: result.get(i) or forgotten_instance(i) for i in wanted}

    def volume(self, volume_id: str) -> Optional[Volume]:
        """The volume, or None if EC2 does not know it (deleted a while ago, or never was)."""
        with aws_errors("ec2:DescribeVolumes"):
            try:
                answer = self.client.describe_volumes(VolumeIds=[volume_id])
            except ClientError as e:
                if _code(e) == "InvalidVolume.NotFound":
                    return None
                raise
        volumes = answer.get("Volumes", [])
        return volume_from_api(volumes[0]) if volumes else None

    def snapshot(self, snapshot_id: str) -> Optional[Snapshot]:
        """The snapshot, or None if EC2 does not know it."""
        with aws_errors("ec2:DescribeSnapshots"):
            try:
                answer = self.client.describe_snapshots(SnapshotIds=[snapshot_id])
            except ClientError as e:
                if _code(e) == "InvalidSnapshot.NotFound":
                    return None
                raise
        snapshots = answer.get("Snapshots", [])
        return snapshot_from_api(snapshots[0]) if snapshots else None

    # -- writes --

    def create_volume(
        self,
        name: str,
        availability_zone: str,
        size_gib: Optional[int],
        generation: int,
        *,
        snapshot_id: Optional[str] = None,
        encrypted: bool = True,
        kms_key_id: Optional[str] = None,
        iops: Optional[int] = None,
        throughput: Optional[int] = None,
        initialization_rate: Optional[int] = None,
        instance_id: Optional[str] = None,
        extra_tags: Optional[Mapping[str, str]] = None,
    ) -> Volume:
        """A gp3 volume of drive ``name``, tagged in the same call.

        ``size_gib`` None takes the snapshot's size. ``initialization_rate`` (MiB/s) asks EBS
        to load a restored volume's blocks at that rate instead of lazily on first read; it
        means nothing without a snapshot and is then left out.
        """
        if generation < 1:
            raise ValueError(f"a volume's generation starts at 1, got {generation}")
        if size_gib is None and snapshot_id is None:
            raise ConfigError("a new empty volume needs a size", "set the drive's size in GiB")
        volume_tags = dict(extra_tags or {})
        volume_tags.update(
            {
                tags.NAME: name,
                tags.CONSOLE_NAME: name,
                tags.GENERATION: str(generation),
                tags.VERSION: __version__,
            }
        )
        if snapshot_id:
            volume_tags[tags.SOURCE_SNAPSHOT] = snapshot_id
        if instance_id:
            volume_tags[tags.INSTANCE] = instance_id
        request: dict[str, Any] = {
            "AvailabilityZone": availability_zone,
            "VolumeType": "gp3",
            "Encrypted": encrypted,
            "TagSpecifications": [
                {"ResourceType": "volume", "Tags": tags.to_tag_list(volume_tags)}
            ],
        }
        optional = {
            "Size": size_gib,
            "SnapshotId": snapshot_id,
            "KmsKeyId": kms_key_id,
            "Iops": iops,
            "Throughput": throughput,
            "VolumeInitializationRate": initialization_rate if snapshot_id else None,
        }
        request.update({k: v for k, v in optional.items() if v is not None})
        with aws_errors("ec2:CreateVolume"):
            # botocore fills ClientToken once per call, so its retries never make two volumes.
            answer = self.client.create_volume(**request)
        return volume_from_api(cast(Mapping[str, Any], answer))

    def attach_volume(self, volume_id: str, instance_id: str, device: str) -> Attachment:
        with aws_errors("ec2:AttachVolume"):
            answer = self.client.attach_volume(
                VolumeId=volume_id, InstanceId=instance_id, Device=device
            )
        return Attachment(
            instance_id=answer.get("InstanceId", instance_id),
            state=answer.get("State", "attaching"),
            device=answer.get("Device", device),
        )

    def detach_volume(self, volume_id: str, instance_id: str, force: bool = False) -> None:
        """Detach from ``instance_id`` only: never someone else's attachment.

        ``force`` can lose data that was not flushed; only for a volume already saved.
        """
        with aws_errors("ec2:DetachVolume"):
            self.client.detach_volume(VolumeId=volume_id, InstanceId=instance_id, Force=force)

    def delete_volume(self, volume_id: str) -> None:
        with aws_errors("ec2:DeleteVolume"):
            self.client.delete_volume(VolumeId=volume_id)

    def set_volume_generation(self, volume_id: str, generation: int) -> None:
        if generation < 1:
            raise ValueError(f"a volume's generation starts at 1, got {generation}")
        with aws_errors("ec2:CreateTags"):
            self.client.create_tags(
                Resources=[volume_id],
                Tags=tags.to_tag_list({tags.GENERATION: str(generation)}),
            )

    def create_snapshot(
        self,
        volume: Volume,
        kind: SnapshotKind,
        reason: str,
        instance_id: Optional[str],
        description: Optional[str] = None,
    ) -> Snapshot:
        """Snapshot ``volume`` at its current generation, tagged in the same call.

        ``kind`` is ``final`` only if the filesystem was unmounted (or the volume detached).
        """
        name = volume.drive
        if not name:
            raise ConfigError(
                f"volume {volume.id} has no {tags.NAME} tag",
                "only volumes of a drive can be saved as the drive",
            )
        if kind not in (tags.FINAL, tags.CHECKPOINT):
            raise ValueError(f"snapshot kind must be final or checkpoint, got {kind!r}")
        snapshot_tags = {
            tags.NAME: name,
            tags.CONSOLE_NAME: name,
            tags.GENERATION: str(volume.generation),
            tags.KIND: kind,
            tags.SOURCE_VOLUME: volume.id,
            tags.REASON: reason,
            tags.SAVED_AT: self._now().astimezone(timezone.utc).isoformat(timespec="seconds"),
            tags.VERSION: __version__,
        }
        if instance_id:
            snapshot_tags[tags.INSTANCE] = instance_id
        text = description or (
            f"xdrive {name} generation {volume.generation} {kind} ({reason}) of {volume.id}"
        )
        with aws_errors("ec2:CreateSnapshot"):
            answer = self.client.create_snapshot(
                VolumeId=volume.id,
                Description=text[:255],
                TagSpecifications=[
                    {"ResourceType": "snapshot", "Tags": tags.to_tag_list(snapshot_tags)}
                ],
            )
        return snapshot_from_api(cast(Mapping[str, Any], answer))

    def delete_snapshot(self, snapshot_id: str) -> None:
        with aws_errors("ec2:DeleteSnapshot"):
            self.client.delete_snapshot(SnapshotId=snapshot_id)

    # -- waits --

    def wait_volume_state(
        self,
        volume_id: str,
        states: Union[VolumeState, Iterable[VolumeState]],
        timeout: float = 300.0,
        on_progress: Optional[Callable[[Volume], None]] = None,
    ) -> Optional[Volume]:
        """Poll until the volume is in one of ``states``.

        Returns None only when ``deleted`` is wanted and EC2 has forgotten the volume.
        A volume in ``error`` (when not wanted) or vanished raises ``AwsError``.
        """
        wanted = frozenset([states] if isinstance(states, str) else states)

        def check() -> tuple[bool, Optional[Volume], str]:
            volume = self.volume(volume_id)
            if volume is None:
                if "deleted" in wanted:
                    return True, None, "deleted"
                raise AwsError(f"volume {volume_id} no longer exists", "check who deleted it")
            if on_progress:
                on_progress(volume)
            if volume.state in wanted:
                return True, volume, volume.state
            if volume.state in ("error", "deleting", "deleted"):
                raise AwsError(
                    f"volume {volume_id} is {volume.state}, not {'/'.join(sorted(wanted))}",
                    "look at it in the EC2 console; the drive's snapshots are not affected",
                )
            return False, volume, volume.state

        return self._poll(f"volume {volume_id} to be {'/'.join(sorted(wanted))}", timeout, check)

    def wait_attached(
        self,
        volume_id: str,
        instance_id: str,
        timeout: float = 300.0,
        on_progress: Optional[Callable[[Volume], None]] = None,
    ) -> Volume:
        """Poll until the volume's attachment to ``instance_id`` is ``attached``."""

        def check() -> tuple[bool, Optional[Volume], str]:
            volume = self._existing_volume(volume_id)
            if on_progress:
                on_progress(volume)
            attachment = volume.attachment
            if attachment and attachment.instance_id != instance_id:
                raise AwsError(
                    f"volume {volume_id} got attached to {attachment.instance_id}, "
                    f"not {instance_id}",
                    "another instance took the drive: one writer per drive",
                )
            if attachment and attachment.state == "attached":
                return True, volume, "attached"
            return False, volume, attachment.state if attachment else volume.state

        result = self._poll(f"volume {volume_id} to attach to {instance_id}", timeout, check)
        assert result is not None
        return result

    def wait_detached(
        self,
        volume_id: str,
        instance_id: str,
        timeout: float = 300.0,
        on_progress: Optional[Callable[[Volume], None]] = None,
    ) -> Optional[Volume]:
        """Poll until the volume holds no attachment to ``instance_id`` (None: volume gone)."""

        def check() -> tuple[bool, Optional[Volume], str]:
            volume = self.volume(volume_id)
            if volume is None:
                return True, None, "gone"
            if on_progress:
                on_progress(volume)
            held = [
                a
                for a in volume.attachments
                if a.instance_id == instance_id and a.state != "detached"
            ]
            if not held:
                return True, volume, volume.state
            return False, volume, held[0].state

        return self._poll(f"volume {volume_id} to detach from {instance_id}", timeout, check)

    def wait_snapshot_completed(
        self,
        snapshot_id: str,
        timeout: float = 3600.0,
        on_progress: Optional[Callable[[Snapshot], None]] = None,
    ) -> Snapshot:
        """Poll until the snapshot is ``completed``; ``error`` (or vanishing) raises."""

        def check() -> tuple[bool, Optional[Snapshot], str]:
            snapshot = self.snapshot(snapshot_id)
            if snapshot is None:
                raise AwsError(f"snapshot {snapshot_id} no longer exists", "check who deleted it")
            if on_progress:
                on_progress(snapshot)
            if snapshot.state == "completed":
                return True, snapshot, "completed"
            if snapshot.state in ("error", "recoverable"):
                detail = f": {snapshot.state_message}" if snapshot.state_message else ""
                raise AwsError(
                    f"snapshot {snapshot_id} of {snapshot.volume_id} is {snapshot.state}{detail}",
                    "the volume was not saved by it; keep the volume and save it again",
                )
            return False, snapshot, f"{snapshot.state} {snapshot.progress}%"

        result = self._poll(f"snapshot {snapshot_id} to complete", timeout, check)
        assert result is not None
        return result

    # -- the launcher's reads: every drive, instances, zones, prices, networks --

    def all_drive_volumes(self) -> tuple[Volume, ...]:
        """Every volume of every drive (any ``xdrive:name``) that is not gone, oldest first."""
        found: list[Volume] = []
        with aws_errors("ec2:DescribeVolumes"):
            pages = self.client.get_paginator("describe_volumes").paginate(
                Filters=[{"Name": "tag-key", "Values": [tags.NAME]}]
            )
            for page in pages:
                found.extend(volume_from_api(v) for v in page.get("Volumes", []))
        live = [v for v in found if v.state != "deleted" and v.drive]
        return tuple(sorted(live, key=lambda v: (v.create_time, v.id)))

    def all_drive_snapshots(self) -> tuple[Snapshot, ...]:
        """Every snapshot of every drive owned by this account, oldest first."""
        found: list[Snapshot] = []
        with aws_errors("ec2:DescribeSnapshots"):
            pages = self.client.get_paginator("describe_snapshots").paginate(
                OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [tags.NAME]}]
            )
            for page in pages:
                found.extend(snapshot_from_api(s) for s in page.get("Snapshots", []))
        return tuple(sorted((s for s in found if s.drive), key=lambda s: (s.start_time, s.id)))

    def drive_instances(self, name: Optional[str] = None) -> tuple[InstanceDetails, ...]:
        """Instances tagged with drive ``name`` (any drive when None), in any state, by launch."""
        if name is None:
            filters = [{"Name": "tag-key", "Values": [tags.NAME]}]
        else:
            filters = [{"Name": f"tag:{tags.NAME}", "Values": [name]}]
        found: list[InstanceDetails] = []
        with aws_errors("ec2:DescribeInstances"):
            pages = self.client.get_paginator("describe_instances").paginate(
                Filters=cast(Any, filters)
            )
            for page in pages:
                for reservation in page.get("Reservations", []):
                    for data in reservation.get("Instances", []):
                        found.append(instance_details_from_api(cast(Mapping[str, Any], data)))
        epoch = datetime.min.replace(tzinfo=timezone.utc)
        return tuple(sorted(found, key=lambda i: (i.launch_time or epoch, i.id)))

    def availability_zones(self) -> tuple[str, ...]:
        """The region's availability zones that are up (no Local or Wavelength Zones)."""
        with aws_errors("ec2:DescribeAvailabilityZones"):
            answer = self.client.describe_availability_zones()
        return tuple(
            sorted(
                z["ZoneName"]
                for z in answer.get("AvailabilityZones", [])
                if z.get("State", "available") == "available"
                and z.get("ZoneType", "availability-zone") == "availability-zone"
            )
        )

    def instance_type(self, name: str) -> InstanceTypeInfo:
        """What EC2 says about instance type ``name``; ``UnknownInstanceType`` if nothing."""
        with aws_errors("ec2:DescribeInstanceTypes"):
            try:
                answer = self.client.describe_instance_types(InstanceTypes=cast(Any, [name]))
            except ClientError as e:
                if _code(e) in ("InvalidInstanceType", "InvalidParameterValue"):
                    raise UnknownInstanceType(name) from None
                raise
        found = answer.get("InstanceTypes", [])
        if not found:
            raise UnknownInstanceType(name)
        data = cast(Mapping[str, Any], found[0])
        gpus = sum(int(g.get("Count", 0)) for g in (data.get("GpuInfo") or {}).get("Gpus", []))
        return InstanceTypeInfo(
            name=str(data.get("InstanceType", name)),
            architectures=tuple(
                (data.get("ProcessorInfo") or {}).get("SupportedArchitectures", ())
            ),
            vcpus=int((data.get("VCpuInfo") or {}).get("DefaultVCpus", 0)),
            memory_mib=int((data.get("MemoryInfo") or {}).get("SizeInMiB", 0)),
            gpus=gpus,
        )

    def instance_type_zones(self, name: str) -> tuple[str, ...]:
        """The availability zones that offer instance type ``name``."""
        zones: set[str] = set()
        with aws_errors("ec2:DescribeInstanceTypeOfferings"):
            pages = self.client.get_paginator("describe_instance_type_offerings").paginate(
                LocationType="availability-zone",
                Filters=[{"Name": "instance-type", "Values": [name]}],
            )
            for page in pages:
                zones.update(o["Location"] for o in page.get("InstanceTypeOfferings", []))
        return tuple(sorted(zones))

    def spot_prices(self, instance_type: str) -> tuple[SpotPrice, ...]:
        """The current Linux spot price of ``instance_type`` in each zone, by zone."""
        newest: dict[str, SpotPrice] = {}
        with aws_errors("ec2:DescribeSpotPriceHistory"):
            pages = self.client.get_paginator("describe_spot_price_history").paginate(
                InstanceTypes=cast(Any, [instance_type]),
                ProductDescriptions=["Linux/UNIX"],
                StartTime=self._now(),  # "now": the price in effect, one per zone
            )
            for page in pages:
                for item in page.get("SpotPriceHistory", []):
                    # "Linux/UNIX" or "Linux/UNIX (Amazon VPC)"; never SUSE/RHEL/Windows.
                    if not str(item.get("ProductDescription", "")).startswith("Linux/UNIX"):
                        continue
                    price = SpotPrice(
                        availability_zone=item["AvailabilityZone"],
                        instance_type=item.get("InstanceType", instance_type),
                        price=float(item["SpotPrice"]),
                        timestamp=item["Timestamp"],
                    )
                    known = newest.get(price.availability_zone)
                    if known is None or price.timestamp > known.timestamp:
                        newest[price.availability_zone] = price
        return tuple(newest[z] for z in sorted(newest))

    def subnets(self, ids: Iterable[str] = (), default_for_az: bool = False) -> tuple[Subnet, ...]:
        """Subnets by id (``ConfigError`` for an unknown one), or the default subnets."""
        wanted = list(ids)
        request: dict[str, Any] = {}
        if wanted:
            request["SubnetIds"] = wanted
        if default_for_az:
            request["Filters"] = [{"Name": "default-for-az", "Values": ["true"]}]
        with aws_errors("ec2:DescribeSubnets"):
            try:
                answer = self.client.describe_subnets(**request)
            except ClientError as e:
                if _code(e) == "InvalidSubnetID.NotFound":
                    raise ConfigError(
                        f"subnet {', '.join(wanted)} does not exist in this region",
                        "check the id and the region (--region)",
                    ) from None
                raise
        found = [
            Subnet(
                id=s["SubnetId"],
                vpc_id=s.get("VpcId", ""),
                availability_zone=s["AvailabilityZone"],
                default_for_az=bool(s.get("DefaultForAz", False)),
            )
            for s in answer.get("Subnets", [])
        ]
        return tuple(sorted(found, key=lambda s: (s.availability_zone, s.id)))

    def launch_template(self, name: str) -> Optional[LaunchTemplate]:
        """The launch template called ``name``, or None."""
        with aws_errors("ec2:DescribeLaunchTemplates"):
            try:
                answer = self.client.describe_launch_templates(LaunchTemplateNames=[name])
            except ClientError as e:
                if _code(e).startswith("InvalidLaunchTemplateName."):
                    return None
                raise
        found = answer.get("LaunchTemplates", [])
        return _launch_template_from_api(found[0]) if found else None

    # -- the launcher's writes --

    def run_instance(
        self, spec: InstanceSpec, *, dry_run: bool = False
    ) -> Optional[InstanceDetails]:
        """Launch one instance (IMDSv2 only, tagged in the same call).

        ``dry_run`` asks EC2 whether the call would be allowed and valid, creating nothing:
        None means yes; otherwise it raises like the real call would.
        """
        with aws_errors("ec2:RunInstances"):
            try:
                # botocore fills ClientToken once per call: retries never launch twice.
                answer = self.client.run_instances(DryRun=dry_run, **run_instances_request(spec))
            except ClientError as e:
                if dry_run and _code(e) == "DryRunOperation":
                    return None
                raise
        return instance_details_from_api(cast(Mapping[str, Any], answer["Instances"][0]))

    def terminate_instances(self, instance_ids: Iterable[str]) -> None:
        ids = sorted(set(instance_ids))
        if not ids:
            return
        with aws_errors("ec2:TerminateInstances"):
            self.client.terminate_instances(InstanceIds=ids)

    def create_launch_template(
        self, name: str, spec: InstanceSpec, template_tags: Mapping[str, str]
    ) -> LaunchTemplate:
        """A launch template for ``spec`` (see ``launch_template_data``), tagged as it is made."""
        with aws_errors("ec2:CreateLaunchTemplate"):
            answer = self.client.create_launch_template(
                LaunchTemplateName=name,
                LaunchTemplateData=cast(Any, launch_template_data(spec)),
                TagSpecifications=[
                    {
                        "ResourceType": "launch-template",
                        "Tags": tags.to_tag_list(dict(template_tags)),
                    }
                ],
            )
        return _launch_template_from_api(cast(Mapping[str, Any], answer["LaunchTemplate"]))

    def update_launch_template(self, name: str, spec: InstanceSpec) -> LaunchTemplate:
        """A new version of template ``name`` for ``spec``, made its default."""
        with aws_errors("ec2:CreateLaunchTemplateVersion"):
            answer = self.client.create_launch_template_version(
                LaunchTemplateName=name, LaunchTemplateData=cast(Any, launch_template_data(spec))
            )
        version = str(answer["LaunchTemplateVersion"]["VersionNumber"])
        with aws_errors("ec2:ModifyLaunchTemplate"):
            self.client.modify_launch_template(LaunchTemplateName=name, DefaultVersion=version)
        template = self.launch_template(name)
        if template is None:
            raise AwsError(f"launch template {name} vanished while it was updated", "retry")
        return template

    def delete_launch_template(self, name: str) -> None:
        with aws_errors("ec2:DeleteLaunchTemplate"):
            self.client.delete_launch_template(LaunchTemplateName=name)

    def wait_instances(
        self,
        instance_ids: Iterable[str],
        states: Iterable[InstanceState],
        timeout: float = 600.0,
        on_progress: Optional[Callable[[Mapping[str, InstanceInfo]], None]] = None,
    ) -> dict[str, InstanceInfo]:
        """Poll until every instance is in one of ``states`` (forgotten ones count as
        terminated)."""
        ids = sorted(set(instance_ids))
        wanted = frozenset(states)

        def check() -> tuple[bool, Optional[dict[str, InstanceInfo]], str]:
            found = self.instances(ids)
            if on_progress:
                on_progress(found)
            done = all(i.state in wanted for i in found.values())
            return done, found, ", ".join(f"{i.id} {i.state}" for i in found.values())

        result = self._poll(f"{', '.join(ids)} to be {'/'.join(sorted(wanted))}", timeout, check)
        return result or {}

    def _existing_volume(self, volume_id: str) -> Volume:
        volume = self.volume(volume_id)
        if volume is None:
            raise AwsError(f"volume {volume_id} no longer exists", "check who deleted it")
        return volume

    def _poll(
        self, what: str, timeout: float, check: Callable[[], tuple[bool, Optional[T], str]]
    ) -> Optional[T]:
        """Call ``check`` with growing pauses until it says done or ``timeout`` passes."""
        deadline = self._monotonic() + timeout
        delay = self._backoff.initial
        while True:
            done, value, state = check()
            if done:
                return value
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                raise WaitTimeout(
                    f"gave up after {timeout:.0f} s waiting for {what}; it is {state}",
                    "EC2 may be slow right now: retry, or look at the resource in the console",
                )
            self._sleep(min(delay, remaining))
            delay = min(delay * self._backoff.factor, self._backoff.maximum)


def _metadata_options() -> dict[str, Any]:
    # IMDSv2 only: a token is needed for every read, so an SSRF in a container cannot read
    # the instance profile's credentials with a plain GET.
    return {"HttpTokens": "required", "HttpEndpoint": "enabled"}


def run_instances_request(spec: InstanceSpec) -> dict[str, Any]:
    """RunInstances parameters for ``spec``: one instance, IMDSv2 only, tagged at launch.

    Only the instance (and its spot request) get the tags: its root volume must never carry
    ``xdrive:name``, or it would count as a volume of the drive.
    """
    tag_list = tags.to_tag_list(dict(spec.tags))
    specs: list[dict[str, Any]] = [{"ResourceType": "instance", "Tags": tag_list}]
    request: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.instance_type,
        "MinCount": 1,
        "MaxCount": 1,
        "UserData": spec.user_data,  # boto3 base64-encodes it for RunInstances
        "MetadataOptions": _metadata_options(),
        # `shutdown` on the instance ends it (a one-time spot instance cannot stop anyway).
        "InstanceInitiatedShutdownBehavior": "terminate",
    }
    if spec.market == "spot":
        spot: dict[str, Any] = {
            "SpotInstanceType": "one-time",
            "InstanceInterruptionBehavior": "terminate",
        }
        if spec.max_price is not None:
            spot["MaxPrice"] = spec.max_price
        request["InstanceMarketOptions"] = {"MarketType": "spot", "SpotOptions": spot}
        specs.append({"ResourceType": "spot-instances-request", "Tags": tag_list})
    request["TagSpecifications"] = specs
    optional = {
        "SubnetId": spec.subnet_id,
        "SecurityGroupIds": list(spec.security_group_ids) or None,
        "KeyName": spec.key_name,
        "IamInstanceProfile": {"Name": spec.instance_profile} if spec.instance_profile else None,
    }
    request.update({k: v for k, v in optional.items() if v is not None})
    return request


def launch_template_data(spec: InstanceSpec) -> dict[str, Any]:
    """LaunchTemplateData for ``spec``. No market options and no subnet: the Auto Scaling
    group that uses the template decides both (its instances distribution and its subnets).
    """
    import base64

    data: dict[str, Any] = {
        "ImageId": spec.image_id,
        "InstanceType": spec.instance_type,
        # Unlike RunInstances, a launch template wants the caller's base64.
        "UserData": base64.b64encode(spec.user_data).decode("ascii"),
        "MetadataOptions": _metadata_options(),
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": tags.to_tag_list(dict(spec.tags))}
        ],
    }
    optional = {
        "SecurityGroupIds": list(spec.security_group_ids) or None,
        "KeyName": spec.key_name,
        "IamInstanceProfile": {"Name": spec.instance_profile} if spec.instance_profile else None,
    }
    data.update({k: v for k, v in optional.items() if v is not None})
    return data


def _launch_template_from_api(data: Mapping[str, Any]) -> LaunchTemplate:
    return LaunchTemplate(
        id=data["LaunchTemplateId"],
        name=data["LaunchTemplateName"],
        default_version=int(data.get("DefaultVersionNumber", 1)),
        latest_version=int(data.get("LatestVersionNumber", 1)),
        tags=tags.from_tag_list(data.get("Tags")),
    )


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))
