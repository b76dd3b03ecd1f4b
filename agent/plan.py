"""The boot decision: from what EC2 says about a drive, the one next step. Pure.

The agent loops observe -> ``decide`` -> execute one step -> observe again. Every rule here
protects data (shared/design.md, docs/ARCHITECTURE.md):

- never restore an older state while a newer one exists: a newer pending snapshot is waited
  for, never skipped; an unsaved volume is newer than its own checkpoints;
- never delete a volume whose content is not in a completed final snapshot of its
  generation (``is_saved``); only detached ones are offered for ``cleanup``;
- one writer per drive: the newest volume held by another live instance means ``Refuse``;
- no lazy loading when avoidable: a volume holding the newest state in this AZ is reattached
  rather than restored from its snapshot.

The order of states is (generation, rank, time, id). Within a generation a checkpoint ranks
lowest, an unsaved volume next (it may have been written after its checkpoints), and a final
snapshot highest. A volume and the final snapshots taken from it at its generation are one
state (the same content). An unsaved volume does not outrank a final of its generation taken
from a *sibling* volume: siblings come from crashed or duplicate restores, and the final is
the evidence of a later clean save; the unsaved sibling is kept (never cleaned), not lost.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Literal, Optional, Union

from xdrive.ec2 import InstanceInfo, Snapshot, Volume, forgotten_instance

# A volume in deleting/deleted/error can be neither used nor snapshotted: it is no state.
USABLE_VOLUME_STATES = frozenset({"creating", "available", "in-use"})
# error snapshots hold nothing; recoverable ones sit in the Recycle Bin (deleted on purpose).
# recovering ones are coming back and are waited for like pending ones.
LIVE_SNAPSHOT_STATES = frozenset({"pending", "completed", "recovering"})
# Instances whose agent may be about to attach a volume it created.
_STARTING_OR_RUNNING = frozenset({"pending", "running"})

RANK_CHECKPOINT = 0
RANK_UNSAVED_VOLUME = 1
RANK_FINAL = 2

WaitWhy = Literal["creating", "detaching", "held-by-gone-instance", "settling"]
RefuseWhy = Literal["attached-elsewhere", "created-by-running-instance"]


# --- observation and steps ----------------------------------------------------------------


@dataclass(frozen=True)
class Observed:
    """What this instance knows: itself, and the drive's volumes and snapshots as EC2 said.

    ``instances`` holds the instances named by the volumes' attachments and creator tags
    (``instances_to_describe``); an id missing from it is read as terminated.
    """

    instance_id: str
    availability_zone: str
    volumes: tuple[Volume, ...]
    snapshots: tuple[Snapshot, ...]
    instances: Mapping[str, InstanceInfo]


@dataclass(frozen=True)
class UseVolume:
    """Attach ``volume`` here if needed, tag it ``generation`` before mounting, mount it."""

    volume: Volume
    generation: int
    reason: str
    cleanup: tuple[str, ...] = ()

    @property
    def retag(self) -> bool:
        return self.generation != self.volume.generation


@dataclass(frozen=True)
class RestoreSnapshot:
    """Create a volume from the completed ``snapshot`` in this AZ."""

    snapshot: Snapshot
    reason: str
    cleanup: tuple[str, ...] = ()

    @property
    def generation(self) -> int:
        return self.snapshot.generation + 1


@dataclass(frozen=True)
class WaitForSnapshot:
    """The newest state is this snapshot, still being made: wait, never skip it."""

    snapshot: Snapshot
    reason: str
    cleanup: tuple[str, ...] = ()


@dataclass(frozen=True)
class MigrateVolume:
    """The newest state is this unsaved, detached volume in another AZ: save it (final)."""

    volume: Volume
    reason: str
    cleanup: tuple[str, ...] = ()


@dataclass(frozen=True)
class WaitForVolume:
    """The newest state is this volume, not usable yet; EC2 will move it on by itself."""

    volume: Volume
    why: WaitWhy
    reason: str
    cleanup: tuple[str, ...] = ()


@dataclass(frozen=True)
class Refuse:
    """Another live instance has, or is about to take, the drive: one writer per drive."""

    volume: Volume
    instance: InstanceInfo
    why: RefuseWhy
    reason: str
    cleanup: tuple[str, ...] = ()  # always empty: the drive's holder does the housekeeping


@dataclass(frozen=True)
class CreateEmpty:
    """The drive has no state at all: a new empty volume, formatted once."""

    reason: str
    cleanup: tuple[str, ...] = ()
    generation: int = 1


Step = Union[
    UseVolume, RestoreSnapshot, WaitForSnapshot, MigrateVolume, WaitForVolume, Refuse, CreateEmpty
]


# --- states -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DriveState:
    """One content of the drive: a volume, a snapshot, or a volume with its own finals.

    ``volume`` is the volume holding the content if one is still usable; ``snapshot`` is the
    newest snapshot holding it, if any.
    """

    generation: int
    rank: int
    time: datetime
    tiebreak_id: str
    volume: Optional[Volume]
    snapshot: Optional[Snapshot]

    @property
    def key(self) -> tuple[int, int, float, tuple[int, ...]]:
        """Sort key, newest last. Among unsaved volumes of one generation the *first*
        created ranks highest: they are siblings restored from one state by instances that
        raced for the drive, and the first claim wins. Every agent ranks them alike, so
        exactly one uses its volume and the others refuse (one writer per drive); the first
        is also the one that was written if a loser's copy was left behind."""
        ts = self.time.timestamp()
        ident = tuple(ord(c) for c in self.tiebreak_id)
        if self.rank == RANK_UNSAVED_VOLUME:
            return (self.generation, self.rank, -ts, tuple(-c for c in ident))
        return (self.generation, self.rank, ts, ident)


