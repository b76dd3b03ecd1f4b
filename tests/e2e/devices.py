"""udev's job for a container: make an attached volume's device and links appear in its /dev.

The sandbox's block plane attaches a volume as a host loop device and links it under the
simulated instance's root (``ROOT/dev/disk/by-id/nvme-Amazon_Elastic_Block_Store_vol<hex>``
and ``ROOT/dev/sdf``, both -> ``/dev/loopN``). nspawn gives the container a private /dev
with a fixed set of nodes, and udev does not run in containers, so a volume attached while
it runs would never show up there. This relay polls the instance root and mirrors into the
container's /dev (through ``/proc/<PID 1>/root``) what udev would have made: the loop
device's node, with the host node's major:minor, then the links with the same names and
targets. A detach removes them again. The agent inside therefore runs with its production
config root "/" and finds the device the way it does on EC2, a moment after the attach.

Why not bind mounts: the loop device's number is known only once the agent has attached
the volume, after boot, and nspawn cannot add a bind mount to a running container without
machined. The container's device access is not restricted: on this host (cgroup v1, no
systemd) nspawn installs no device policy, so DeviceAllow= has nothing to open up.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

_LOOP = re.compile(r"^/dev/loop[0-9]+$")
DISK_GID = 6  # Debian's "disk" group owns block devices


class DeviceRelay:
    def __init__(self, instance_root: Path, container_root: Path, interval_s: float = 0.1) -> None:
        self.source = instance_root / "dev"
        self.target = container_root / "dev"
        self.interval_s = interval_s
        self.mirrored: dict[str, str] = {}  # relative link path -> /dev/loopN
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="device-relay", daemon=True)
        self.errors: list[str] = []

    def start(self) -> DeviceRelay:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sync()
            except OSError as e:  # the container may be going away: note it, keep going
                self.errors.append(str(e))
            self._stop.wait(self.interval_s)

    def _host_links(self) -> dict[str, str]:
        links: dict[str, str] = {}
        for dirpath, _dirs, names in os.walk(self.source):
            for name in names:
                path = Path(dirpath) / name
                if path.is_symlink():
                    target = os.readlink(path)
                    if _LOOP.match(target):
                        links[str(path.relative_to(self.source))] = target
        return links

    def sync(self) -> None:
        """One pass: add what appeared on the host, remove what went away."""
        wanted = self._host_links()
        for rel, device in wanted.items():
            if self.mirrored.get(rel) == device:
                continue
            self._make_node(device)
            link = self.target / rel
            link.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(device)
            self.mirrored[rel] = device
        for rel in [r for r in self.mirrored if r not in wanted]:
            device = self.mirrored.pop(rel)
            with contextlib.suppress(FileNotFoundError):
                (self.target / rel).unlink()
            if device not in self.mirrored.values():
                with contextlib.suppress(FileNotFoundError):
                    (self.target / device.removeprefix("/dev/")).unlink()

    def _make_node(self, device: str) -> None:
        node = self.target / device.removeprefix("/dev/")
        rdev = os.stat(device).st_rdev
        with contextlib.suppress(FileNotFoundError):
            if node.stat().st_rdev == rdev:
                return
            node.unlink()
        os.mknod(node, stat.S_IFBLK | 0o660, rdev)
        os.chown(node, 0, DISK_GID)


@contextlib.contextmanager
def relayed(instance_root: Path, container_root: Path) -> Iterator[DeviceRelay]:
    relay = DeviceRelay(instance_root, container_root).start()
    try:
        yield relay
    finally:
        relay.stop()
