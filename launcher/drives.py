"""What EC2 says about drives: observed once per command, summarized for `ls`, `snapshots`
and `status`. Everything is read from tags (shared/design.md), so any machine sees the same.

The agent's own state lives on its instance; from here it is read off EC2: which drive
volume the instance holds, which snapshots it requested, what it left behind.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from xdrive import tags
from xdrive.agent.plan import (
    RANK_CHECKPOINT,
    RANK_FINAL,
    DriveState,
    instances_to_describe,
    is_saved,
    newest_state,
)
from xdrive.ec2 import (
    LIVE_INSTANCE_STATES,
    Ec2,
    InstanceDetails,
    InstanceInfo,
    Snapshot,
    Volume,
)
from xdrive.errors import DriveBusy, XdriveError
from xdrive.launcher.placement import drive_placement
from xdrive.names import validate_drive_name

# States in which an instance may still write to the drive, or save it right now.
HOLDING_STATES = LIVE_INSTANCE_STATES | {"shutting-down"}
ASG_TAG = "aws:autoscaling:groupName"


@dataclass(frozen=True)
class DriveView:
    """One drive as EC2 shows it now."""

    name: str
    volumes: tuple[Volume, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()
    instances: tuple[InstanceDetails, ...] = ()  # tagged with the drive, any state
    # Instances named by the volumes' attachments and creator tags (plan.instances_to_describe).
    holders: Mapping[str, InstanceInfo] = field(default_factory=dict, hash=False)

    @property
    def exists(self) -> bool:
        return bool(self.volumes or self.snapshots or self.instances)

    @property
    def newest(self) -> Optional[DriveState]:
        return newest_state(self.volumes, self.snapshots)

    def holding_instances(self, states: Iterable[str] = HOLDING_STATES) -> tuple[InstanceInfo, ...]:
        """Instances (tagged with the drive, or holding one of its volumes) in ``states``."""
        wanted = frozenset(states)
        found: dict[str, InstanceInfo] = {i.id: i.info for i in self.instances if i.state in wanted}
        for volume in self.volumes:
            holder = volume.attached_instance
            info = self.holders.get(holder) if holder else None
            if info is not None and info.state in wanted:
                found[info.id] = info
        return tuple(found[i] for i in sorted(found))


def observe_drive(ec2: Ec2, name: str) -> DriveView:
    volumes = ec2.drive_volumes(name)
    snapshots = ec2.drive_snapshots(name)
    instances = ec2.drive_instances(name)
    holders = ec2.instances(instances_to_describe(volumes)) if volumes else {}
    return DriveView(name, volumes, snapshots, instances, holders)


def observe_drives(ec2: Ec2) -> tuple[DriveView, ...]:
    """Every drive of the account in this region (anything tagged ``xdrive:name``), by name."""
    volumes = ec2.all_drive_volumes()
    snapshots = ec2.all_drive_snapshots()
    instances = ec2.drive_instances(None)
    holders = ec2.instances(instances_to_describe(volumes)) if volumes else {}
    names = sorted(
        {v.drive for v in volumes if v.drive}
        | {s.drive for s in snapshots if s.drive}
        | {i.drive for i in instances if i.drive}
    )
    return tuple(
        DriveView(
            name,
            tuple(v for v in volumes if v.drive == name),
            tuple(s for s in snapshots if s.drive == name),
            tuple(i for i in instances if i.drive == name),
            holders,
        )
        for name in names
    )


def require_drive(view: DriveView) -> None:
    if not view.exists:
        raise XdriveError(
            f"there is no drive named {view.name!r} in this region",
            "`xdrive ls` lists the drives (check --region)",
        )


def require_free(view: DriveView, doing: str, states: Iterable[str] = LIVE_INSTANCE_STATES) -> None:
    """One writer per drive: refuse while an instance holds it (``DriveBusy``)."""
    busy = view.holding_instances(states)
    if busy:
        which = ", ".join(f"{i.id} ({i.state})" for i in busy)
        raise DriveBusy(
            f"cannot {doing}: drive {view.name} is in use by {which}",
            f"stop it first with `xdrive stop {view.name}` (its agent saves the drive)",
        )


# --- ls -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriveSummary:
    name: str
    newest: Optional[str]  # the id of the volume or snapshot holding the newest state
    newest_kind: Optional[str]  # "volume" | "snapshot"
    newest_description: str
    saved: bool  # the newest state is in a completed final snapshot
    generation: Optional[int]
    size_gib: Optional[int]
    zone: Optional[str]  # where the next instance must go; None: any zone
    snapshots: int
    volumes: int
    attached_to: Optional[str]  # instance holding the newest volume
    instances: tuple[str, ...]  # instances holding the drive (running, stopped, ...)


def describe_state(state: Optional[DriveState], snapshots: Iterable[Snapshot]) -> str:
    if state is None:
        return "no state yet (the first instance creates an empty volume)"
    if state.volume is not None:
        if is_saved(state.volume, snapshots):
            assert state.snapshot is not None
            return f"volume {state.volume.id}, saved by {state.snapshot.id}"
        pending = f", being saved by {state.snapshot.id}" if state.snapshot else ", unsaved"
        return f"volume {state.volume.id}{pending}"
    snap = state.snapshot
    assert snap is not None
    progress = "" if snap.state == "completed" else f" {snap.progress}%"
    return f"snapshot {snap.id} ({snap.kind}, {snap.state}{progress})"


def summarize(view: DriveView) -> DriveSummary:
    state = view.newest
    placement = drive_placement(view.volumes, view.snapshots)
    zone = placement.zones[0] if placement.zones else None
    newest_id: Optional[str] = None
    kind: Optional[str] = None
    size: Optional[int] = None
    saved = False
    attached: Optional[str] = None
    if state is not None:
        if state.volume is not None:
            newest_id, kind, size = state.volume.id, "volume", state.volume.size_gib
            saved = is_saved(state.volume, view.snapshots)
            attached = state.volume.attached_instance
        elif state.snapshot is not None:
            newest_id, kind, size = state.snapshot.id, "snapshot", state.snapshot.volume_size_gib
            saved = state.snapshot.state == "completed" and state.snapshot.kind == tags.FINAL
    return DriveSummary(
        name=view.name,
        newest=newest_id,
        newest_kind=kind,
        newest_description=describe_state(state, view.snapshots),
        saved=saved,
        generation=state.generation if state else None,
        size_gib=size,
        zone=zone,
        snapshots=len(view.snapshots),
        volumes=len(view.volumes),
        attached_to=attached,
        instances=tuple(i.id for i in view.holding_instances()),
    )


def list_drives(ec2: Ec2) -> tuple[DriveSummary, ...]:
    return tuple(summarize(view) for view in observe_drives(ec2))


# --- snapshots ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SnapshotRow:
    id: str
    generation: int
    kind: str
    state: str
    progress: int
    reason: Optional[str]
    source_volume: str
    instance: Optional[str]
    started: datetime
    size_gib: int
    newest: bool  # holds the drive's newest state


def snapshot_order(snapshot: Snapshot) -> tuple[int, int, datetime, str]:
    """The order of states (docs/ARCHITECTURE.md) among snapshots: oldest first."""
    rank = RANK_FINAL if snapshot.kind == tags.FINAL else RANK_CHECKPOINT
    return (snapshot.generation, rank, snapshot.start_time, snapshot.id)


def list_snapshots(ec2: Ec2, name: str) -> tuple[SnapshotRow, ...]:
    view = observe_drive(ec2, validate_drive_name(name))
    require_drive(view)
    state = view.newest
    newest_id = state.snapshot.id if state is not None and state.snapshot is not None else None
    return tuple(
        SnapshotRow(
            id=s.id,
            generation=s.generation,
            kind=s.kind,
            state=s.state,
            progress=s.progress,
            reason=s.tags.get(tags.REASON),
            source_volume=s.source_volume,
            instance=s.tags.get(tags.INSTANCE),
            started=s.start_time,
            size_gib=s.volume_size_gib,
            newest=s.id == newest_id,
        )
        for s in sorted(view.snapshots, key=snapshot_order)
    )


# --- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class InstanceStatus:
    drive: str
    instance_id: str
    state: str
    instance_type: Optional[str]
    lifecycle: Optional[str]
    zone: Optional[str]
    launched: Optional[datetime]
    volume: Optional[str]  # the drive volume it holds
    agent: str  # what EC2 shows of the agent's work
    auto_resume: Optional[str]  # the Auto Scaling group that launched it


def agent_activity(
    instance: InstanceDetails, volumes: Iterable[Volume], snapshots: Iterable[Snapshot]
) -> str:
    """The agent's progress as EC2 shows it: the volume it holds, the snapshots it asked for."""
    snaps = tuple(snapshots)
    held = [
        (v, a)
        for v in volumes
        for a in v.attachments
        if a.instance_id == instance.id and a.state != "detached"
    ]
    mine = sorted(
        (s for s in snaps if s.tags.get(tags.INSTANCE) == instance.id), key=snapshot_order
    )
    in_flight = [s for s in mine if s.state in ("pending", "recovering")]
    saving = (
        f"; saving {in_flight[-1].id} ({in_flight[-1].kind} {in_flight[-1].progress}%)"
        if in_flight
        else ""
    )
    if instance.state == "pending":
        return "booting"
    if instance.state in ("running", "stopping", "shutting-down"):
        if held:
            volume, attachment = held[0]
            where = "drive" if attachment.state == "attached" else f"drive {attachment.state}"
            text = f"{where}: {volume.id} (generation {volume.generation})"
            return text + saving
        created = [v for v in volumes if v.created_by == instance.id and v.state == "creating"]
        if created:
            return f"restoring into {created[0].id}" + saving
        if instance.state == "running":
            return "no drive attached yet" + saving
        return "shutting down, no drive attached" + saving
    if instance.state == "stopped" and held:
        return f"stopped, holding {held[0][0].id}: start it, or `xdrive stop {instance.drive}`"
    finals = [s for s in mine if s.kind == tags.FINAL]
    if finals:
        last = finals[-1]
        return f"saved: {last.id} ({last.state})"
    left = [
        v
        for v in volumes
        if (v.created_by == instance.id or any(a.instance_id == instance.id for a in v.attachments))
        and not is_saved(v, snaps)
    ]
    if left:
        return f"left {left[0].id} unsaved: `xdrive save {instance.drive}`"
    return "ended, nothing to save"


