"""Which snapshots `xdrive prune NAME --keep N` deletes. Pure.

Kept, whatever N says:
- the newest completed snapshot: the state to fall back to, even while a newer one is
  still pending or the newest state is on a volume;
- snapshots not finished (pending, recovering) or in the Recycle Bin (recoverable): one may
  be the newest state, and a save in progress is never cut short;
- the final snapshots that save a volume still there: the volume counts as saved (and the
  agent deletes it as such) only while its final snapshot exists, so that snapshot is the
  only copy the volume's cleanup relies on;
- the snapshot holding the drive's newest state, if any.
Then the N newest completed snapshots in the order of states (generation, final over
checkpoint, time, id). Everything older is deleted, and so are snapshots in ``error``,
which hold nothing.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from xdrive.agent.plan import newest_state, own_finals, usable_volumes
from xdrive.ec2 import Snapshot, Volume
from xdrive.errors import ConfigError
from xdrive.launcher.drives import snapshot_order


@dataclass(frozen=True)
class PruneDecision:
    snapshot: Snapshot
    delete: bool
    why: str


@dataclass(frozen=True)
class PrunePlan:
    drive: str
    keep: int
    decisions: tuple[PruneDecision, ...]  # oldest first

    @property
    def to_delete(self) -> tuple[Snapshot, ...]:
        return tuple(d.snapshot for d in self.decisions if d.delete)

    @property
    def to_keep(self) -> tuple[Snapshot, ...]:
        return tuple(d.snapshot for d in self.decisions if not d.delete)


def plan_prune(
    drive: str, volumes: Iterable[Volume], snapshots: Iterable[Snapshot], keep: int
) -> PrunePlan:
    if keep < 1:
        raise ConfigError(f"--keep {keep} would keep nothing", "keep at least 1 snapshot")
    vols = tuple(volumes)
    snaps = tuple(sorted(snapshots, key=snapshot_order))
    completed = [s for s in snaps if s.state == "completed"]
    newest_completed = completed[-1].id if completed else None
    kept_by_count = {s.id for s in completed[-keep:]}
    saves_volume = {s.id: v.id for v in usable_volumes(vols) for s in own_finals(v, snaps)}
    state = newest_state(vols, snaps)
    newest_snapshot = (
        state.snapshot.id if state is not None and state.snapshot is not None else None
    )
    decisions = []
    for s in snaps:
        if s.state in ("pending", "recovering"):
            decision = PruneDecision(s, False, f"{s.state}: never cut a save short")
        elif s.state == "recoverable":
            decision = PruneDecision(s, False, "in the Recycle Bin")
        elif s.id == newest_completed:
            decision = PruneDecision(s, False, "newest completed snapshot")
        elif s.id == newest_snapshot:
            decision = PruneDecision(s, False, "holds the newest state")
        elif s.id in saves_volume:
            decision = PruneDecision(s, False, f"saves volume {saves_volume[s.id]}, still there")
        elif s.id in kept_by_count:
            decision = PruneDecision(s, False, f"one of the {keep} newest completed")
        elif s.state == "error":
            decision = PruneDecision(s, True, "failed: holds nothing")
        else:
            decision = PruneDecision(s, True, f"older than the {keep} newest completed")
        decisions.append(decision)
    return PrunePlan(drive, keep, tuple(decisions))
