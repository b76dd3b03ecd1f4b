"""Helpers for the agent boot tests: read EC2 state, files, mounts and agent messages.

The boot tests assert what EC2, the kernel and the files say, not only what the agent
printed; these helpers read those facts from the sandbox.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Optional

from xdrive import tags
from xdrive.sandbox.core import SANDBOX_CREDENTIALS, Sandbox, SimInstance, agent_environment

DRIVE = "work"
AGENT = (sys.executable, "-m", "xdrive.agent.main")
# What an agent's boot may change in EC2: none of these may happen when it must refuse.
MUTATING_ACTIONS = frozenset(
    {
        "CreateVolume",
        "AttachVolume",
        "DetachVolume",
        "DeleteVolume",
        "CreateTags",
        "DeleteTags",
        "CreateSnapshot",
        "DeleteSnapshot",
    }
)


# --- EC2 --------------------------------------------------------------------------------


def tags_of(item: dict[str, Any]) -> dict[str, str]:
    return tags.from_tag_list(item.get("Tags"))


def drive_volumes(sb: Sandbox, drive: str = DRIVE) -> list[dict[str, Any]]:
    """The drive's volumes as EC2 describes them (deleted ones left out)."""
    answer = sb.client().describe_volumes(Filters=[{"Name": f"tag:{tags.NAME}", "Values": [drive]}])
    return [v for v in answer["Volumes"] if v["State"] != "deleted"]


def drive_snapshots(sb: Sandbox, drive: str = DRIVE) -> list[dict[str, Any]]:
    answer = sb.client().describe_snapshots(
        OwnerIds=["self"], Filters=[{"Name": f"tag:{tags.NAME}", "Values": [drive]}]
    )
    return sorted(answer["Snapshots"], key=lambda s: (s["StartTime"], s["SnapshotId"]))


def volume_exists(sb: Sandbox, volume_id: str) -> bool:
    answer = sb.client().describe_volumes(Filters=[{"Name": "volume-id", "Values": [volume_id]}])
    return any(v["State"] != "deleted" for v in answer["Volumes"])


def calls(sb: Sandbox, action: str, ok_only: bool = True) -> list[Any]:
    """Recorded EC2 calls of ``action`` since the last ``clear_recorded``."""
    return [
        c
        for c in sb.fidelity.recorded_actions()
        if c.service == "ec2" and c.action == action and (c.status < 400 or not ok_only)
    ]


def mutating_calls(sb: Sandbox, ok_only: bool = False) -> list[str]:
    """EC2 calls that change something, attempted (or with ``ok_only``, answered 2xx)."""
    return [
        c.action
        for c in sb.fidelity.recorded_actions()
        if c.service == "ec2" and c.action in MUTATING_ACTIONS and (c.status < 400 or not ok_only)
    ]


def the_volume(sb: Sandbox, drive: str = DRIVE) -> dict[str, Any]:
    """The drive's only volume; fails if there are several (or none)."""
    volumes = drive_volumes(sb, drive)
    assert len(volumes) == 1, f"expected one volume of {drive}, found {volumes}"
    return volumes[0]


def assert_attached_here(volume: dict[str, Any], inst: SimInstance) -> None:
    assert volume["State"] == "in-use"
    (attachment,) = volume["Attachments"]
    assert attachment["InstanceId"] == inst.instance_id
    assert attachment["State"] == "attached"
    assert attachment["Device"] == "/dev/sdf"


def assert_drive_tags(volume: dict[str, Any], generation: int, drive: str = DRIVE) -> None:
    t = tags_of(volume)
    assert t[tags.NAME] == drive
    assert t[tags.CONSOLE_NAME] == drive
    assert t[tags.GENERATION] == str(generation)
    assert t.get(tags.SOURCE_SNAPSHOT) == (volume.get("SnapshotId") or None)
    assert volume["VolumeType"] == "gp3"
    assert volume["Encrypted"] is True


# --- mounts and files --------------------------------------------------------------------


