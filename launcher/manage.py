"""Drive management from the laptop: save, prune, rm, stop, status, prices.

Each function is one CLI command. Each observes the drive first and refuses, with nothing
changed, whatever would break the data rule (shared/design.md): never delete a state that
is not also held elsewhere, never touch a drive an instance is writing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Callable, Optional

from xdrive import tags
from xdrive.agent.plan import is_saved, own_finals
from xdrive.ec2 import LIVE_INSTANCE_STATES, Snapshot, Volume
from xdrive.errors import ConfigError, DriveBusy, XdriveError
from xdrive.launcher import autoresume
from xdrive.launcher.autoresume import AutoResumeGroup
from xdrive.launcher.aws import Aws
from xdrive.launcher.drives import (
    HOLDING_STATES,
    DriveView,
    InstanceStatus,
    describe_state,
    instance_statuses,
    observe_drive,
    observe_drives,
    require_drive,
    require_free,
)
from xdrive.launcher.prices import Ec2PriceSource, PriceSource, ZonePrice, price_table
from xdrive.launcher.prune import PrunePlan, plan_prune
from xdrive.names import validate_drive_name

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


# --- save -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class SaveResult:
    drive: str
    snapshots: tuple[Snapshot, ...]  # requested by this call (completed when waited for)
    notes: tuple[str, ...]  # volumes left alone, and why


def _why_not_saveable(volume: Volume, view: DriveView) -> Optional[str]:
    """None if ``volume`` may be snapshotted as a final save now, else the reason not."""
    finals = own_finals(volume, view.snapshots)
    if is_saved(volume, view.snapshots):
        return f"{volume.id} is already saved by {finals[-1].id}"
    if finals:
        last = finals[-1]
        return f"{volume.id} is being saved by {last.id} ({last.state} {last.progress}%)"
    if volume.state not in ("available", "in-use"):
        return f"{volume.id} is {volume.state}"
    holder = volume.attached_instance
    if holder is not None:
        info = view.holders.get(holder)
        state = info.state if info is not None else "terminated"
        if state != "terminated":
            return f"{volume.id} is attached to {holder} ({state}), whose agent saves it"
    return None


def save_drive(
    aws: Aws,
    name: str,
    *,
    volume_id: Optional[str] = None,
    wait: bool = False,
    progress: Progress = _quiet,
) -> SaveResult:
    """Snapshot (kind final, reason manual) volumes left by instances that died unsaved.

    Only a volume that is detached, or whose instance is terminated, is saved here: a live
    instance's agent owns its volume, and a shutting-down one may be saving it right now.
    """
    validate_drive_name(name)
    view = observe_drive(aws.ec2, name)
    require_drive(view)
    candidates = [v for v in view.volumes if volume_id in (None, v.id)]
    if volume_id and not candidates:
        raise ConfigError(
            f"{volume_id} is not a volume of drive {name}", "`xdrive ls` shows its volumes"
        )
    eligible: list[Volume] = []
    notes: list[str] = []
    for volume in candidates:
        why = _why_not_saveable(volume, view)
        if why is None:
            eligible.append(volume)
        else:
            notes.append(why)
    busy = [n for n in notes if "whose agent saves it" in n]
    if not eligible and (busy or volume_id):
        raise DriveBusy(
            f"not saving: {'; '.join(busy or notes)}",
            f"`xdrive stop {name}` terminates the instance and its agent saves the drive",
        )
    if not candidates:
        notes.append(f"drive {name} has no volume: its state is in its snapshots")
    made = []
    for volume in eligible:
        progress(f"snapshotting {volume.id}")
        made.append(aws.ec2.create_snapshot(volume, tags.FINAL, "manual", None))
    if wait:
        made = [
            aws.ec2.wait_snapshot_completed(
                s.id, on_progress=lambda s: progress(f"{s.id}: {s.state} {s.progress}%")
            )
            for s in made
        ]
    return SaveResult(name, tuple(made), tuple(notes))


# --- prune ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneResult:
    plan: PrunePlan
    deleted: tuple[str, ...]
    dry_run: bool


def prune_drive(
    aws: Aws, name: str, keep: int, *, dry_run: bool = False, progress: Progress = _quiet
) -> PruneResult:
    validate_drive_name(name)
    view = observe_drive(aws.ec2, name)
    require_drive(view)
    plan = plan_prune(name, view.volumes, view.snapshots, keep)
    if dry_run:
        return PruneResult(plan, (), True)
    deleted = []
    for snapshot in plan.to_delete:
        progress(f"deleting {snapshot.id}")
        aws.ec2.delete_snapshot(snapshot.id)
        deleted.append(snapshot.id)
    return PruneResult(plan, tuple(deleted), False)


# --- rm -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RemovalPlan:
    drive: str
    volumes: tuple[Volume, ...]
    snapshots: tuple[Snapshot, ...]
    template: Optional[str]  # the auto-resume launch template, if one is left


@dataclass(frozen=True)
class RemovalResult:
    plan: RemovalPlan
    deleted_volumes: tuple[str, ...]
    deleted_snapshots: tuple[str, ...]
    deleted_template: Optional[str]


def plan_removal(aws: Aws, name: str) -> RemovalPlan:
    """What `rm` deletes; refuses (``DriveBusy``) while anything may still write the drive."""
    validate_drive_name(name)
    view = observe_drive(aws.ec2, name)
    template = aws.ec2.launch_template(autoresume.group_name(name))
    if not (view.volumes or view.snapshots or template):
        require_drive(DriveView(name))
    require_free(view, "remove it", HOLDING_STATES)
    group = autoresume.describe_group(aws.client("autoscaling"), name)
    if group is not None:
        raise DriveBusy(
            f"cannot remove it: drive {name} resumes automatically (group {group.name})",
            f"stop it first with `xdrive stop {name}`",
        )
    for volume in view.volumes:
        if volume.attachment is not None or volume.state == "creating":
            what = (
                f"attached to {volume.attached_instance}" if volume.attachment else "being created"
            )
            raise DriveBusy(
                f"cannot remove it: volume {volume.id} is {what}",
                "EC2 frees it shortly once its instance is gone: retry in a minute",
            )
    for snapshot in view.snapshots:
        if snapshot.state in ("pending", "recovering"):
            raise DriveBusy(
                f"cannot remove it: snapshot {snapshot.id} is {snapshot.state} "
                "(a save in progress)",
                "retry once it is completed",
            )
    return RemovalPlan(name, view.volumes, view.snapshots, template.name if template else None)


def remove_drive(
    aws: Aws,
    name: str,
    confirm: Callable[[RemovalPlan], bool],
    progress: Progress = _quiet,
) -> RemovalResult:
    """`xdrive rm`: every volume and snapshot of the drive, after ``confirm`` says yes."""
    plan = plan_removal(aws, name)
    if not confirm(plan):
        raise XdriveError(f"drive {name} was not removed", "nothing was deleted")
    again = plan_removal(aws, name)
    if {v.id for v in again.volumes} != {v.id for v in plan.volumes} or {
        s.id for s in again.snapshots
    } != {s.id for s in plan.snapshots}:
        raise XdriveError(
            f"drive {name} changed while you were asked",
            "nothing was deleted; run `xdrive rm` again",
        )
    volumes, snapshots = [], []
    for volume in plan.volumes:
        progress(f"deleting {volume.id}")
        aws.ec2.delete_volume(volume.id)
        volumes.append(volume.id)
    for snapshot in plan.snapshots:
        progress(f"deleting {snapshot.id}")
        aws.ec2.delete_snapshot(snapshot.id)
        snapshots.append(snapshot.id)
    if plan.template:
        aws.ec2.delete_launch_template(plan.template)
    return RemovalResult(plan, tuple(volumes), tuple(snapshots), plan.template)


# --- stop -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class StopResult:
    drive: str
    terminated: tuple[str, ...]
    group_deleted: bool
    template_deleted: bool
    newest: str  # the drive's newest state after the stop (after the wait, if any)


def stop_drive(
    aws: Aws, name: str, *, wait: bool = False, progress: Progress = _quiet
) -> StopResult:
    """Terminate the drive's instances (their agents save the drive on the way down), and
    end auto-resume: the Auto Scaling group and its launch template go."""
    validate_drive_name(name)
    ec2 = aws.ec2
    view = observe_drive(ec2, name)
    autoscaling = aws.client("autoscaling")
    group = autoresume.describe_group(autoscaling, name)
    template = ec2.launch_template(autoresume.group_name(name))
    if not view.exists and group is None and template is None:
        require_drive(view)
    ids = {i.id for i in view.holding_instances(LIVE_INSTANCE_STATES)}
    group_deleted = False
    if group is not None:
        progress(f"deleting Auto Scaling group {group.name}")
        group_deleted = autoresume.delete_group(autoscaling, name)
        ids.update(group.instances)
    if template is not None:
        ec2.delete_launch_template(template.name)
    if ids:
        progress(f"terminating {', '.join(sorted(ids))}")
        ec2.terminate_instances(ids)
    if wait and ids:
        ec2.wait_instances(
            ids,
            ("terminated",),
            timeout=900,
            on_progress=lambda found: progress(
                "waiting for the agent to save the drive: "
                + ", ".join(f"{i.id} {i.state}" for i in found.values())
            ),
        )
    after = observe_drive(ec2, name)
    return StopResult(
        name,
        tuple(sorted(ids)),
        group_deleted,
        template is not None,
        describe_state(after.newest, after.snapshots),
    )


# --- status ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StatusReport:
    instances: tuple[InstanceStatus, ...]
    groups: tuple[AutoResumeGroup, ...]


def drive_status(aws: Aws, name: Optional[str] = None, include_ended: bool = False) -> StatusReport:
    """Instances of each drive (or of ``name``) and what their agents have done, from EC2."""
    if name is not None:
        validate_drive_name(name)
        views: Iterable[DriveView] = (observe_drive(aws.ec2, name),)
    else:
        views = observe_drives(aws.ec2)
    rows = tuple(row for view in views for row in instance_statuses(view, include_ended))
    groups = autoresume.describe_groups(aws.client("autoscaling"))
    if name is not None:
        groups = tuple(g for g in groups if g.drive == name)
    return StatusReport(rows, groups)


# --- prices ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PriceReport:
    instance_type: str
    region: str
    zones: tuple[ZonePrice, ...]  # offered zones, by zone
    cheapest: Optional[str]


def spot_prices(aws: Aws, instance_type: str, prices: Optional[PriceSource] = None) -> PriceReport:
    """The current spot price of ``instance_type`` in each zone that offers it."""
    info = aws.ec2.instance_type(instance_type)
    zones = tuple(set(aws.ec2.availability_zones()) & set(aws.ec2.instance_type_zones(info.name)))
    table = price_table(prices or Ec2PriceSource(aws.ec2), info.name, zones)
    priced = [z for z in table if z.price is not None]
    cheapest = (
        min(priced, key=lambda z: (z.price, z.availability_zone)).availability_zone
        if priced
        else None
    )
    return PriceReport(info.name, aws.region, table, cheapest)
