"""The sandbox's block plane: EBS volumes as sparse files, attached as loop devices.

A volume is ``WORKDIR/volumes/<vol-id>.img``; a snapshot is a point-in-time copy of it in
``WORKDIR/snapshots/<snap-id>.img``. Attaching a volume to a simulated instance sets up a
loop device and the links an instance would get from udev under that instance's root:
``dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<hex>`` and the requested name
(``dev/sdf``), both pointing at ``/dev/loopN``.

Only loop devices this plane created are ever detached, and only while they still point at
its own files: other tests and the host share the machine's loop devices.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3
BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"

_VOLUME_ID = re.compile(r"^vol-[0-9a-f]+$")
_SNAPSHOT_ID = re.compile(r"^snap-[0-9a-f]+$")


class BlockPlaneError(RuntimeError):
    """A block-plane operation could not be done (bad id, missing file, volume in use)."""


@dataclass(frozen=True)
class LoopAttachment:
    """A volume's loop device and the links made for it under an instance root."""

    volume_id: str
    device: str  # /dev/loopN
    rdev: tuple[int, int]  # major, minor: how mounts of it are recognised
    backing: Path  # the volume file, to check the loop still points at it
    links: tuple[Path, ...]


def by_id_name(volume_id: str) -> str:
    """The udev by-id name of an EBS volume on Nitro: serial = volume id without the dash."""
    return BY_ID_PREFIX + volume_id.replace("-", "")


def device_link(instance_root: Path, device_name: str) -> Path:
    """Where the requested device name (``/dev/sdf`` or ``sdf``) appears under a root."""
    name = device_name.lstrip("/")
    return instance_root / (name if name.startswith("dev/") else f"dev/{name}")


