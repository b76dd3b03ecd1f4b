"""The boot path: from instance metadata to a mounted drive holding its newest state.

observe -> decide (pure, plan.py) -> carry out one step -> observe again, until the plan
says "use this volume" for a volume attached here. Every step re-reads EC2 first, so an
agent killed at any point and restarted continues from what EC2 shows, never from memory.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, cast

from xdrive import tags
from xdrive.agent import filesystem, plan
from xdrive.agent.config import AgentConfig
from xdrive.agent.devices import resolve_device
from xdrive.agent.imds import InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.ec2 import Ec2, Volume
from xdrive.errors import DriveBusy, XdriveError

log = logging.getLogger("xdrive.agent.boot")

MAX_STEPS = 200  # each step makes progress or waits; this only stops a runaway loop


@dataclass(frozen=True)
class MountedDrive:
    volume_id: str
    generation: int
    restored_from: Optional[str]  # snapshot the volume was created from, if any
    device: Path
    mountpoint: Path
    formatted: bool  # a new empty volume was formatted during this boot

    def describe(self) -> str:
        origin = f"from {self.restored_from}, " if self.restored_from else ""
        return f"{self.volume_id} ({origin}generation {self.generation})"


class FilesystemMissing(XdriveError):
    """A volume that must hold data has no filesystem signature: never format it."""


def observe(ec2: Ec2, drive: str, me: InstanceIdentity) -> plan.Observed:
    volumes = ec2.drive_volumes(drive)
    snapshots = ec2.drive_snapshots(drive)
    holders = [i for i in plan.instances_to_describe(volumes) if i != me.instance_id]
    instances = ec2.instances(holders) if holders else {}
    return plan.Observed(
        instance_id=me.instance_id,
        availability_zone=me.availability_zone,
        volumes=volumes,
        snapshots=snapshots,
        instances=instances,
    )


class BootRunner:
    """Carries out the plan's steps against EC2 and the host."""

    def __init__(
        self,
        config: AgentConfig,
        ec2: Ec2,
        me: InstanceIdentity,
        notifier: Notifier,
        *,
        sleep: Callable[[float], None] = time.sleep,
        device_timeout_s: float = 120.0,
        wait_volume_s: float = 600.0,
    ) -> None:
        self.config = config
        self.ec2 = ec2
        self.me = me
        self.notifier = notifier
        self.sleep = sleep
        self.device_timeout_s = device_timeout_s
        self.wait_volume_s = wait_volume_s
        # Volumes this boot created and has not mounted: their content is nothing (or a
        # completed snapshot), so they may be removed if another instance wins the drive.
        self._created_unmounted: set[str] = set()

    # --- the loop ---------------------------------------------------------------------

    def restore_drive(self) -> MountedDrive:
        waited_since: Optional[float] = None
        for _ in range(MAX_STEPS):
            observed = observe(self.ec2, self.config.drive, self.me)
            step = plan.decide(observed)
            self.notifier.status(step.reason)
            self._clean_up(step.cleanup)
            if isinstance(step, plan.UseVolume):
                attachment = step.volume.attachment
                if attachment is None or attachment.instance_id != self.me.instance_id:
                    self._attach(step.volume)
                    continue  # re-observe: the claim is verified by the next decision
                if attachment.state != "attached":
                    self._wait_attached(step.volume)
                    continue
                return self._mount(step, observed)
            if isinstance(step, plan.Refuse):
                self._release_unmounted()
                raise DriveBusy(step.reason, "terminate or stop xdrive on that instance first")
            if isinstance(step, plan.CreateEmpty):
                self._create_volume(step.generation, snapshot_id=None, size_gib=None)
            elif isinstance(step, plan.RestoreSnapshot):
                self._create_volume(
                    step.generation,
                    snapshot_id=step.snapshot.id,
                    size_gib=step.snapshot.volume_size_gib,
                )
            elif isinstance(step, plan.WaitForSnapshot):
                self._wait_snapshot(step.snapshot.id)
            elif isinstance(step, plan.MigrateVolume):
                self._migrate(step.volume)
            elif isinstance(step, plan.WaitForVolume):
                now = time.monotonic()
                waited_since = waited_since or now
                if now - waited_since > self.wait_volume_s:
                    raise XdriveError(
                        f"gave up after {self.wait_volume_s:.0f} s: {step.reason}",
                        "check the volume in the EC2 console; the agent will retry on restart",
                    )
                self.sleep(2.0)
        raise XdriveError(
            f"the boot plan did not converge in {MAX_STEPS} steps",
            "this is a bug: please report it with the agent's journal",
        )

    # --- steps ------------------------------------------------------------------------

    def _create_volume(
        self, generation: int, snapshot_id: Optional[str], size_gib: Optional[int]
    ) -> None:
        v = self.config.volume
        size = max(v.size_gib, size_gib or 0)  # never smaller than the snapshot
        volume = self.ec2.create_volume(
            self.config.drive,
            self.me.availability_zone,
            size,
            generation,
            snapshot_id=snapshot_id,
            encrypted=v.encrypted,
            kms_key_id=v.kms_key_id,
            iops=v.iops,
            throughput=v.throughput,
            initialization_rate=v.initialization_rate,
            instance_id=self.me.instance_id,
        )
        self._created_unmounted.add(volume.id)
        origin = f"from {snapshot_id}" if snapshot_id else "empty"
        log.info("created %s (%s, %d GiB, generation %d)", volume.id, origin, size, generation)
        self.notifier.status(f"creating {volume.id} ({origin}, generation {generation})")
        self.ec2.wait_volume_state(volume.id, "available", timeout=self.wait_volume_s)

    def _attach(self, volume: Volume) -> None:
        device = self.config.volume.device_name
        self.notifier.status(f"attaching {volume.id} as {device}")
        self.ec2.attach_volume(volume.id, self.me.instance_id, device)
        self._wait_attached(volume)

    def _wait_attached(self, volume: Volume) -> None:
        self.ec2.wait_attached(volume.id, self.me.instance_id, timeout=self.wait_volume_s)

    def _wait_snapshot(self, snapshot_id: str) -> None:
        def progress(s: object) -> None:
            self.notifier.status(f"waiting for {snapshot_id} ({getattr(s, 'progress', '?')}%)")

        self.ec2.wait_snapshot_completed(snapshot_id, on_progress=progress)

    def _migrate(self, volume: Volume) -> None:
        # The volume is detached and unsaved in another AZ: its snapshot is consistent (no
        # writer) and so final; the next decision restores it here.
        snap = self.ec2.create_snapshot(volume, tags.FINAL, "migration", self.me.instance_id)
        self.notifier.status(
            f"saving {volume.id} from {volume.availability_zone} as {snap.id} to move it here"
        )
        self._wait_snapshot(snap.id)

    def _clean_up(self, volume_ids: tuple[str, ...]) -> None:
        # plan.cleanup_candidates only offers detached volumes whose content is in a
        # completed final snapshot; re-check on fresh data right before deleting.
        for vid in volume_ids:
            fresh = self.ec2.volume(vid)
            snaps = self.ec2.drive_snapshots(self.config.drive)
            if fresh is None or fresh.attachment is not None or not plan.is_saved(fresh, snaps):
                continue
            log.info("deleting %s: its content is in a completed snapshot", vid)
            self.ec2.delete_volume(vid)

    def _release_unmounted(self) -> None:
        """Lost a race for the drive: remove volumes this boot made and never wrote."""
        for vid in sorted(self._created_unmounted):
            fresh = self.ec2.volume(vid)
            if fresh is None:
                continue
            if fresh.attached_instance == self.me.instance_id:
                self.ec2.detach_volume(vid, self.me.instance_id)
                self.ec2.wait_detached(vid, self.me.instance_id)
            log.info(
                "removing %s: created here, never mounted, another instance has the drive", vid
            )
            self.ec2.delete_volume(vid)
        self._created_unmounted.clear()

    def _mount(self, step: plan.UseVolume, observed: plan.Observed) -> MountedDrive:
        volume = step.volume
        if step.retag:
            # Before the first write: from now on this volume is newer than its snapshots.
            self.ec2.set_volume_generation(volume.id, step.generation)
        device = resolve_device(
            volume.id,
            root=Path(self.config.root),
            requested_name=self.config.volume.device_name,
            timeout_s=self.device_timeout_s,
        )
        fstype = cast(filesystem.FsType, self.config.volume.filesystem)
        signature = filesystem.read_signature(device)
        formatted = False
        if signature is None:
            if volume.snapshot_id:
                raise FilesystemMissing(
                    f"{volume.id} was restored from {volume.snapshot_id} but {device} shows no "
                    "filesystem",
                    "refusing to format it; inspect the snapshot before using this drive",
                )
            self.notifier.status(f"formatting new empty {volume.id} ({fstype})")
            filesystem.make_filesystem(device, fstype, label=_label(self.config.drive, fstype))
            formatted = True
        elif signature not in ("ext4", "xfs"):
            raise FilesystemMissing(
                f"{device} ({volume.id}) holds {signature!r}, not ext4 or xfs",
                "refusing to mount or format it",
            )
        else:
            fstype = cast(filesystem.FsType, signature)  # the drive keeps its filesystem
        mountpoint = self.config.mount_path
        already = filesystem.is_mounted(mountpoint) is not None
        # ext4 grows before mounting: an online resize needs CAP_SYS_RESOURCE, which
        # containers and some VMs drop even for root. xfs can only grow mounted.
        if fstype == "ext4" and not already and filesystem.ext4_needs_grow(device):
            self.notifier.status(f"growing the filesystem on {volume.id}")
            filesystem.grow_unmounted(device, fstype)
        filesystem.mount(device, mountpoint, fstype)
        if fstype == "xfs":
            filesystem.grow_filesystem(device, mountpoint, fstype)
        self._created_unmounted.discard(volume.id)
        return MountedDrive(
            volume_id=volume.id,
            generation=step.generation,
            restored_from=volume.snapshot_id,
            device=device,
            mountpoint=mountpoint,
            formatted=formatted,
        )


def _label(drive: str, fstype: str) -> str:
    return drive[: 16 if fstype == "ext4" else 12]
