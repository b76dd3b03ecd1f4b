"""What the agent is doing now, on disk, so `xdrive-agent status` can tell a human or a script.

Written atomically after every step; never read back to make decisions (EC2 tags are the
truth about the drive, this file only describes this agent). The last save and the last
checkpoint are carried over from the previous run on the same instance, so they survive a
stop and start.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, Optional

Phase = Literal["starting", "restoring", "ready", "saving", "saved", "failed", "stopped"]


@dataclass(frozen=True)
class SaveRecord:
    """One snapshot the agent requested: a final save or a checkpoint."""

    snapshot_id: str
    volume_id: str
    generation: int
    kind: str  # final | checkpoint (a save that had to freeze instead of unmount is one)
    reason: str  # spot-interruption | spot-stop | shutdown | rebalance | periodic | ...
    requested_at: str  # ISO time the CreateSnapshot request was sent
    seconds_from_notice: Optional[float] = None  # from the moment the agent learned why
    seconds_to_deadline: Optional[float] = None  # left when requested (negative: late)
    detached: bool = False
    completed: bool = False  # the agent saw the snapshot completed
    volume_deleted: bool = False  # ... and then deleted the volume it holds

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> SaveRecord:
        known = {f.name for f in fields(SaveRecord)}
        return SaveRecord(**{k: v for k, v in raw.items() if k in known})


@dataclass(frozen=True)
class AgentStatus:
    drive: str
    phase: Phase = "starting"
    message: str = ""
    instance_id: Optional[str] = None
    availability_zone: Optional[str] = None
    volume_id: Optional[str] = None
    restored_from: Optional[str] = None  # snapshot id, or None for a reattached/new volume
    generation: Optional[int] = None
    device: Optional[str] = None
    mountpoint: Optional[str] = None
    docker_root: Optional[str] = None
    watching: tuple[str, ...] = ()
    last_save: Optional[SaveRecord] = None
    last_checkpoint: Optional[SaveRecord] = None
    updated_at: str = ""
    pid: Optional[int] = None
    extra: dict[str, Any] = field(default_factory=dict)

    def with_(self, **changes: Any) -> AgentStatus:
        return replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @staticmethod
    def from_json(text: str) -> AgentStatus:
        raw = json.loads(text)
        for key in ("last_save", "last_checkpoint"):
            if raw.get(key):
                raw[key] = SaveRecord.from_dict(raw[key])
        raw["watching"] = tuple(raw.get("watching") or ())
        # A file written by another version may carry keys this one does not know.
        known = {f.name for f in fields(AgentStatus)}
        return AgentStatus(**{k: v for k, v in raw.items() if k in known})


def status_path(state_dir: Path) -> Path:
    return state_dir / "status.json"


def read_status(state_dir: Path) -> Optional[AgentStatus]:
    try:
        return AgentStatus.from_json(status_path(state_dir).read_text())
    except FileNotFoundError:
        return None


def initial_status(state_dir: Path, drive: str) -> AgentStatus:
    """A fresh status for this run, keeping the previous run's last save and checkpoint
    of the same drive (a broken old file is ignored: it only describes the past)."""
    try:
        previous = read_status(state_dir)
    except (ValueError, TypeError, OSError):
        previous = None
    if previous is None or previous.drive != drive:
        return AgentStatus(drive=drive)
    return AgentStatus(
        drive=drive, last_save=previous.last_save, last_checkpoint=previous.last_checkpoint
    )