def usable_volumes(volumes: Iterable[Volume]) -> tuple[Volume, ...]:
    return tuple(v for v in volumes if v.state in USABLE_VOLUME_STATES)


def live_snapshots(snapshots: Iterable[Snapshot]) -> tuple[Snapshot, ...]:
    return tuple(s for s in snapshots if s.state in LIVE_SNAPSHOT_STATES)


def _snapshot_key(s: Snapshot) -> tuple[int, int, datetime, str]:
    rank = RANK_FINAL if s.kind == "final" else RANK_CHECKPOINT
    return (s.generation, rank, s.start_time, s.id)


def own_finals(volume: Volume, snapshots: Iterable[Snapshot]) -> tuple[Snapshot, ...]:
    """Live final snapshots taken from ``volume`` at its current generation, oldest first."""
    found = [
        s
        for s in live_snapshots(snapshots)
        if s.kind == "final" and s.source_volume == volume.id and s.generation == volume.generation
    ]
    return tuple(sorted(found, key=_snapshot_key))


def is_saved(volume: Volume, snapshots: Iterable[Snapshot]) -> bool:
    """A completed final snapshot of the volume's generation, taken from it, exists."""
    return any(s.state == "completed" for s in own_finals(volume, snapshots))


def generation_to_write(volume: Volume, snapshots: Iterable[Snapshot]) -> int:
    """The generation ``volume`` must carry before it is mounted for writing.

    If a final snapshot (in any state but error: a pending one completes later, a Recycle
    Bin one can come back) holds the volume's current generation, writing under that number
    would make the volume look saved while it is not: the volume moves on to one more.
    """
    held = [
        s.generation
        for s in snapshots
        if s.state != "error"
        and s.kind == "final"
        and s.source_volume == volume.id
        and s.generation >= volume.generation
    ]
    return max([volume.generation, 1] + [g + 1 for g in held])


def drive_states(
    volumes: Iterable[Volume], snapshots: Iterable[Snapshot]
) -> tuple[DriveState, ...]:
    """Every state of the drive, oldest first (deterministic: ties end on the id)."""
    snaps = live_snapshots(snapshots)
    states: list[DriveState] = []
    merged: set[str] = set()
    for v in usable_volumes(volumes):
        finals = own_finals(v, snaps)
        if finals:
            newest = finals[-1]
            merged.update(s.id for s in finals)
            states.append(
                DriveState(v.generation, RANK_FINAL, newest.start_time, newest.id, v, newest)
            )
        else:
            states.append(
                DriveState(v.generation, RANK_UNSAVED_VOLUME, v.create_time, v.id, v, None)
            )
    for s in snaps:
        if s.id not in merged:
            states.append(DriveState(*_snapshot_key(s), volume=None, snapshot=s))
    return tuple(sorted(states, key=lambda st: st.key))