def instance_statuses(view: DriveView, include_ended: bool = False) -> tuple[InstanceStatus, ...]:
    known = {i.id: i for i in view.instances}
    # An instance started by other tooling carries no tag, but holding a volume makes it one.
    for volume in view.volumes:
        holder = view.holders.get(volume.attached_instance or "")
        if holder is not None and holder.id not in known:
            known[holder.id] = InstanceDetails(
                holder.id,
                holder.state,
                holder.availability_zone,
                holder.instance_type,
                holder.lifecycle,
                tags={tags.NAME: view.name},
            )
    rows = []
    for instance in known.values():
        if not include_ended and instance.state not in HOLDING_STATES:
            continue
        held = next(
            (
                v.id
                for v in view.volumes
                if any(
                    a.instance_id == instance.id and a.state != "detached" for a in v.attachments
                )
            ),
            None,
        )
        rows.append(
            InstanceStatus(
                drive=view.name,
                instance_id=instance.id,
                state=instance.state,
                instance_type=instance.instance_type,
                lifecycle=instance.lifecycle,
                zone=instance.availability_zone,
                launched=instance.launch_time,
                volume=held,
                agent=agent_activity(instance, view.volumes, view.snapshots),
                auto_resume=instance.tags.get(ASG_TAG),
            )
        )
    return tuple(rows)
