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
from xdrive.agent.devices import find_device, resolve_device
from xdrive.agent.imds import InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.ec2 import Backoff, Ec2, Ec2ApiError, Volume
from xdrive.errors import DriveBusy, XdriveError

log = logging.getLogger("xdrive.agent.boot")

MAX_STEPS = 200  # each step makes progress or waits; this only stops a runaway loop
# Someone waits for the boot, and its EC2 waits are short (volume creation and attachment
# take seconds): poll from 0.2 s, growing 20% a time, so no wait overshoots by more than
# about a fifth; about 13 polls for 10 s, 23 for a minute, then every 10 s.
BOOT_BACKOFF = Backoff(initial=0.2, factor=1.2, maximum=10.0)
# The block device appears a moment after EC2 says "attached"; looking is a few stat calls.
DEVICE_POLL_S = 0.05
# Pauses while EC2 moves a volume on by itself (creating, detaching, freed at termination).
SETTLE_PAUSE_S = (0.25, 1.5, 5.0)  # first, factor, maximum
# A volume made by this boot that another may delete: these codes mean it already went or
# was taken, and deleting it is no longer ours to do.
_GONE_OR_TAKEN = ("InvalidVolume.NotFound", "VolumeInUse", "IncorrectState")


@dataclass(frozen=True)
class MountedDrive:
    volume_id: str
    generation: int
    # The snapshot this instance restored the volume from; None for a new empty volume
    # and for a reattached one (whose content is its own, not a snapshot's).
    restored_from: Optional[str]
    device: Path
    mountpoint: Path
    formatted: bool  # a new empty volume was formatted during this boot
    reattached: bool = False  # made by another instance (or before it): no restore here

    def describe(self) -> str:
        if self.restored_from:
            origin = f"from {self.restored_from}, "
        elif self.reattached:
            origin = "reattached, "
        else:
            origin = ""
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
        backoff: Optional[Backoff] = BOOT_BACKOFF,
    ) -> None:
        self.config = config
        # The same client, polled at the boot's cadence (None: the wrapper's own).
        self.ec2 = ec2 if backoff is None else Ec2(ec2.client, backoff=backoff, sleep=sleep)
        self.me = me
        self.notifier = notifier
        self.sleep = sleep
        self.device_timeout_s = device_timeout_s
        self.wait_volume_s = wait_volume_s
        # Volumes this boot created and has not mounted: their content is nothing (or a
        # completed snapshot), so they are removed if the boot fails or loses the drive.
        self._created_unmounted: set[str] = set()

    # --- the loop ---------------------------------------------------------------------

    def restore_drive(self) -> MountedDrive:
        """Bring the drive's newest state to the mountpoint; see the module docstring.

        On failure, volumes this boot created and never mounted are removed (best effort):
        they hold nothing that is not in a snapshot, and a retry makes them again.
        """
        try:
            return self._restore()
        except XdriveError:
            self._release_unmounted()
            raise

    def _restore(self) -> MountedDrive:
        waited_since: Optional[float] = None
        pause = SETTLE_PAUSE_S[0]
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
                mounted = filesystem.is_mounted(self.config.mount_path) is not None
                rival = None if mounted else plan.rival_writer(observed, step.volume)
                if rival is not None:
                    if step.volume.id not in self._created_unmounted:
                        # Attached by this boot, never mounted: hand it back untouched.
                        self.ec2.detach_volume(step.volume.id, self.me.instance_id)
                    self._release_unmounted()
                    raise DriveBusy(rival.reason, "the other instance keeps the drive")
                return self._mount(step, observed)
            if isinstance(step, plan.Refuse):
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
                self.sleep(pause)
                pause = min(pause * SETTLE_PAUSE_S[1], SETTLE_PAUSE_S[2])
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
        try:
            self.ec2.attach_volume(volume.id, self.me.instance_id, device)
        except Ec2ApiError as e:
            if e.code != "VolumeInUse":
                raise
            # Another instance attached it between our look and our claim: the next
            # decision sees who holds it (and refuses: one writer per drive).
            log.warning("%s was attached elsewhere meanwhile: looking again", volume.id)
            return
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
        if not volume_ids:
            return
        snaps = self.ec2.drive_snapshots(self.config.drive)  # one fresh read for this pass
        for vid in volume_ids:
            fresh = self.ec2.volume(vid)
            if fresh is None or fresh.attachment is not None or not plan.is_saved(fresh, snaps):
                continue
            log.info("deleting %s: its content is in a completed snapshot", vid)
            try:
                self.ec2.delete_volume(vid)
            except Ec2ApiError as e:
                # The instance that saved it (finishing its save) or another boot was
                # quicker, or something attached it since: not ours to delete any more.
                if e.code not in _GONE_OR_TAKEN:
                    raise
                log.info("left %s alone: %s", vid, e.code)

    def _release_unmounted(self) -> None:
        """The boot failed or lost the drive: remove volumes it made and never wrote.

        Best effort: a failure here is logged, never raised over the error that got here.
        A volume attached to another instance was taken over as the drive: left alone.
        """
        for vid in sorted(self._created_unmounted):
            try:
                fresh = self.ec2.volume(vid)
                if fresh is None:
                    continue
                holder = fresh.attached_instance
                if holder is not None and holder != self.me.instance_id:
                    log.info("leaving %s: %s uses it now", vid, holder)
                    continue
                if holder == self.me.instance_id:
                    self.ec2.detach_volume(vid, self.me.instance_id)
                    self.ec2.wait_detached(vid, self.me.instance_id, timeout=60)
                self.ec2.delete_volume(vid)
                log.info("removed %s: created by this boot, never mounted", vid)
            except XdriveError as e:
                log.warning("could not remove %s (created by this boot, empty): %s", vid, e)
        self._created_unmounted.clear()

    def _mount(self, step: plan.UseVolume, observed: plan.Observed) -> MountedDrive:
        volume = step.volume
        if step.retag:
            # Before the first write: from now on this volume is newer than its snapshots.
            self.ec2.set_volume_generation(volume.id, step.generation)
        device = self._wait_device(volume.id)
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
        if already and filesystem.thaw(mountpoint):
            # An agent killed inside a checkpoint (between fsfreeze -f and -u) leaves the
            # drive frozen: every write would hang. Found by the chaos harness.
            log.warning("%s was left frozen by a killed agent: thawed it", mountpoint)
        filesystem.mount(device, mountpoint, fstype)
        if fstype == "xfs":
            filesystem.grow_filesystem(device, mountpoint, fstype)
        self._created_unmounted.discard(volume.id)
        # Copies this boot made while another instance raced for the drive and never wrote
        # (their content is a completed snapshot or nothing): left, they would be leftovers.
        self._release_unmounted()
        # Made by this instance (this run, or one killed before it): a restore or a new
        # volume. Anything else was reattached, whatever snapshot it once came from.
        made_here = volume.created_by == self.me.instance_id
        return MountedDrive(
            volume_id=volume.id,
            generation=step.generation,
            restored_from=volume.snapshot_id if made_here else None,
            device=device,
            mountpoint=mountpoint,
            formatted=formatted,
            reattached=not made_here,
        )

    def _wait_device(self, volume_id: str) -> Path:
        """The volume's block device, looked for every DEVICE_POLL_S until the timeout."""
        root = Path(self.config.root)
        requested = self.config.volume.device_name
        deadline = time.monotonic() + self.device_timeout_s
        while time.monotonic() < deadline:
            found = find_device(volume_id, root=root, requested_name=requested)
            if found is not None:
                return found
            self.sleep(DEVICE_POLL_S)
        # One last look; raises DeviceNotFound naming every place it looked.
        return resolve_device(volume_id, root=root, requested_name=requested, timeout_s=0)


def _label(drive: str, fstype: str) -> str:
    return drive[: 16 if fstype == "ext4" else 12]
