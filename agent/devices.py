"""Find the block device of an attached EBS volume, the way aws-ebs-csi-driver does.

On Nitro instances a volume is /dev/nvmeNn1 with N in discovery order, so the only stable
key is the NVMe serial, which is the volume id without its dash. Where to look, most
trustworthy first:

1. udev's by-id links, named after model and serial. systemd's rules make
   ``nvme-Amazon_Elastic_Block_Store_vol<hex>`` (systemd 254+ also ``..._1`` with the
   namespace id); amazon-ec2-utils' 70-ec2-nvme-devices.rules makes ``...-ns-1``.
2. sysfs: ``/sys/block/nvme*n*/device/serial`` (space padded) holds the same serial; this
   works before udev has made any link.
3. the name requested in AttachVolume (``/dev/sdf``; amazon-ec2-utils links it on Nitro) or
   its Xen form (``/dev/xvdf``). This is the only way on Xen instances, which have no
   serial; a link that resolves to an NVMe device whose serial names another volume is
   ignored.

Every path is under ``root`` so the sandbox can give each simulated instance its own /dev
and /sys.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Callable, Optional

from xdrive.errors import ConfigError, XdriveError

EBS_MODEL = "Amazon Elastic Block Store"
BY_ID_PREFIX = "nvme-Amazon_Elastic_Block_Store_"
_VOLUME_ID_RE = re.compile(r"^vol-[0-9a-f]{8,17}$")
_NVME_DISK_RE = re.compile(r"^nvme\d+n\d+$")
_MAX_POLL_S = 2.0


class DeviceNotFound(XdriveError):
    """An attached volume's block device did not appear in time."""


def volume_serial(volume_id: str) -> str:
    """The NVMe serial EBS reports for ``volume_id``: ``vol-0abc`` -> ``vol0abc``."""
    if not _VOLUME_ID_RE.match(volume_id):
        raise ConfigError(f"invalid EBS volume id {volume_id!r}", "expected vol- and hex digits")
    return volume_id.replace("-", "", 1)


def by_id_names(volume_id: str) -> tuple[str, ...]:
    """Every /dev/disk/by-id name that udev rules give the volume's whole disk."""
    base = BY_ID_PREFIX + volume_serial(volume_id)
    return (base, base + "_1", base + "-ns-1")


def requested_names(requested_name: Optional[str]) -> tuple[str, ...]:
    """``/dev/sdf`` -> ``("sdf", "xvdf")``; Xen renames sdX to xvdX (and the reverse is
    accepted, so a request for xvdf also finds sdf)."""
    if not requested_name:
        return ()
    name = requested_name[len("/dev/") :] if requested_name.startswith("/dev/") else requested_name
    if not name or "/" in name:
        raise ConfigError(f"invalid device name {requested_name!r}", "use a name like /dev/sdf")
    if name.startswith("sd"):
        return (name, "xv" + name[1:])
    if name.startswith("xvd"):
        return (name, "s" + name[2:])
    return (name,)


def _read_attr(path: Path) -> Optional[str]:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip()
    except OSError:
        return None


def _existing_target(link: Path) -> Optional[Path]:
    """The real path behind ``link`` if it (and its target) exist; a dangling link is not
    there yet."""
    if not link.exists():
        return None
    return Path(os.path.realpath(link))


def _nvme_serial(root: Path, device: Path) -> Optional[str]:
    """The NVMe serial of ``device`` when it is an nvme disk with a sysfs entry under root."""
    if not _NVME_DISK_RE.match(device.name):
        return None
    return _read_attr(root / "sys" / "block" / device.name / "device" / "serial")


def _scan_sysfs(root: Path, serial: str) -> Optional[Path]:
    block = root / "sys" / "block"
    try:
        names = sorted(p.name for p in block.iterdir())
    except OSError:
        return None
    for name in names:
        if not _NVME_DISK_RE.match(name):
            continue
        attrs = block / name / "device"
        if _read_attr(attrs / "serial") != serial:
            continue
        model = _read_attr(attrs / "model")
        if model is not None and model != EBS_MODEL:
            continue
        node = root / "dev" / name
        if node.exists():
            return Path(os.path.realpath(node))
    return None


def find_device(volume_id: str, *, root: Path, requested_name: Optional[str]) -> Optional[Path]:
    """One look for the volume's device (no waiting); None if it is not there yet."""
    serial = volume_serial(volume_id)
    for name in by_id_names(volume_id):
        target = _existing_target(root / "dev" / "disk" / "by-id" / name)
        if target is not None:
            return target
    found = _scan_sysfs(root, serial)
    if found is not None:
        return found
    for name in requested_names(requested_name):
        target = _existing_target(root / "dev" / name)
        if target is None:
            continue
        other = _nvme_serial(root, target)
        if other is not None and other != serial:
            continue  # this name belongs to another volume (a stale or reused link)
        return target
    return None


def _looked_for(volume_id: str, root: Path, requested_name: Optional[str]) -> str:
    places = [str(root / "dev" / "disk" / "by-id" / n) for n in by_id_names(volume_id)]
    places.append(f"{root / 'sys' / 'block'}/nvme*n*/device/serial = {volume_serial(volume_id)}")
    places += [str(root / "dev" / n) for n in requested_names(requested_name)]
    return ", ".join(places)


def resolve_device(
    volume_id: str,
    *,
    root: Path,
    requested_name: Optional[str],
    timeout_s: float = 60.0,
    poll_s: float = 0.1,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Path:
    """Wait for the volume's block device and return its real path (``/dev/nvme1n1``).

    The device node appears a moment after EC2 reports the volume ``attached``, so this
    polls, doubling the interval from ``poll_s`` up to 2 s, until ``timeout_s``.
    """
    root = Path(root)
    deadline = clock() + timeout_s
    delay = poll_s
    while True:
        found = find_device(volume_id, root=root, requested_name=requested_name)
        if found is not None:
            return found
        remaining = deadline - clock()
        if remaining <= 0:
            raise DeviceNotFound(
                f"no block device for volume {volume_id} after {timeout_s:g} s "
                f"(looked for {_looked_for(volume_id, root, requested_name)})",
                f"check that {volume_id} is attached to this instance "
                f"(aws ec2 describe-volumes --volume-ids {volume_id}), that the instance "
                "type supports it, and that udev is running (udevadm settle; lsblk)",
            )
        sleep(min(delay, remaining))
        delay = min(delay * 2, _MAX_POLL_S)
