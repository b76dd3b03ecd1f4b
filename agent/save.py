"""The save path: stop docker, unmount, snapshot, detach, before the deadline.

Budgeted backwards from the deadline (the notice's time, or systemd's stop timeout)::

    start ........... containers_until ....... unmount_until ........ deadline
    | dockerd stops containers | sync, unmount    | snapshot, detach, wait, delete |
                               |<--------- snapshot_reserve_s ------------------->|

Docker is stopped through its daemon (``docker_stop.DockerStop``), so restart policies
survive; whatever still runs at ``containers_until`` is SIGKILLed. Processes still holding
the drive then get SIGTERM, a grace period, and SIGKILL (``processes``).

A filesystem that will not unmount, even after the processes holding it were ended, is
frozen instead; that snapshot is consistent but taken while mounted, so it is tagged as a
checkpoint and the next boot treats the volume, not the snapshot, as the truth.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Optional

from xdrive import tags
from xdrive.agent import commands, filesystem, plan
from xdrive.agent.boot import MountedDrive
from xdrive.agent.config import AgentConfig
from xdrive.agent.docker_setup import DockerControl
from xdrive.agent.docker_stop import DOCKERD_PIDFILE, DockerStop
from xdrive.agent.imds import InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.agent.processes import process_start_time, send_signal, wait_gone
from xdrive.agent.state import SaveRecord
from xdrive.ec2 import Ec2, Snapshot, Volume
from xdrive.errors import ConfigError, PermissionDenied, XdriveError
from xdrive.tags import SnapshotKind

log = logging.getLogger("xdrive.agent.save")

HOLDER_GRACE_S = 3.0  # SIGTERM to processes still holding the drive, then SIGKILL
MIN_CONTAINERS_S = 2.0  # even past the deadline, dockerd gets this long
MIN_UNMOUNT_S = 2.0
FREEZE_TIMEOUT_S = 10.0
SNAPSHOT_ATTEMPTS = 3  # CreateSnapshot tries in a save (botocore retries inside each)
CHECKPOINT_BUDGET_S = 30.0


@dataclass(frozen=True)
class SaveRequest:
    reason: str  # spot-interruption | spot-stop | shutdown | manual
    deadline: float  # time.monotonic() when the instance goes (or systemd kills us)
    noticed_at: float  # time.monotonic() when the reason became known
    # False for a spot stop: the volume stays with the stopped instance, which resumes
    # with it (no restore, no lazy loading); it is unmounted and snapshotted all the same.
    detach: bool = True


def deadline_from_notice(notice_time: datetime, now_mono: float, now_wall: datetime) -> float:
    """The notice's wall-clock time as a monotonic deadline."""
    return now_mono + (notice_time - now_wall).total_seconds()


@dataclass(frozen=True)
class SaveBudget:
    containers_until: float  # SIGKILL what is left of the containers
    unmount_until: float  # stop trying to unmount (then freeze)
    deadline: float


def plan_budget(now: float, deadline: float, reserve_s: float) -> SaveBudget:
    """Split the time to the deadline; the snapshot's reserve comes off the end. A save that
    starts late still gives each step a moment rather than skipping it."""
    containers_until = max(now + MIN_CONTAINERS_S, deadline - reserve_s)
    unmount_until = max(containers_until + MIN_UNMOUNT_S, deadline - reserve_s / 2)
    return SaveBudget(containers_until, unmount_until, deadline)


def freeze(mountpoint: Path) -> bool:
    """Freeze for a consistent snapshot while mounted; False if it could not be frozen.

    A timed-out fsfreeze may still have frozen the filesystem: it is thawed then, so a
    failed freeze never leaves writers blocked.
    """
    try:
        filesystem.freeze(mountpoint, timeout_s=FREEZE_TIMEOUT_S)
        return True
    except XdriveError as e:
        log.error("cannot freeze %s: %s", mountpoint, e)
        thaw(mountpoint)
        return False


def thaw(mountpoint: Path, attempts: int = 3) -> None:
    """Thaw, trying again on failure; never raises: this runs in ``finally`` blocks, and
    writes to the drive stay blocked until it succeeds."""
    for attempt in range(1, attempts + 1):
        try:
            filesystem.thaw(mountpoint)
            return
        except XdriveError as e:
            log.error("cannot thaw %s (attempt %d/%d): %s", mountpoint, attempt, attempts, e)
            time.sleep(0.5)


