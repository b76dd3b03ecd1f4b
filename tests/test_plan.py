"""The boot decision (agent/plan.py): a table of drive states, then random drive states.

Each table row is one situation an agent can boot into; the expected step names the rule
that protects the data. Times are minutes after T0; "here" is this instance's AZ.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from datetime import datetime, timedelta, timezone
from typing import Any, Optional

import pytest

from xdrive import tags
from xdrive.agent.plan import (
    CreateEmpty,
    MigrateVolume,
    Observed,
    Refuse,
    RestoreSnapshot,
    Step,
    UseVolume,
    WaitForSnapshot,
    WaitForVolume,
    cleanup_candidates,
    decide,
    drive_states,
    generation_to_write,
    instances_to_describe,
    is_saved,
    newest_state,
)
from xdrive.ec2 import Attachment, InstanceInfo, Snapshot, Volume

T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)
ME = "i-me"
HERE = "us-east-1a"
THERE = "us-east-1b"
DRIVE = "work"


def vol(
    vid: str,
    gen: int,
    az: str = HERE,
    state: str = "available",
    on: Optional[str] = None,
    att: str = "attached",
    t: int = 0,
    creator: Optional[str] = None,
) -> Volume:
    """A drive volume; ``on`` attaches it to that instance (state ``att``)."""
    vtags = {tags.NAME: DRIVE, tags.GENERATION: str(gen)}
    if creator:
        vtags[tags.INSTANCE] = creator
    if on and state == "available":
        state = "in-use"
    return Volume(
        id=vid,
        availability_zone=az,
        size_gib=10,
        state=state,
        encrypted=True,
        volume_type="gp3",
        create_time=T0 + timedelta(minutes=t),
        attachments=(Attachment(on, att, "/dev/sdf"),) if on else (),
        tags=vtags,
    )


def snap(
    sid: str,
    gen: Optional[int],
    src: str,
    kind: Optional[str] = "final",
    state: str = "completed",
    t: int = 0,
) -> Snapshot:
    """A drive snapshot of ``src``; ``kind``/``gen`` None leave the tag out."""
    stags = {tags.NAME: DRIVE, tags.SOURCE_VOLUME: src}
    if gen is not None:
        stags[tags.GENERATION] = str(gen)
    if kind is not None:
        stags[tags.KIND] = kind
    return Snapshot(
        id=sid,
        volume_id=src,
        state=state,
        progress=100 if state == "completed" else 40,
        start_time=T0 + timedelta(minutes=t),
        volume_size_gib=10,
        tags=stags,
    )


def inst(iid: str, state: str) -> InstanceInfo:
    return InstanceInfo(iid, state, HERE, "t3.micro", "spot")


@dataclass(frozen=True)
class Case:
    volumes: tuple[Volume, ...] = ()
    snapshots: tuple[Snapshot, ...] = ()
    instances: tuple[InstanceInfo, ...] = ()
    step: type[Any] = CreateEmpty
    target: Optional[str] = None  # id of the step's volume or snapshot
    cleanup: tuple[str, ...] = ()
    generation: Optional[int] = None  # UseVolume: generation to write
    why: Optional[str] = None  # WaitForVolume / Refuse


def observed(case: Case) -> Observed:
    return Observed(
        instance_id=ME,
        availability_zone=HERE,
        volumes=case.volumes,
        snapshots=case.snapshots,
        instances={i.id: i for i in case.instances},
    )


def target_of(step: Step) -> Optional[str]:
    if isinstance(step, (UseVolume, MigrateVolume, WaitForVolume, Refuse)):
        return step.volume.id
    if isinstance(step, (RestoreSnapshot, WaitForSnapshot)):
        return step.snapshot.id
    return None


CASES: dict[str, Case] = {
    # --- nothing, or only snapshots ---
    "no state at all: create an empty volume": Case(step=CreateEmpty),
    "only an error snapshot: nothing to restore": Case(
        snapshots=(snap("snap-e", 1, "vol-gone", state="error"),), step=CreateEmpty
    ),
    "one completed final: restore it": Case(
        snapshots=(snap("snap-1", 1, "vol-gone"),), step=RestoreSnapshot, target="snap-1"
    ),
    "newer pending final is waited for, not skipped for the older completed one": Case(
        snapshots=(
            snap("snap-1", 1, "vol-old"),
            snap("snap-2", 2, "vol-gone", state="pending", t=5),
        ),
        step=WaitForSnapshot,
        target="snap-2",
    ),
    "newer pending checkpoint (its volume gone) is waited for": Case(
        snapshots=(
            snap("snap-1", 2, "vol-gone", t=1),
            snap("snap-2", 2, "vol-gone", kind="checkpoint", state="pending", t=0),
            snap("snap-3", 3, "vol-gone2", kind="checkpoint", state="pending", t=9),
        ),
        step=WaitForSnapshot,
        target="snap-3",
    ),
    "checkpoint newer in generation than every final (volume gone): restore it": Case(
        snapshots=(
            snap("snap-f", 4, "vol-a", t=0),
            snap("snap-c", 5, "vol-gone", kind="checkpoint", t=3),
        ),
        step=RestoreSnapshot,
        target="snap-c",
    ),
    "an error snapshot is never chosen, even the newest": Case(
        snapshots=(
            snap("snap-1", 1, "vol-a"),
            snap("snap-e", 2, "vol-gone", state="error", t=9),
        ),
        step=RestoreSnapshot,
        target="snap-1",
    ),
    "a Recycle Bin (recoverable) snapshot is not a state": Case(
        snapshots=(
            snap("snap-1", 1, "vol-a"),
            snap("snap-r", 2, "vol-gone", state="recoverable", t=9),
        ),
        step=RestoreSnapshot,
        target="snap-1",
    ),
    "a recovering snapshot is waited for like a pending one": Case(
        snapshots=(
            snap("snap-1", 1, "vol-a"),
            snap("snap-r", 2, "vol-gone", state="recovering", t=9),
        ),
        step=WaitForSnapshot,
        target="snap-r",
    ),
    "final beats a later checkpoint of the same generation": Case(
        snapshots=(
            snap("snap-f", 3, "vol-gone", t=0),
            snap("snap-c", 3, "vol-gone", kind="checkpoint", t=9),
        ),
        step=RestoreSnapshot,
        target="snap-f",
    ),
    "a snapshot without kind tag counts as a checkpoint": Case(
        snapshots=(
            snap("snap-f", 3, "vol-gone", t=0),
            snap("snap-x", 3, "vol-gone", kind=None, t=9),
        ),
        step=RestoreSnapshot,
        target="snap-f",
    ),
    "a snapshot without generation tag is the oldest": Case(
        snapshots=(
            snap("snap-1", 1, "vol-gone", t=0),
            snap("snap-x", None, "vol-gone", t=9),
        ),
        step=RestoreSnapshot,
        target="snap-1",
    ),
    "same generation and kind: the later one": Case(
        snapshots=(snap("snap-b", 3, "vol-b", t=9), snap("snap-a", 3, "vol-a", t=1)),
        step=RestoreSnapshot,
        target="snap-b",
    ),
    "full tie: the higher id, deterministically": Case(
        snapshots=(snap("snap-a", 3, "vol-a", t=1), snap("snap-b", 3, "vol-b", t=1)),
        step=RestoreSnapshot,
        target="snap-b",
    ),
    # --- unsaved volumes ---
    "unsaved volume here: attach it": Case(
        volumes=(vol("vol-1", 2),),
        snapshots=(snap("snap-1", 1, "vol-0"),),
        step=UseVolume,
        target="vol-1",
        generation=2,
    ),
    "unsaved volume elsewhere is newer than its own completed checkpoint: migrate": Case(
        volumes=(vol("vol-1", 2, az=THERE),),
        snapshots=(
            snap("snap-1", 1, "vol-0"),
            snap("snap-c", 2, "vol-1", kind="checkpoint", t=30),
        ),
        step=MigrateVolume,
        target="vol-1",
    ),
    "unsaved volume here is newer than its own checkpoint: use it, same generation": Case(
        volumes=(vol("vol-1", 2),),
        snapshots=(snap("snap-c", 2, "vol-1", kind="checkpoint", t=30),),
        step=UseVolume,
        target="vol-1",
        generation=2,
    ),
    "two unsaved volumes of different generations: the newer; the older is never cleaned": Case(
        volumes=(vol("vol-old", 3, t=0), vol("vol-new", 4, t=10)),
        step=UseVolume,
        target="vol-new",
        generation=4,
    ),
    "two unsaved volumes, the newer one elsewhere: migrate it, not use the older one here": Case(
        volumes=(vol("vol-old", 3, t=20), vol("vol-new", 4, az=THERE, t=10)),
        step=MigrateVolume,
        target="vol-new",
    ),
    "duplicate unsaved volumes of one generation: the first created, deterministically": Case(
        volumes=(vol("vol-a", 4, t=1), vol("vol-b", 4, az=THERE, t=2)),
        step=UseVolume,
        target="vol-a",
    ),
    "race: a sibling created first is held elsewhere: refuse, even with ours attached": Case(
        volumes=(
            vol("vol-theirs", 4, t=1, on="i-rival"),
            vol("vol-ours", 4, t=2, on=ME),
        ),
        instances=(inst("i-rival", "running"),),
        step=Refuse,
        target="vol-theirs",
    ),
    "race: ours was created first: use it; the later sibling elsewhere refuses itself": Case(
        volumes=(
            vol("vol-ours", 4, t=1, on=ME),
            vol("vol-theirs", 4, t=2, on="i-rival"),
        ),
        instances=(inst("i-rival", "running"),),
        step=UseVolume,
        target="vol-ours",
    ),
    "unsaved sibling does not outrank a final of its generation from another volume": Case(
        volumes=(vol("vol-orphan", 6, t=0),),
        snapshots=(snap("snap-6", 6, "vol-used", t=60),),
        step=RestoreSnapshot,
        target="snap-6",
    ),
    "unsaved volume whose only final failed: still unsaved, migrate again": Case(
        volumes=(vol("vol-1", 2, az=THERE),),
        snapshots=(snap("snap-e", 2, "vol-1", state="error", t=5),),
        step=MigrateVolume,
        target="vol-1",
    ),
    "volume bumped after its save: the older final does not save it": Case(
        volumes=(vol("vol-1", 6, az=THERE),),
        snapshots=(snap("snap-5", 5, "vol-1", t=5),),
        step=MigrateVolume,
        target="vol-1",
    ),
    # --- saved volumes: reattach here, restore elsewhere ---
    "saved volume here: reattach it (no lazy loading), write as the next generation": Case(
        volumes=(vol("vol-1", 5),),
        snapshots=(snap("snap-5", 5, "vol-1", t=5),),
        step=UseVolume,
        target="vol-1",
        generation=6,
    ),
    "volume here whose final is still pending: use it, but never under the saved number": Case(
        volumes=(vol("vol-1", 5),),
        snapshots=(snap("snap-5", 5, "vol-1", state="pending", t=5),),
        step=UseVolume,
        target="vol-1",
        generation=6,
    ),
    "volume here whose final sits in the Recycle Bin: still write as the next generation": Case(
        volumes=(vol("vol-1", 5),),
        snapshots=(snap("snap-5", 5, "vol-1", state="recoverable", t=5),),
        step=UseVolume,
        target="vol-1",
        generation=6,
    ),
    "saved volume elsewhere: restore its final, delete it": Case(
        volumes=(vol("vol-1", 5, az=THERE),),
        snapshots=(snap("snap-5", 5, "vol-1", t=5),),
        step=RestoreSnapshot,
        target="snap-5",
        cleanup=("vol-1",),
    ),
    "volume elsewhere with a pending final: wait for it, keep the volume": Case(
        volumes=(vol("vol-1", 5, az=THERE),),
        snapshots=(snap("snap-5", 5, "vol-1", state="pending", t=5),),
        step=WaitForSnapshot,
        target="snap-5",
    ),
    "saved volume elsewhere, still on a terminated instance: restore, no cleanup yet": Case(
        volumes=(vol("vol-1", 5, az=THERE, on="i-dead"),),
        snapshots=(snap("snap-5", 5, "vol-1", t=5),),
        instances=(inst("i-dead", "terminated"),),
        step=RestoreSnapshot,
        target="snap-5",
    ),
    "saved volume here on a terminated instance: wait to reattach it": Case(
        volumes=(vol("vol-1", 5, on="i-dead"),),
        snapshots=(snap("snap-5", 5, "vol-1", t=5),),
        instances=(inst("i-dead", "shutting-down"),),
        step=WaitForVolume,
        target="vol-1",
        why="held-by-gone-instance",
    ),
    "older saved volume here, newer unsaved here: use the newer, clean the older": Case(
        volumes=(vol("vol-old", 3, t=0), vol("vol-new", 4, t=10)),
        snapshots=(snap("snap-3", 3, "vol-old", t=5),),
        step=UseVolume,
        target="vol-new",
        generation=4,
        cleanup=("vol-old",),
    ),
    "several leftovers: every saved detached volume is cleaned, unsaved ones kept": Case(
        volumes=(
            vol("vol-a", 2, az=THERE, t=0),
            vol("vol-b", 3, t=10),
            vol("vol-c", 1, az=THERE, t=0),
            vol("vol-u", 1, az=THERE, t=0),
        ),
        snapshots=(
            snap("snap-a", 2, "vol-a", t=5),
            snap("snap-b", 3, "vol-b", t=15),
            snap("snap-c", 1, "vol-c", t=5),
            snap("snap-d", 4, "vol-gone", t=50),
        ),
        step=RestoreSnapshot,
        target="snap-d",
        cleanup=("vol-a", "vol-b", "vol-c"),
    ),
    # --- migrations ---
    "migration: snapshot requested, pending: wait for it": Case(
        volumes=(vol("vol-1", 3, az=THERE),),
        snapshots=(snap("snap-m", 3, "vol-1", state="pending", t=9),),
        step=WaitForSnapshot,
        target="snap-m",
    ),
    "migration: snapshot completed: restore, and the old volume may go": Case(
        volumes=(vol("vol-1", 3, az=THERE),),
        snapshots=(snap("snap-m", 3, "vol-1", t=9),),
        step=RestoreSnapshot,
        target="snap-m",
        cleanup=("vol-1",),
    ),
    "migration interrupted while restoring: wait for the new volume, no second restore": Case(
        volumes=(vol("vol-1", 3, az=THERE), vol("vol-2", 4, state="creating", t=20)),
        snapshots=(snap("snap-m", 3, "vol-1", t=9),),
        step=WaitForVolume,
        target="vol-2",
        why="creating",
        cleanup=("vol-1",),
    ),
    "migration interrupted after the restore, before the delete": Case(
        volumes=(vol("vol-1", 3, az=THERE), vol("vol-2", 4, t=20)),
        snapshots=(snap("snap-m", 3, "vol-1", t=9),),
        step=UseVolume,
        target="vol-2",
        generation=4,
        cleanup=("vol-1",),
    ),
    # --- attachments: one writer ---
    "attached to this instance: use it (idempotent restart)": Case(
        volumes=(vol("vol-1", 4, on=ME), vol("vol-0", 3, t=-10)),
        snapshots=(snap("snap-3", 3, "vol-0", t=-5),),
        step=UseVolume,
        target="vol-1",
        generation=4,
        cleanup=("vol-0",),
    ),
    "still attaching to this instance: use it": Case(
        volumes=(vol("vol-1", 4, on=ME, att="attaching"),),
        step=UseVolume,
        target="vol-1",
        generation=4,
    ),
    "attached here after a save whose detach failed: write as the next generation": Case(
        volumes=(vol("vol-1", 4, on=ME),),
        snapshots=(snap("snap-4", 4, "vol-1", t=5),),
        step=UseVolume,
        target="vol-1",
        generation=5,
    ),
    "detaching from this instance: wait": Case(
        volumes=(vol("vol-1", 4, on=ME, att="detaching"),),
        step=WaitForVolume,
        target="vol-1",
        why="detaching",
    ),
    "newest attached to a running instance: refuse": Case(
        volumes=(vol("vol-1", 4, on="i-other"), vol("vol-0", 3, t=-10)),
        snapshots=(snap("snap-3", 3, "vol-0", t=-5),),
        instances=(inst("i-other", "running"),),
        step=Refuse,
        target="vol-1",
        why="attached-elsewhere",
    ),
    "newest attached to a running instance in another AZ: refuse, never restore older": Case(
        volumes=(vol("vol-1", 4, az=THERE, on="i-other"),),
        snapshots=(snap("snap-3", 3, "vol-0", t=-5),),
        instances=(inst("i-other", "running"),),
        step=Refuse,
        target="vol-1",
        why="attached-elsewhere",
    ),
    "saved newest attached to a running instance: refuse (it may write again)": Case(
        volumes=(vol("vol-1", 4, az=THERE, on="i-other"),),
        snapshots=(snap("snap-4", 4, "vol-1", t=5),),
        instances=(inst("i-other", "running"),),
        step=Refuse,
        target="vol-1",
        why="attached-elsewhere",
    ),
    "newest detaching from a running instance: wait": Case(
        volumes=(vol("vol-1", 4, on="i-other", att="detaching"),),
        instances=(inst("i-other", "running"),),
        step=WaitForVolume,
        target="vol-1",
        why="detaching",
    ),
    "newest on a terminated instance: wait for EC2 to free it": Case(
        volumes=(vol("vol-1", 4, az=THERE, on="i-dead"),),
        instances=(inst("i-dead", "terminated"),),
        step=WaitForVolume,
        target="vol-1",
        why="held-by-gone-instance",
    ),
    "newest on an instance EC2 forgot: read as terminated, wait": Case(
        volumes=(vol("vol-1", 4, on="i-forgotten"),),
        step=WaitForVolume,
        target="vol-1",
        why="held-by-gone-instance",
    ),
    "an older volume on a running instance does not block the newest": Case(
        volumes=(vol("vol-1", 4, t=10), vol("vol-0", 3, az=THERE, on="i-other")),
        snapshots=(snap("snap-3", 3, "vol-0", t=5),),
        instances=(inst("i-other", "running"),),
        step=UseVolume,
        target="vol-1",
        generation=4,
    ),
    "unsaved volume elsewhere created by a running instance: refuse, do not migrate it": Case(
        volumes=(vol("vol-1", 4, az=THERE, creator="i-other"),),
        instances=(inst("i-other", "running"),),
        step=Refuse,
        target="vol-1",
        why="created-by-running-instance",
    ),
    "unsaved volume elsewhere created by a terminated instance: migrate": Case(
        volumes=(vol("vol-1", 4, az=THERE, creator="i-dead"),),
        instances=(inst("i-dead", "terminated"),),
        step=MigrateVolume,
        target="vol-1",
    ),
    "unsaved volume here created by a running instance: attach races are EC2's to settle": Case(
        volumes=(vol("vol-1", 4, creator="i-other"),),
        instances=(inst("i-other", "running"),),
        step=UseVolume,
        target="vol-1",
        generation=4,
    ),
    "refusing leaves the housekeeping to the holder: no cleanup": Case(
        volumes=(vol("vol-1", 4, on="i-other"), vol("vol-0", 3, t=-10)),
        snapshots=(snap("snap-3", 3, "vol-0", t=-5),),
        instances=(inst("i-other", "stopped"),),
        step=Refuse,
        target="vol-1",
        why="attached-elsewhere",
    ),
    # --- volumes that are no state ---
    "a creating volume is waited for": Case(
        volumes=(vol("vol-1", 2, state="creating"),),
        snapshots=(snap("snap-1", 1, "vol-0"),),
        step=WaitForVolume,
        target="vol-1",
        why="creating",
    ),
    "a deleting volume is no state (and not cleaned again): restore the final": Case(
        volumes=(vol("vol-d", 6, state="deleting", t=30),),
        snapshots=(snap("snap-5", 5, "vol-0"),),
        step=RestoreSnapshot,
        target="snap-5",
    ),
    "a volume in error is no state": Case(
        volumes=(vol("vol-e", 6, state="error", t=30),),
        snapshots=(snap("snap-5", 5, "vol-0"),),
        step=RestoreSnapshot,
        target="snap-5",
    ),
    "in-use without an attachment (EC2 in between): wait": Case(
        volumes=(vol("vol-1", 2, state="in-use"),),
        step=WaitForVolume,
        target="vol-1",
        why="settling",
    ),
}

for _state in ("pending", "stopping", "stopped"):
    CASES[f"newest attached to a {_state} instance: refuse"] = Case(
        volumes=(vol("vol-1", 4, on="i-other"),),
        instances=(inst("i-other", _state),),
        step=Refuse,
        target="vol-1",
        why="attached-elsewhere",
    )


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_decide(case: Case) -> None:
    step = decide(observed(case))
    assert isinstance(step, case.step), step.reason
    assert target_of(step) == case.target, step.reason
    assert step.cleanup == case.cleanup, step.reason
    if case.generation is not None:
        assert isinstance(step, UseVolume)
        assert step.generation == case.generation
    if case.why is not None:
        assert isinstance(step, (WaitForVolume, Refuse))
        assert step.why == case.why
    assert step.reason  # goes to the journal and `systemctl status`


def test_reason_names_the_ids_and_the_ignored() -> None:
    step = decide(
        observed(CASES["a deleting volume is no state (and not cleaned again): restore the final"])
    )
    assert "snap-5" in step.reason
    assert "vol-d deleting" in step.reason


def test_restore_and_create_carry_the_new_generation() -> None:
    restore = decide(
        observed(CASES["checkpoint newer in generation than every final (volume gone): restore it"])
    )
    assert isinstance(restore, RestoreSnapshot)
    assert restore.generation == 6
    empty = decide(observed(Case()))
    assert isinstance(empty, CreateEmpty)
    assert empty.generation == 1


def test_mixing_drives_is_refused() -> None:
    other = Volume("vol-x", HERE, 1, "available", True, "gp3", T0, tags={tags.NAME: "other"})
    with pytest.raises(ValueError):
        decide(Observed(ME, HERE, (vol("vol-1", 1), other), (), {}))


def test_helpers_for_the_save_path_and_the_launcher() -> None:
    v = vol("vol-1", 5, on="i-x", creator="i-c")
    done = snap("snap-5", 5, "vol-1")
    assert is_saved(v, [done])
    assert not is_saved(v, [snap("snap-5", 5, "vol-1", state="pending")])
    assert not is_saved(v, [snap("snap-5", 5, "vol-1", kind="checkpoint")])
    assert not is_saved(v, [snap("snap-4", 4, "vol-1")])
    assert not is_saved(v, [snap("snap-5", 5, "vol-other")])
    assert generation_to_write(v, [done]) == 6
    assert generation_to_write(v, [snap("snap-5", 5, "vol-1", state="error")]) == 5
    assert generation_to_write(vol("vol-0", 0), []) == 1
    assert instances_to_describe([v, vol("vol-2", 1)]) == ("i-c", "i-x")
    # attached volumes are never offered for deletion, even saved; nor one that EC2 shows
    # available while an attachment is already under way (a read between two updates)
    assert cleanup_candidates([v], [done]) == ()
    racing = replace(
        v, state="available", attachments=(Attachment("i-x", "attaching", "/dev/sdf"),)
    )
    assert cleanup_candidates([racing], [done]) == ()
    assert cleanup_candidates([replace(racing, attachments=())], [done]) == ("vol-1",)
    newest = newest_state([v], [done, snap("snap-4", 4, "vol-1", t=-5)])
    assert newest is not None and newest.volume == v and newest.snapshot == done
    assert [s.tiebreak_id for s in drive_states([v], [done, snap("snap-4", 4, "vol-1")])] == [
        "snap-4",
        "snap-5",
    ]
    assert newest_state([], []) is None


# --- random drive states ----------------------------------------------------------------

OTHERS = ("i-a", "i-b", "i-c", "i-d")
INSTANCE_STATES = ("pending", "running", "shutting-down", "terminated", "stopping", "stopped")
VOLUME_STATES = ("creating", "available", "available", "in-use", "deleting", "error")
ATTACH_STATES = ("attaching", "attached", "attached", "detaching", "busy")
SNAPSHOT_STATES = ("pending", "completed", "completed", "error", "recoverable", "recovering")
LIVE_SNAPSHOT = {"pending", "completed", "recovering"}
USABLE_VOLUME = {"creating", "available", "in-use"}
LIVE_INSTANCE = {"pending", "running", "stopping", "stopped"}


def random_drive(rng: random.Random) -> Observed:
    instances = {
        i: inst(i, rng.choice(INSTANCE_STATES)) for i in OTHERS if rng.random() < 0.8
    }  # the rest: forgotten by EC2
    volumes = []
    for k in range(rng.randint(0, 4)):
        state = rng.choice(VOLUME_STATES)
        on = None
        if state == "in-use" and rng.random() < 0.9:
            on = rng.choice((ME, *OTHERS))
        az = HERE if on == ME else rng.choice((HERE, THERE))
        creator = rng.choice((None, ME, *OTHERS))
        volumes.append(
            vol(
                f"vol-{k}",
                rng.randint(0, 4),
                az=az,
                state=state,
                on=on,
                att=rng.choice(ATTACH_STATES),
                t=rng.randint(0, 5),
                creator=creator,
            )
        )
    snapshots = []
    for k in range(rng.randint(0, 6)):
        src = rng.choice([v.id for v in volumes] + ["vol-gone"])
        source = next((v for v in volumes if v.id == src), None)
        # Often at the source's generation: that is what makes volumes saved.
        gen = source.generation if source and rng.random() < 0.6 else rng.randint(0, 4)
        snapshots.append(
            snap(
                f"snap-{k}",
                None if rng.random() < 0.05 else gen,
                src,
                kind=rng.choice(("final", "final", "checkpoint", None)),
                state=rng.choice(SNAPSHOT_STATES),
                t=rng.randint(0, 5),  # coarse on purpose: many time ties
            )
        )
    return Observed(ME, HERE, tuple(volumes), tuple(snapshots), instances)


def own_live_final(v: Volume, snapshots: tuple[Snapshot, ...], states: set[str]) -> bool:
    return any(
        s.state in states
        and s.tags.get(tags.KIND) == "final"
        and s.source_volume == v.id
        and s.generation == v.generation
        for s in snapshots
    )


def order(obs: Observed) -> dict[str, tuple[int, int]]:
    """(generation, rank) of every state, computed from the rule's words, not plan's code."""
    ranks: dict[str, tuple[int, int]] = {}
    for v in obs.volumes:
        if v.state in USABLE_VOLUME:
            saved_or_saving = own_live_final(v, obs.snapshots, LIVE_SNAPSHOT)
            ranks[v.id] = (v.generation, 2 if saved_or_saving else 1)
    for s in obs.snapshots:
        if s.state in LIVE_SNAPSHOT:
            ranks[s.id] = (s.generation, 2 if s.tags.get(tags.KIND) == "final" else 0)
    return ranks


def holder(v: Volume, obs: Observed) -> Optional[InstanceInfo]:
    for a in v.attachments:
        if a.state in ("attaching", "attached", "busy") and a.instance_id != ME:
            info = obs.instances.get(a.instance_id)
            return info if info and info.state in LIVE_INSTANCE else None
    return None


def check_invariants(obs: Observed, step: Step) -> None:
    ranks = order(obs)
    by_id = {v.id: v for v in obs.volumes}
    chosen = target_of(step)

    # 1. never older than an existing state
    if isinstance(step, CreateEmpty):
        assert not ranks, "created an empty volume although the drive has a state"
    else:
        assert chosen is not None
        assert all(ranks[chosen] >= r for r in ranks.values()), (chosen, ranks)

    # 2. cleanup: only saved, detached volumes, never the one in use, never when refusing
    for vid in step.cleanup:
        v = by_id[vid]
        assert v.state == "available" and not [a for a in v.attachments if a.state != "detached"]
        assert own_live_final(v, obs.snapshots, {"completed"}), f"{vid} is not saved"
        assert vid != chosen
    if isinstance(step, Refuse):
        assert step.cleanup == ()

    # 3. one writer: the newest volume held by another live instance means Refuse
    newest = newest_state(obs.volumes, obs.snapshots)
    if newest is not None and newest.volume is not None and holder(newest.volume, obs):
        assert isinstance(step, Refuse)
    if isinstance(step, Refuse):
        assert step.instance.state in LIVE_INSTANCE and step.instance.id != ME

    # 4. what each step may touch
    if isinstance(step, RestoreSnapshot):
        assert step.snapshot.state == "completed"
    if isinstance(step, WaitForSnapshot):
        assert step.snapshot.state in ("pending", "recovering")
    if isinstance(step, UseVolume):
        v = step.volume
        assert v.availability_zone == HERE
        assert v.state == "available" or (v.attachment and v.attachment.instance_id == ME)
        assert step.generation >= max(v.generation, 1)
        for s in obs.snapshots:
            if s.state != "error" and s.kind == "final" and s.source_volume == v.id:
                assert step.generation > s.generation, "would write under a saved number"
    if isinstance(step, MigrateVolume):
        v = step.volume
        assert v.state == "available" and v.attachment is None
        assert v.availability_zone != HERE
        assert not own_live_final(v, obs.snapshots, LIVE_SNAPSHOT)


def test_random_drive_states_keep_the_invariants() -> None:
    rng = random.Random(20240501)
    seen: set[type] = set()
    for _ in range(5000):
        obs = random_drive(rng)
        step = decide(obs)
        check_invariants(obs, step)
        seen.add(type(step))
        # the order of EC2's answers does not matter
        shuffled = Observed(
            obs.instance_id,
            obs.availability_zone,
            tuple(rng.sample(obs.volumes, len(obs.volumes))),
            tuple(rng.sample(obs.snapshots, len(obs.snapshots))),
            obs.instances,
        )
        assert decide(shuffled) == step
    # the generator reaches every kind of step, so the invariants were exercised on each
    assert seen == {
        UseVolume,
        RestoreSnapshot,
        WaitForSnapshot,
        MigrateVolume,
        WaitForVolume,
        Refuse,
        CreateEmpty,
    }


def test_rival_writer_refuses_a_first_mount_while_another_live_instance_holds_a_copy() -> None:
    """Copies that appear after the other agent looked: the one already in use keeps it."""
    from xdrive.agent.plan import rival_writer

    ours = vol("vol-ours", 4, t=2, on=ME)
    theirs = vol("vol-theirs", 4, t=2, on="i-rival")
    live = Observed(ME, HERE, (ours, theirs), (), {"i-rival": inst("i-rival", "running")})
    refused = rival_writer(live, ours)
    assert refused is not None and refused.volume.id == "vol-theirs"
    gone = Observed(ME, HERE, (ours, theirs), (), {"i-rival": inst("i-rival", "terminated")})
    assert rival_writer(gone, ours) is None
    older = vol("vol-theirs", 3, t=2, on="i-rival")
    assert rival_writer(Observed(ME, HERE, (ours, older), (), live.instances), ours) is None
