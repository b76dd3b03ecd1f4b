"""Filesystems on the drive's device: signature, mkfs (guarded), mount, grow, freeze.

The data-safety rule lives here: ``make_filesystem`` reads the device's signature itself,
right before mkfs, and refuses if there is one. mke2fs does not protect a device (it
formats over an existing filesystem without asking when stdin is not a terminal), so
callers' checks alone are not enough.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional, Union

from xdrive.agent import commands
from xdrive.errors import ConfigError, XdriveError

FsType = Literal["ext4", "xfs"]
FS_TYPES: tuple[FsType, ...] = ("ext4", "xfs")
_LABEL_MAX = {"ext4": 16, "xfs": 12}
_MOUNTINFO = Path("/proc/self/mountinfo")
_PROC = Path("/proc")

PathLike = Union[str, "os.PathLike[str]"]


class SignaturePresent(XdriveError):
    """mkfs was refused: the device already holds a filesystem or partition table."""


class SignatureUnknown(XdriveError):
    """The device could not be read well enough to tell whether it holds data."""


class MountBusy(XdriveError):
    """umount failed because processes still use the filesystem."""

    def __init__(self, problem: str, fix: str, pids: Sequence[int]) -> None:
        self.pids = tuple(pids)
        super().__init__(problem, fix)


class MountConflict(XdriveError):
    """The mountpoint holds another device, or the device is mounted elsewhere."""


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/self/mountinfo."""

    major: int
    minor: int
    mountpoint: str
    fstype: str
    source: str


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo octal escapes
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def read_mountinfo(path: Path = _MOUNTINFO) -> list[MountEntry]:
    entries = []
    for line in path.read_text(encoding="utf-8", errors="surrogateescape").splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields = left.split()
        tail = right.split()
        major, minor = fields[2].split(":")
        entries.append(
            MountEntry(
                major=int(major),
                minor=int(minor),
                mountpoint=_unescape(fields[4]),
                fstype=tail[0],
                source=_unescape(tail[1]) if len(tail) > 1 else "",
            )
        )
    return entries


def _real(path: PathLike) -> str:
    return os.path.realpath(os.fspath(path))


def _top_mount(mountpoint: PathLike) -> Optional[MountEntry]:
    """The mount visible at ``mountpoint`` (the last one mounted there), if any."""
    where = _real(mountpoint)
    found = None
    for entry in read_mountinfo():
        if entry.mountpoint == where:
            found = entry
    return found


def _device_number(device: PathLike) -> tuple[int, int]:
    st = os.stat(device)
    return os.major(st.st_rdev), os.minor(st.st_rdev)


def _check_fstype(fstype: str) -> None:
    if fstype not in FS_TYPES:
        raise ConfigError(f"unsupported filesystem type {fstype!r}", "use ext4 or xfs")


def read_signature(device: PathLike) -> Optional[str]:
    """The filesystem type on ``device`` (``ext4``, ``xfs``, ``swap``, ...) or, for a device
    holding only a partition table, its type (``gpt``, ``dos``); None when it is blank.

    ``blkid -p`` exits 2 both for "nothing found" and for "could not open", so the device is
    first opened and read here: only a readable, non-empty device can be called blank.
    Every other blkid failure (8: ambivalent, several signatures) raises.
    """
    dev = _real(device)
    try:
        fd = os.open(dev, os.O_RDONLY)
        try:
            first = os.read(fd, 4096)
        finally:
            os.close(fd)
    except OSError as e:
        raise SignatureUnknown(
            f"cannot read {device} to check it for a filesystem ({e.strerror})",
            "check that the device exists and the agent runs as root",
        ) from e
    if not first:
        raise SignatureUnknown(
            f"{device} reads as empty (size 0)",
            "check that the volume is still attached; a detached loop or NVMe device has size 0",
        )
    result = commands.run(["blkid", "-p", "-o", "export", dev], check=False)
    if result.returncode == 2:
        return None
    if result.returncode != 0:
        detail = result.stderr.strip() or f"exit status {result.returncode}"
        raise SignatureUnknown(
            f"cannot tell whether {device} holds data: blkid -p: {detail}",
            f"inspect it with `wipefs -n {dev}`; xdrive never formats a device it cannot read",
        )
    values = dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)
    return values.get("TYPE") or values.get("PTTYPE") or "unknown"


def make_filesystem(device: PathLike, fstype: FsType, label: str) -> None:
    """Format a blank ``device``; raise SignaturePresent if it holds anything at all."""
    _check_fstype(fstype)
    if not label or len(label) > _LABEL_MAX[fstype] or not label.isprintable():
        raise ConfigError(
            f"invalid {fstype} label {label!r}",
            f"use 1 to {_LABEL_MAX[fstype]} printable characters",
        )
    dev = _real(device)
    # Read here, right before mkfs, whatever the caller checked earlier.
    signature = read_signature(dev)
    if signature is not None:
        raise SignaturePresent(
            f"refusing to format {device}: it already holds {signature}",
            "xdrive formats only blank devices; this one may hold the drive's data. "
            f"If it is truly unwanted, erase it by hand with `wipefs -a {dev}`",
        )
    # No -F / -f: mkfs.xfs then refuses an existing signature on its own as well.
    program = "mkfs.ext4" if fstype == "ext4" else "mkfs.xfs"
    commands.run([program, "-q", "-L", label, dev])


