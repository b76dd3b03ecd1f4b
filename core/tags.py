"""The tag schema: everything about a drive lives in EC2 tags on its volumes and snapshots."""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from mypy_boto3_ec2.type_defs import TagTypeDef

NAME = "xdrive:name"  # drive name, on every volume and snapshot of the drive
CONSOLE_NAME = "Name"  # same value, for the EC2 console
GENERATION = "xdrive:generation"  # volume from state g is g+1; snapshot: its volume's
KIND = "xdrive:kind"  # snapshots: "final" (after unmount) or "checkpoint" (while mounted)
SOURCE_VOLUME = "xdrive:source-volume"  # snapshots: the volume they were taken from
SOURCE_SNAPSHOT = "xdrive:source-snapshot"  # volumes: the snapshot they were restored from
INSTANCE = "xdrive:instance"  # snapshots: instance that took it; volumes: instance that created it
REASON = "xdrive:reason"  # snapshots: why (spot-interruption, shutdown, rebalance, manual, ...)
SAVED_AT = "xdrive:saved-at"  # snapshots: ISO time the snapshot was requested
VERSION = "xdrive:version"  # xdrive version that wrote the resource

SnapshotKind = Literal["final", "checkpoint"]
FINAL: SnapshotKind = "final"
CHECKPOINT: SnapshotKind = "checkpoint"


def to_tag_list(tags: dict[str, str]) -> list[TagTypeDef]:
    """EC2's ``[{"Key": k, "Value": v}]`` form, sorted for stable requests."""
    return [{"Key": k, "Value": v} for k, v in sorted(tags.items())]


def from_tag_list(tags: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in tags or []}