def mounts_at(path: Path) -> list[tuple[str, str]]:
    """(source, fstype) of every mount stacked on ``path``."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        source, point, fstype = line.split()[:3]
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        if point == str(path):
            found.append((source, fstype))
    return found


def assert_mounted(sb: Sandbox, inst: SimInstance, volume_id: str) -> None:
    """The volume's block device, and only it, is mounted once at the instance's /v1."""
    device = sb.blocks.device_of(volume_id)
    assert device is not None, f"{volume_id} has no block device"
    assert mounts_at(inst.root / "v1") == [(device, "ext4")]


def write_tree(base: Path, seed: str = "xdrive") -> None:
    """Nested files of many sizes, an empty one, a symlink and modes, then sync."""
    base.mkdir(parents=True, exist_ok=True)
    block = hashlib.sha256(seed.encode()).digest()
    for i, size in enumerate((0, 1, 511, 4096, 65_537, 1_048_576 + 3)):
        d = base / f"d{i % 3}" / f"sub{i}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"file{i}.bin"
        f.write_bytes((block * (size // len(block) + 1))[:size])
        os.chmod(f, 0o600 + i)
    (base / "notes.txt").write_text(f"written by the boot tests ({seed})\n")
    (base / "link").symlink_to("notes.txt")
    os.sync()


def manifest(base: Path, skip: tuple[str, ...] = ("docker", "lost+found")) -> dict[str, str]:
    """sha256 of every regular file, targets of symlinks, modes of directories."""
    entries: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(base):
        rel_dir = Path(dirpath).relative_to(base)
        if rel_dir == Path("."):
            dirnames[:] = [d for d in dirnames if d not in skip]
            filenames = [f for f in filenames if f not in skip]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(rel_dir / name)
            st = path.lstat()
            if path.is_symlink():
                entries[rel] = "-> " + os.readlink(path)
            elif path.is_dir():
                entries[rel] = f"dir {st.st_mode:o}"
            else:
                entries[rel] = f"{hashlib.sha256(path.read_bytes()).hexdigest()} {st.st_mode:o}"
    return entries


# --- the agent ---------------------------------------------------------------------------


def statuses(inst: SimInstance) -> list[str]:
    return [m[len("STATUS=") :] for m in inst.notify.messages() if m.startswith("STATUS=")]


def wait_status(inst: SimInstance, pattern: str, timeout_s: float = 60.0) -> str:
    """The first STATUS line matching ``pattern`` (regex), waiting for it."""
    regex = re.compile(pattern)

    def seen(messages: list[str]) -> bool:
        return any(m.startswith("STATUS=") and regex.search(m[7:]) for m in messages)

    if not inst.notify.wait_for(seen, timeout_s):
        raise AssertionError(f"no STATUS matching {pattern!r}; got {statuses(inst)}")
    return next(s for s in statuses(inst) if regex.search(s))


def kill_agent_group(inst: SimInstance) -> None:
    """SIGKILL the agent and what it runs (mkfs, mount, dockerctl), as systemd kills a
    unit's cgroup. dockerd runs in a session of its own (docker.service in production)."""
    proc = inst.agent
    assert proc is not None
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def agent_env(inst: Optional[SimInstance] = None) -> dict[str, str]:
    """An agent process's environment: on ``inst`` (credentials from its IMDS, as on EC2),
    or, for commands that call no AWS, nowhere in particular."""
    if inst is not None:
        return agent_environment(inst)
    env = {**os.environ, **SANDBOX_CREDENTIALS, "PYTHONUNBUFFERED": "1"}
    for var in (
        "AWS_PROFILE",
        "AWS_ENDPOINT_URL",
        "NOTIFY_SOCKET",
        "INVOCATION_ID",
        "JOURNAL_STREAM",
    ):
        env.pop(var, None)
    return env


def run_agent_cli(
    *args: str, inst: Optional[SimInstance] = None, timeout_s: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """``xdrive-agent ARGS`` as its own process (as systemd or a user runs it)."""
    return subprocess.run(
        [*AGENT, *args],
        capture_output=True,
        text=True,
        env=agent_env(inst),
        stdin=subprocess.DEVNULL,
        timeout=timeout_s,
        check=False,
    )