def newest_state(volumes: Iterable[Volume], snapshots: Iterable[Snapshot]) -> Optional[DriveState]:
    states = drive_states(volumes, snapshots)
    return states[-1] if states else None


def instances_to_describe(volumes: Iterable[Volume]) -> tuple[str, ...]:
    """Instance ids ``Observed.instances`` must cover: attachment holders and creators."""
    ids: set[str] = set()
    for v in volumes:
        ids.update(a.instance_id for a in v.attachments)
        if v.created_by:
            ids.add(v.created_by)
    return tuple(sorted(ids))


def cleanup_candidates(
    volumes: Iterable[Volume], snapshots: Iterable[Snapshot], keep: Optional[str] = None
) -> tuple[str, ...]:
    """Volumes safe to delete: detached and saved (their content is in a completed final)."""
    snaps = tuple(snapshots)
    return tuple(
        sorted(
            v.id
            for v in volumes
            if v.id != keep
            and v.state == "available"
            and v.attachment is None
            and is_saved(v, snaps)
        )
    )


# --- the decision -------------------------------------------------------------------------


def decide(observed: Observed) -> Step:
    """The one next step toward a mounted drive holding its newest state."""
    drives = {v.drive for v in observed.volumes} | {s.drive for s in observed.snapshots}
    if len(drives) > 1:
        raise ValueError(
            f"several drives' volumes and snapshots were mixed: {sorted(map(str, drives))}"
        )
    newest = newest_state(observed.volumes, observed.snapshots)
    if newest is None:
        return CreateEmpty(
            reason="the drive has no state yet: creating an empty volume"
            + _ignored(observed, min_generation=0)
        )
    if newest.volume is not None:
        step = _decide_for_volume(observed, newest, newest.volume)
    else:
        assert newest.snapshot is not None
        step = _decide_for_snapshot(newest.snapshot, observed)
    if isinstance(step, Refuse):
        return step
    in_use = step.volume.id if isinstance(step, (UseVolume, MigrateVolume, WaitForVolume)) else None
    cleanup = cleanup_candidates(observed.volumes, observed.snapshots, keep=in_use)
    return replace(
        step, reason=step.reason + _ignored(observed, newest.generation), cleanup=cleanup
    )


def _decide_for_snapshot(snapshot: Snapshot, observed: Observed) -> Step:
    where = f"restoring it in {observed.availability_zone}"
    if snapshot.state == "completed":
        return RestoreSnapshot(snapshot, reason=f"newest state is {_snap(snapshot)}: {where}")
    return WaitForSnapshot(
        snapshot,
        reason=f"newest state is {_snap(snapshot)}, not complete yet: waiting, then {where}",
    )