def _run(args: Sequence[str]) -> str:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise BlockPlaneError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def _unescape_mount_path(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mounts_of(rdev: tuple[int, int]) -> list[str]:
    """Mount points (in this mount namespace) of the block device major:minor."""
    wanted = f"{rdev[0]}:{rdev[1]}"
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split(" ")
        if len(fields) > 4 and fields[2] == wanted:
            points.append(_unescape_mount_path(fields[4]))
    return points


def _loop_backing_file(device: str) -> str | None:
    """What a loop device is bound to now, or None when it is free."""
    sysfs = Path("/sys/block") / Path(device).name / "loop" / "backing_file"
    try:
        return sysfs.read_text().strip().removesuffix(" (deleted)")
    except OSError:
        return None


class BlockPlane:
    """Sparse files for volumes and snapshots, loop devices for attachments. Thread-safe."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = Path(workdir)
        self.volumes_dir = self.workdir / "volumes"
        self.snapshots_dir = self.workdir / "snapshots"
        self.volumes_dir.mkdir(parents=True, exist_ok=True)
        self.snapshots_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._attached: dict[str, LoopAttachment] = {}

    # -- files --------------------------------------------------------------------------

    def volume_path(self, volume_id: str) -> Path:
        if not _VOLUME_ID.match(volume_id):
            raise BlockPlaneError(f"not a volume id: {volume_id!r}")
        return self.volumes_dir / f"{volume_id}.img"

    def snapshot_path(self, snapshot_id: str) -> Path:
        if not _SNAPSHOT_ID.match(snapshot_id):
            raise BlockPlaneError(f"not a snapshot id: {snapshot_id!r}")
        return self.snapshots_dir / f"{snapshot_id}.img"

    def has_volume(self, volume_id: str) -> bool:
        return self.volume_path(volume_id).exists()

    def has_snapshot(self, snapshot_id: str) -> bool:
        return self.snapshot_path(snapshot_id).exists()

    def create_volume(
        self, volume_id: str, size_gib: int, from_snapshot: str | None = None
    ) -> Path:
        """A new volume file: blank and sparse, or a copy of a snapshot grown to size."""
        path = self.volume_path(volume_id)
        size = int(size_gib) * GIB
        with self._lock:
            if path.exists():
                raise BlockPlaneError(f"volume {volume_id} already exists")
            tmp = path.with_suffix(".tmp")
            if from_snapshot is None:
                with open(tmp, "wb") as f:
                    f.truncate(size)
            else:
                source = self.snapshot_path(from_snapshot)
                if not source.exists():
                    raise BlockPlaneError(f"snapshot {from_snapshot} has no content here")
                if source.stat().st_size > size:
                    raise BlockPlaneError(
                        f"volume of {size_gib} GiB is smaller than snapshot {from_snapshot}"
                    )
                _run(["cp", "--sparse=always", str(source), str(tmp)])
                os.truncate(tmp, size)
            os.replace(tmp, path)
            return path

    def snapshot(self, volume_id: str, snapshot_id: str) -> Path:
        """Copy the volume as it is now. Later writes to the volume are not in the copy.

        Only what reached the block device is copied: data still in the page cache of a
        filesystem mounted on it is not, just as on EBS (that is what sync/fsfreeze are for).
        """
        source = self.volume_path(volume_id)
        path = self.snapshot_path(snapshot_id)
        with self._lock:
            if not source.exists():
                raise BlockPlaneError(f"volume {volume_id} has no file")
            if path.exists():
                raise BlockPlaneError(f"snapshot {snapshot_id} already exists")
            fd = os.open(source, os.O_RDONLY)
            try:
                os.fsync(fd)  # what the loop driver wrote is durable in the file
            finally:
                os.close(fd)
            tmp = path.with_suffix(".tmp")
            _run(["cp", "--sparse=always", str(source), str(tmp)])
            os.replace(tmp, path)
            return path

    def delete_volume(self, volume_id: str) -> None:
        with self._lock:
            if volume_id in self._attached:
                raise BlockPlaneError(f"volume {volume_id} is attached")
            self.volume_path(volume_id).unlink(missing_ok=True)

    def delete_snapshot(self, snapshot_id: str) -> None:
        with self._lock:
            self.snapshot_path(snapshot_id).unlink(missing_ok=True)

    # -- devices ------------------------------------------------------------------------

    def attach(self, volume_id: str, instance_root: Path, device_name: str) -> str:
        """Bind the volume to a free loop device and link it under the instance root."""
        backing = self.volume_path(volume_id)
        with self._lock:
            if volume_id in self._attached:
                raise BlockPlaneError(f"volume {volume_id} is already attached")
            if not backing.exists():
                raise BlockPlaneError(f"volume {volume_id} has no file")
            device = _run(["losetup", "--find", "--show", str(backing)]).strip()
            st = os.stat(device)
            attachment = LoopAttachment(
                volume_id=volume_id,
                device=device,
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)),
                backing=backing.resolve(),
                links=(
                    Path(instance_root) / "dev/disk/by-id" / by_id_name(volume_id),
                    device_link(Path(instance_root), device_name),
                ),
            )
            # Tracked before the links so a failure below is still cleaned up by teardown.
            self._attached[volume_id] = attachment
            for link in attachment.links:
                link.parent.mkdir(parents=True, exist_ok=True)
                if link.is_symlink():
                    link.unlink()  # a stale link from an earlier attachment
                link.symlink_to(device)
            return device

    def device_of(self, volume_id: str) -> str | None:
        with self._lock:
            attachment = self._attached.get(volume_id)
            return attachment.device if attachment else None

    def attached_volumes(self) -> tuple[str, ...]:
        with self._lock:
            return tuple(self._attached)

    def is_mounted(self, volume_id: str) -> bool:
        with self._lock:
            attachment = self._attached.get(volume_id)
        return bool(attachment and mounts_of(attachment.rdev))

    def detach(self, volume_id: str) -> None:
        """Remove the links and free the loop device (the caller checked it is unmounted)."""
        with self._lock:
            attachment = self._attached.pop(volume_id, None)
            if attachment is not None:
                self._release(attachment)

    def force_detach(self, volume_id: str) -> None:
        """The instance is gone: lazily unmount whatever still uses the device, then detach."""
        with self._lock:
            attachment = self._attached.pop(volume_id, None)
            if attachment is None:
                return
            # Deepest first, so a mount on top of the volume's filesystem goes before it.
            for point in sorted(mounts_of(attachment.rdev), key=len, reverse=True):
                subprocess.run(["umount", "-l", point], capture_output=True, check=False)
            self._release(attachment)

    def _release(self, attachment: LoopAttachment) -> None:
        for link in attachment.links:
            if link.is_symlink() and os.readlink(link) == attachment.device:
                link.unlink()
        # The loop may have been freed (autoclear) and reused by someone else: only detach
        # it while it is still bound to our file.
        if _loop_backing_file(attachment.device) == str(attachment.backing):
            _run(["losetup", "-d", attachment.device])

    def teardown(self) -> None:
        """Detach every loop device this plane created and remove all its files."""
        with self._lock:
            for volume_id in list(self._attached):
                self.force_detach(volume_id)
            for directory in (self.volumes_dir, self.snapshots_dir):
                shutil.rmtree(directory, ignore_errors=True)
            self.volumes_dir.mkdir(parents=True, exist_ok=True)
            self.snapshots_dir.mkdir(parents=True, exist_ok=True)
