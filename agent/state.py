"""What the agent is doing now, on disk, so `xdrive-agent status` can tell a human or a script.

Written atomically after every step; never read back to make decisions (EC2 tags are the
truth about the drive, this file only describes this agent).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Optional

Phase = Literal["starting", "restoring", "ready", "saving", "saved", "failed", "stopped"]


@dataclass(frozen=True)
class SaveRecord:
    snapshot_id: str
    volume_id: str
    generation: int
    kind: str  # final | checkpoint
    reason: str
    requested_at: str
    seconds_from_notice: Optional[float] = None
    completed: bool = False


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
                raw[key] = SaveRecord(**raw[key])
        raw["watching"] = tuple(raw.get("watching") or ())
        return AgentStatus(**raw)


def status_path(state_dir: Path) -> Path:
    return state_dir / "status.json"


def read_status(state_dir: Path) -> Optional[AgentStatus]:
    try:
        return AgentStatus.from_json(status_path(state_dir).read_text())
    except FileNotFoundError:
        return None