def is_mounted(mountpoint: PathLike) -> Optional[Path]:
    """The device (mount source) mounted at ``mountpoint``, or None."""
    entry = _top_mount(mountpoint)
    return Path(entry.source) if entry is not None else None


def mount(
    device: PathLike, mountpoint: PathLike, fstype: FsType, options: Sequence[str] = ()
) -> bool:
    """Mount ``device`` at ``mountpoint`` (created if missing); False if it already was.

    Another device at the mountpoint, or this device mounted elsewhere, raises
    MountConflict rather than stacking a second mount.
    """
    _check_fstype(fstype)
    where = Path(mountpoint)
    where.mkdir(parents=True, exist_ok=True)
    dev = _real(device)
    number = _device_number(dev)
    top = _top_mount(where)
    if top is not None:
        if (top.major, top.minor) == number:
            return False
        raise MountConflict(
            f"{where} already has {top.source} ({top.fstype}) mounted, not {device}",
            f"unmount {where} first",
        )
    elsewhere = [e.mountpoint for e in read_mountinfo() if (e.major, e.minor) == number]
    if elsewhere:
        raise MountConflict(
            f"{device} is already mounted at {', '.join(elsewhere)}",
            "unmount it there first; the drive has one mountpoint",
        )
    opts = list(options)
    if fstype == "xfs":
        # Volumes restored from one snapshot share the filesystem UUID; xfs refuses a
        # second mount with a known UUID (the sandbox runs many instances on one kernel).
        opts.append("nouuid")
    argv = ["mount", "-t", fstype]
    if opts:
        argv += ["-o", ",".join(opts)]
    commands.run([*argv, dev, _real(where)])
    return True


def unmount(mountpoint: PathLike, timeout_s: Optional[float] = None) -> bool:
    """Unmount ``mountpoint``; False if nothing was mounted there. Raises MountBusy (with
    the pids found) when processes still hold it."""
    if _top_mount(mountpoint) is None:
        return False
    where = _real(mountpoint)
    try:
        commands.run(["umount", where], timeout_s=timeout_s)
    except commands.CommandFailed as e:
        if "busy" not in e.stderr.lower():
            raise
        pids = processes_using(where)
        raise MountBusy(
            f"cannot unmount {where}: in use by pid(s) {', '.join(map(str, pids)) or '?'}",
            "stop those processes (docker first) and try again",
            pids,
        ) from e
    return True


def grow_filesystem(device: PathLike, mountpoint: PathLike, fstype: FsType) -> bool:
    """Grow the mounted filesystem to fill its device; True if it grew.

    A filesystem already at full size is left as it is (both tools then do nothing).
    """
    _check_fstype(fstype)
    dev = _real(device)
    top = _top_mount(mountpoint)
    if top is None or (top.major, top.minor) != _device_number(dev):
        raise MountConflict(
            f"cannot grow {device}: it is not mounted at {mountpoint}",
            "mount it first; xdrive grows filesystems only while mounted",
        )
    before = _size(mountpoint)
    if fstype == "ext4":
        result = commands.run(["resize2fs", dev], check=False)
        if result.returncode != 0 and "Permission denied" in result.stderr:
            # The kernel wants CAP_SYS_RESOURCE for an online ext4 resize; containers and
            # some VMs drop it even for root.
            raise commands.CommandFailed(
                result.argv,
                result.returncode,
                result.stdout,
                result.stderr,
                f"cannot grow {device} while mounted: the kernel refused (online ext4 "
                "resize needs CAP_SYS_RESOURCE, which this process lacks)",
                "grow it unmounted with grow_unmounted(), or run with CAP_SYS_RESOURCE",
            )
        if result.returncode != 0:
            commands.run(result.argv)  # raises with the tool's own message
    else:
        commands.run(["xfs_growfs", _real(mountpoint)])
    return _size(mountpoint) > before


def grow_unmounted(device: PathLike, fstype: FsType) -> bool:
    """Grow an unmounted ext4 filesystem to fill its device (check, then resize2fs);
    True if it grew. xfs can only grow mounted: use grow_filesystem."""
    _check_fstype(fstype)
    if fstype != "ext4":
        raise ConfigError(f"{fstype} cannot grow unmounted", "mount it and use grow_filesystem")
    dev = _real(device)
    where = [e.mountpoint for e in read_mountinfo() if (e.major, e.minor) == _device_number(dev)]
    if where:
        raise MountConflict(f"{device} is mounted at {', '.join(where)}", "unmount it first")
    before = _ext4_block_count(dev)
    # resize2fs insists on a fresh forced check; -p repairs only what is safe unattended.
    check = commands.run(["e2fsck", "-f", "-p", dev], check=False)
    if check.returncode not in (0, 1):  # 1: errors were corrected
        raise commands.CommandFailed(
            check.argv,
            check.returncode,
            check.stdout,
            check.stderr,
            f"e2fsck found problems on {device} it cannot fix unattended "
            f"(exit status {check.returncode}): {check.stdout.strip()[-300:]}",
            f"run `e2fsck -f {dev}` by hand",
        )
    commands.run(["resize2fs", dev])
    return _ext4_block_count(dev) > before