def _decide_for_volume(observed: Observed, newest: DriveState, v: Volume) -> Step:
    here = v.availability_zone == observed.availability_zone
    desc = _vol(v, newest)
    if v.state == "creating":
        return WaitForVolume(v, "creating", reason=f"newest state is {desc}, still being created")
    attachment = v.attachment
    if attachment is not None:
        if attachment.instance_id == observed.instance_id:
            if attachment.state == "detaching":
                return WaitForVolume(
                    v, "detaching", reason=f"newest state is {desc}, detaching from this instance"
                )
            return _use(v, observed, f"newest state is {desc}, already attached to this instance")
        holder = observed.instances.get(attachment.instance_id) or forgotten_instance(
            attachment.instance_id
        )
        on = f"{holder.id} ({holder.state})"
        if holder.is_live:
            if attachment.state == "detaching":
                return WaitForVolume(
                    v, "detaching", reason=f"newest state is {desc}, detaching from {on}"
                )
            return Refuse(
                v,
                holder,
                "attached-elsewhere",
                reason=f"newest state is {desc}, attached to {on}: one writer per drive; "
                f"stop using the drive there (or terminate {holder.id}) first",
            )
        if here or newest.snapshot is None:
            return WaitForVolume(
                v,
                "held-by-gone-instance",
                reason=f"newest state is {desc}, still attached to {on}; EC2 frees it soon",
            )
        # Saved (or being saved) in another AZ: its snapshot is all we need from it.
        return _decide_for_snapshot(newest.snapshot, observed)
    if v.state != "available":
        return WaitForVolume(
            v, "settling", reason=f"newest state is {desc}, {v.state} but not attached"
        )
    if here:
        return _use(v, observed, f"newest state is {desc}, in this AZ: attaching it here")
    if newest.snapshot is not None:
        return _decide_for_snapshot(newest.snapshot, observed)
    creator = observed.instances.get(v.created_by) if v.created_by else None
    if creator and creator.id != observed.instance_id and creator.state in _STARTING_OR_RUNNING:
        return Refuse(
            v,
            creator,
            "created-by-running-instance",
            reason=f"newest state is {desc}, created by {creator.id} ({creator.state}), "
            "which may be about to attach it: one writer per drive; "
            f"terminate {creator.id} if it no longer uses the drive",
        )
    return MigrateVolume(
        v,
        reason=f"newest state is {desc}, unsaved in {v.availability_zone}: saving it (final) "
        f"to restore it in {observed.availability_zone}",
    )


def rival_writer(observed: Observed, v: Volume) -> Optional[Refuse]:
    """Before this instance first mounts ``v``: an unsaved volume of the drive, at least as
    new, held by another live instance means someone may be writing the drive now.

    The ordering makes racing agents agree when they look after every copy exists; this
    covers copies that appear after the other agent looked (EC2's creation times have one
    second of resolution in places, and its views can lag). Not for a drive this agent
    has already mounted: the established writer keeps it.
    """
    for w in usable_volumes(observed.volumes):
        holder_id = w.attached_instance
        if w.id == v.id or holder_id is None or holder_id == observed.instance_id:
            continue
        holder = observed.instances.get(holder_id) or forgotten_instance(holder_id)
        if holder.is_live and w.generation >= v.generation and not is_saved(w, observed.snapshots):
            return Refuse(
                w,
                holder,
                "attached-elsewhere",
                reason=f"{w.id} (generation {w.generation}, unsaved) of this drive is attached "
                f"to {holder.id} ({holder.state}): one writer per drive; stop using the drive "
                f"there (or terminate {holder.id}) first",
            )
    return None


def _use(v: Volume, observed: Observed, reason: str) -> UseVolume:
    generation = generation_to_write(v, observed.snapshots)
    if generation != v.generation:
        reason += f"; it will be written as generation {generation}"
    return UseVolume(v, generation, reason=reason)


# --- words for logs and `systemctl status` ------------------------------------------------


def _snap(s: Snapshot) -> str:
    progress = f" {s.progress}%" if s.state != "completed" else ""
    return (
        f"{s.id} (generation {s.generation}, {s.kind}, {s.state}{progress}, of {s.source_volume})"
    )


def _vol(v: Volume, state: DriveState) -> str:
    if state.snapshot is None:
        saved = "unsaved"
    elif state.snapshot.state == "completed":
        saved = f"saved by {state.snapshot.id}"
    else:
        saved = f"being saved by {state.snapshot.id} ({state.snapshot.state})"
    return f"{v.id} (generation {v.generation}, {saved}, {v.availability_zone})"


def _ignored(observed: Observed, min_generation: int) -> str:
    """Unusable volumes and snapshots that might have mattered, so the log tells of them."""
    items = [
        f"{v.id} {v.state}"
        for v in observed.volumes
        if v.state not in USABLE_VOLUME_STATES and v.generation >= min_generation
    ] + [
        f"{s.id} {s.state}"
        for s in observed.snapshots
        if s.state not in LIVE_SNAPSHOT_STATES and s.generation >= min_generation
    ]
    return f" (ignored: {', '.join(sorted(items))})" if items else ""