def _device_of(mountpoint: Path) -> Optional[tuple[int, int]]:
    where = os.path.realpath(mountpoint)
    for entry in reversed(filesystem.read_mountinfo()):
        if entry.mountpoint == where:
            return (entry.major, entry.minor)
    return None


# --- the save -----------------------------------------------------------------------------


class Saver:
    def __init__(
        self,
        config: AgentConfig,
        ec2: Ec2,
        me: InstanceIdentity,
        notifier: Notifier,
        docker: DockerControl,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.ec2 = ec2
        self.me = me
        self.notifier = notifier
        self.docker = docker
        self.monotonic = monotonic

    # --- final save ---------------------------------------------------------------------

    def save_drive(self, drive: MountedDrive, request: SaveRequest) -> SaveRecord:
        """Bring the drive to a final snapshot and (unless a spot stop) detach it."""
        budget = plan_budget(
            self.monotonic(), request.deadline, self.config.watch.snapshot_reserve_s
        )
        self.notifier.stopping(
            f"saving {drive.volume_id} ({request.reason}, "
            f"{request.deadline - self.monotonic():.0f} s left)"
        )
        with ThreadPoolExecutor(1, thread_name_prefix="describe") as pool:
            # Read while docker stops, so the snapshot waits for one call only.
            fresh = pool.submit(self.ec2.volume, drive.volume_id)
            if self.config.docker.enabled:
                self._stop_docker(budget.containers_until)
            self.notifier.status(f"unmounting {drive.mountpoint} ({drive.volume_id})")
            os.sync()
            try:
                unmounted = self._unmount(drive, budget.unmount_until)
            except Exception:
                log.exception("unmounting %s failed: freezing it instead", drive.mountpoint)
                unmounted = False
            volume = self._volume(fresh, drive.volume_id)
        if unmounted:
            snap, record = self._request_snapshot(volume, tags.FINAL, request, SNAPSHOT_ATTEMPTS)
            if request.detach:
                record = self._detach_and_clean_up(drive, snap, record, request)
            return record
        self.notifier.status(f"{drive.mountpoint} will not unmount: freezing it instead")
        # Frozen or not, snapshot: crash-consistent (ext4 and xfs replay their journal) beats
        # nothing, and as a checkpoint it never outranks the volume at the next boot.
        frozen = freeze(drive.mountpoint)
        try:
            _, record = self._request_snapshot(volume, tags.CHECKPOINT, request, SNAPSHOT_ATTEMPTS)
        finally:
            if frozen:
                thaw(drive.mountpoint)
        return record

    def _stop_docker(self, until: float) -> None:
        try:
            DockerStop(
                self.docker,
                self.config.docker.url,
                self.config.host_path(DOCKERD_PIDFILE),
                self.notifier,
                monotonic=self.monotonic,
            ).run(until)
        except Exception:
            # Never lose the save to this step: unmount ends whatever still holds the drive.
            log.exception("stopping docker failed; going on with the save")

    def _volume(self, fresh: Future[Optional[Volume]], volume_id: str) -> Volume:
        try:
            volume = fresh.result()
        except XdriveError as e:
            log.warning("reading %s failed (%s): trying again", volume_id, e)
            volume = self.ec2.volume(volume_id)
        if volume is None:
            raise XdriveError(
                f"{volume_id} vanished before it could be saved",
                "look for it in the EC2 console; the drive's snapshots are not affected",
            )
        return volume

    def _unmount(self, drive: MountedDrive, until: float) -> bool:
        """Unmount; processes holding the drive get SIGTERM, a grace period, then SIGKILL
        (again, while new ones turn up: a killed shell's children may hold its files)."""
        mountpoint = drive.mountpoint
        if filesystem.is_mounted(mountpoint) is None:
            return True
        # A frozen filesystem unmounts but stays alive in the kernel, holding the device: a
        # checkpoint killed midway must not leave the drive so (chaos harness finding).
        if filesystem.thaw(mountpoint):
            log.warning("%s was frozen: thawed it before unmounting", mountpoint)
        device = _device_of(mountpoint)
        sig: Optional[signal.Signals] = None
        idle_rounds = 0  # busy, yet no process to end (a loop device on it): stop trying
        while True:
            if sig is not None and not self._end_holders(mountpoint, sig, until):
                idle_rounds += 1
                time.sleep(0.2)
            # /v1 goes last: while it is mounted, holders are found through it.
            if self._unmount_other_views(mountpoint, device):
                try:
                    filesystem.unmount(mountpoint, timeout_s=max(1.0, until - self.monotonic()))
                    log.info("unmounted %s (%s)", mountpoint, drive.volume_id)
                    return True
                except (filesystem.MountBusy, commands.CommandFailed) as e:
                    log.warning("unmount of %s failed: %s", mountpoint, e)
            if self.monotonic() >= until or idle_rounds >= 3:
                return False
            sig = signal.SIGKILL if sig is not None else signal.SIGTERM

    def _end_holders(self, mountpoint: Path, sig: signal.Signals, until: float) -> bool:
        """Signal the processes holding ``mountpoint`` and wait for them; False if none."""
        holders = [p for p in filesystem.processes_using(mountpoint) if p != os.getpid()]
        if not holders:
            return False
        log.warning("%s still held by pids %s: sending %s", mountpoint, holders, sig.name)
        self.notifier.status(f"ending processes that hold {mountpoint}: {sig.name} to {holders}")
        started = {pid: process_start_time(pid) for pid in holders}
        for pid in holders:
            send_signal(pid, sig)
        wait_gone(started, min(HOLDER_GRACE_S, until - self.monotonic()))
        return True

    @staticmethod
    def _unmount_other_views(mountpoint: Path, device: Optional[tuple[int, int]]) -> bool:
        """Unmount mounts inside the drive (a killed dockerd's overlays keep it busy) and
        bind mounts of it elsewhere (they keep its filesystem live after /v1 is gone),
        deepest first. True if none is left."""
        where = os.path.realpath(mountpoint)
        prefix = where.rstrip("/") + "/"

        def others() -> set[str]:
            return {
                e.mountpoint
                for e in filesystem.read_mountinfo()
                if e.mountpoint != where
                and (e.mountpoint.startswith(prefix) or (e.major, e.minor) == device)
            }

        for point in sorted(others(), key=len, reverse=True):
            result = commands.run(["umount", point], check=False)
            if result.returncode != 0:
                log.warning("cannot unmount %s: %s", point, result.stderr.strip())
        return not others()

    def _request_snapshot(
        self, volume: Volume, kind: SnapshotKind, request: SaveRequest, attempts: int
    ) -> tuple[Snapshot, SaveRecord]:
        self.notifier.status(f"requesting a {kind} snapshot of {volume.id} ({request.reason})")
        started = self.monotonic()
        requested_at = datetime.now(timezone.utc)
        attempt = 1
        while True:
            try:
                snap = self.ec2.create_snapshot(volume, kind, request.reason, self.me.instance_id)
                break
            except (PermissionDenied, ConfigError):
                raise
            except XdriveError as e:
                if attempt >= attempts or self.monotonic() + 1.0 >= request.deadline:
                    raise
                log.warning("CreateSnapshot of %s failed (%s): trying again", volume.id, e)
                attempt += 1
                time.sleep(1.0)
        record = SaveRecord(
            snapshot_id=snap.id,
            volume_id=volume.id,
            generation=volume.generation,
            kind=kind,
            reason=request.reason,
            requested_at=requested_at.isoformat(timespec="milliseconds"),
            seconds_from_notice=round(started - request.noticed_at, 3),
            seconds_to_deadline=round(request.deadline - started, 3),
        )
        self.notifier.status(
            f"requested {snap.id} of {volume.id} ({kind}, generation {volume.generation}) "
            f"{record.seconds_from_notice:.1f} s after the {request.reason} notice"
        )
        return snap, record

    def _detach_and_clean_up(
        self, drive: MountedDrive, snap: Snapshot, record: SaveRecord, request: SaveRequest
    ) -> SaveRecord:
        """Detach; with time left, wait for the snapshot and remove the volume it now holds.

        Without time, the volume stays, tagged; the next boot deletes it once the snapshot
        is completed (plan.cleanup_candidates). Never delete before `completed`.
        """
        try:
            self.ec2.detach_volume(drive.volume_id, self.me.instance_id)
            self.ec2.wait_detached(
                drive.volume_id, self.me.instance_id, timeout=max(1.0, self._left(request))
            )
        except XdriveError as e:
            log.warning("%s did not detach: %s", drive.volume_id, e)
            return record
        record = replace(record, detached=True)
        self.notifier.status(f"detached {drive.volume_id}; waiting for {snap.id} to complete")
        try:
            self.ec2.wait_snapshot_completed(snap.id, timeout=max(1.0, self._left(request)))
        except XdriveError as e:
            log.info("leaving %s for the next boot to clean up: %s", drive.volume_id, e)
            return record
        record = replace(record, completed=True)
        try:
            volume = self.ec2.volume(drive.volume_id)
            snaps = self.ec2.drive_snapshots(self.config.drive)
            if volume is not None and volume.attachment is None and plan.is_saved(volume, snaps):
                self.ec2.delete_volume(drive.volume_id)
                log.info("deleted %s: its content is in %s (completed)", drive.volume_id, snap.id)
                record = replace(record, volume_deleted=True)
        except XdriveError as e:
            log.info("leaving %s for the next boot to clean up: %s", drive.volume_id, e)
        return record

    def _left(self, request: SaveRequest) -> float:
        return request.deadline - self.monotonic()

    # --- checkpoints (the drive stays in use) --------------------------------------------

    def checkpoint(self, drive: MountedDrive, reason: str, noticed_at: float) -> SaveRecord:
        """Freeze, request a snapshot, thaw once it is pending: writes pause for a moment."""
        volume = self.ec2.volume(drive.volume_id)
        if volume is None:
            raise XdriveError(f"{drive.volume_id} vanished", "look for it in the EC2 console")
        os.sync()  # most dirty data goes out before writes are blocked, not while
        request = SaveRequest(
            reason, self.monotonic() + CHECKPOINT_BUDGET_S, noticed_at, detach=False
        )
        if not freeze(drive.mountpoint):
            raise XdriveError(f"cannot freeze {drive.mountpoint}", "no checkpoint was taken")
        try:
            snap, record = self._request_snapshot(volume, tags.CHECKPOINT, request, attempts=1)
        finally:
            thaw(drive.mountpoint)
        self.notifier.status(f"checkpoint {snap.id} of {drive.volume_id} ({reason}) requested")
        return record


class CheckpointRunner:
    """One checkpoint at a time, in a thread of its own: the watch goes on polling for an
    interruption notice while EC2 answers."""

    def __init__(
        self, saver: Saver, drive: MountedDrive, on_record: Callable[[SaveRecord], None]
    ) -> None:
        self.saver = saver
        self.drive = drive
        self.on_record = on_record
        self._thread: Optional[threading.Thread] = None

    def start(self, reason: str, noticed_at: float) -> bool:
        """False if a checkpoint is still running (this one is skipped)."""
        if self.running:
            log.info("a checkpoint is still running: skipping the %s one", reason)
            return False
        self._thread = threading.Thread(
            target=self._run, args=(reason, noticed_at), name="checkpoint", daemon=True
        )
        self._thread.start()
        return True

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _run(self, reason: str, noticed_at: float) -> None:
        try:
            self.on_record(self.saver.checkpoint(self.drive, reason, noticed_at))
        except XdriveError as e:
            log.error("%s checkpoint failed: %s", reason, e)
        except Exception:
            log.exception("%s checkpoint failed", reason)

    def finish(self, timeout_s: float) -> None:
        """Before the save: let a running checkpoint end. If it hangs (EC2 not answering),
        thaw the drive so docker can stop; that checkpoint is then only crash-consistent."""
        thread = self._thread
        if thread is None:
            return
        thread.join(max(0.0, timeout_s))
        if thread.is_alive():
            log.warning("the checkpoint did not finish in %.0f s: thawing the drive", timeout_s)
            thaw(self.drive.mountpoint)