def _ext4_block_count(device: str) -> int:
    out = commands.run(["dumpe2fs", "-h", device]).stdout
    match = re.search(r"^Block count:\s+(\d+)", out, re.MULTILINE)
    if match is None:
        raise XdriveError(f"dumpe2fs -h {device} printed no block count", "is it ext4?")
    return int(match.group(1))


def ext4_needs_grow(device: PathLike) -> bool:
    """True if the ext4 filesystem on ``device`` is smaller than the device (cheap: reads
    the superblock, so the forced check in grow_unmounted runs only when it pays)."""
    dev = _real(device)
    out = commands.run(["dumpe2fs", "-h", dev]).stdout
    blocks = re.search(r"^Block count:\s+(\d+)", out, re.MULTILINE)
    size = re.search(r"^Block size:\s+(\d+)", out, re.MULTILINE)
    if blocks is None or size is None:
        raise XdriveError(f"dumpe2fs -h {dev} printed no block count or size", "is it ext4?")
    with open(dev, "rb") as f:
        device_bytes = f.seek(0, os.SEEK_END)
    # resize2fs rounds down to whole blocks (and ext4 to its group layout): a margin of one
    # MiB avoids a check-and-resize on every boot for nothing.
    return device_bytes - int(blocks.group(1)) * int(size.group(1)) >= 1 << 20


def _size(mountpoint: PathLike) -> int:
    st = os.statvfs(mountpoint)
    return st.f_blocks * st.f_frsize


def freeze(mountpoint: PathLike, timeout_s: Optional[float] = None) -> None:
    """Flush and block writes (for a consistent snapshot while mounted)."""
    commands.run(["fsfreeze", "-f", _real(mountpoint)], timeout_s=timeout_s)


def thaw(mountpoint: PathLike) -> bool:
    """Let writes continue; False if it was not frozen (safe to call in a finally)."""
    result = commands.run(["fsfreeze", "-u", _real(mountpoint)], check=False)
    if result.returncode == 0:
        return True
    if "Invalid argument" in result.stderr:  # EINVAL: the filesystem is not frozen
        return False
    raise commands.CommandFailed(
        result.argv,
        result.returncode,
        result.stdout,
        result.stderr,
        f"cannot thaw {mountpoint}: {result.stderr.strip()}",
        "writes to the drive stay blocked until `fsfreeze -u` succeeds",
    )


@contextlib.contextmanager
def frozen(mountpoint: PathLike, timeout_s: Optional[float] = None) -> Iterator[None]:
    """``with frozen(mp): request_snapshot()`` thaws even when the body raises."""
    freeze(mountpoint, timeout_s)
    try:
        yield
    finally:
        thaw(mountpoint)


def processes_using(mountpoint: PathLike, proc: Path = _PROC) -> list[int]:
    """Pids whose open files, cwd, root, executable or memory maps lie on ``mountpoint``.

    A file counts when its path is under the mountpoint or, while something is mounted
    there, when it lives on that filesystem's device (this also catches deleted files and
    paths seen from another mount namespace). Reads /proc directly, no fuser needed.
    """
    where = _real(mountpoint)
    prefix = where.rstrip("/") + "/"
    top = _top_mount(where)
    number = (top.major, top.minor) if top is not None else None

    def on_mount(path: str) -> bool:
        path = path[: -len(" (deleted)")] if path.endswith(" (deleted)") else path
        return path == where or path.startswith(prefix)

    def link_hits(link: Path) -> bool:
        try:
            if on_mount(os.readlink(link)):
                return True
            if number is None:
                return False
            st = os.stat(link)
        except OSError:
            return False
        return (os.major(st.st_dev), os.minor(st.st_dev)) == number

    def maps_hit(maps: Path) -> bool:
        try:
            text = maps.read_text(encoding="utf-8", errors="surrogateescape")
        except OSError:
            return False
        for line in text.splitlines():
            fields = line.split(None, 5)
            if len(fields) < 6:
                continue
            if on_mount(fields[5]):
                return True
            major, _, minor = fields[3].partition(":")
            if number is not None and (int(major, 16), int(minor, 16)) == number:
                return True
        return False

    pids = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        links = [entry / "cwd", entry / "root", entry / "exe"]
        try:
            links += list((entry / "fd").iterdir())
        except OSError:
            pass  # process gone, or a kernel thread
        if any(link_hits(link) for link in links) or maps_hit(entry / "maps"):
            pids.append(int(entry.name))
    return sorted(pids)
