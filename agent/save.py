"""The save path: stop docker, unmount, snapshot, detach, before the deadline.

Budgeted backwards from the deadline (the notice's time, or systemd's stop timeout): a slow
container gets what is left after the snapshot's reserve, never more. A filesystem that will
not unmount is frozen instead; that snapshot is consistent but taken while mounted, so it is
tagged as a checkpoint and the next boot treats the volume, not the snapshot, as the truth.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from xdrive import tags
from xdrive.agent import commands, filesystem, plan
from xdrive.agent.boot import MountedDrive
from xdrive.agent.config import AgentConfig
from xdrive.agent.docker_setup import DockerControl
from xdrive.agent.imds import InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.agent.state import SaveRecord
from xdrive.ec2 import Ec2, Snapshot
from xdrive.errors import XdriveError

log = logging.getLogger("xdrive.agent.save")

HOLDER_GRACE_S = 3.0  # SIGTERM to processes holding the drive, then SIGKILL


@dataclass(frozen=True)
class SaveRequest:
    reason: str  # spot-interruption | shutdown | manual | rebalance | periodic
    deadline: float  # time.monotonic() by which the snapshot must have been requested
    noticed_at: float  # time.monotonic() when the reason became known


def deadline_from_notice(notice_time: datetime, now_mono: float, now_wall: datetime) -> float:
    """The notice's wall-clock time as a monotonic deadline."""
    return now_mono + (notice_time - now_wall).total_seconds()


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

    def _left(self, request: SaveRequest) -> float:
        return request.deadline - self.monotonic()

    # --- final save ---------------------------------------------------------------------

    def save_drive(self, drive: MountedDrive, request: SaveRequest) -> SaveRecord:
        """Bring the drive to a final snapshot and detach it. Returns what was saved."""
        reserve = self.config.watch.snapshot_reserve_s
        self.notifier.stopping(
            f"saving {drive.volume_id} ({request.reason}, {self._left(request):.0f} s left)"
        )
        if self.config.docker.enabled:
            self._stop_docker(max(1.0, self._left(request) - reserve))
        os.sync()
        unmounted = self._unmount(drive, max(1.0, self._left(request) - reserve / 2))
        volume = self.ec2.volume(drive.volume_id)
        if volume is None:
            raise XdriveError(f"{drive.volume_id} vanished before it could be saved")
        if unmounted:
            snap = self.ec2.create_snapshot(volume, tags.FINAL, request.reason, self.me.instance_id)
        else:
            with filesystem.frozen(drive.mountpoint, timeout_s=10):
                snap = self.ec2.create_snapshot(
                    volume, tags.CHECKPOINT, request.reason + "-frozen", self.me.instance_id
                )
        record = self._record(snap, volume.generation, request)
        self.notifier.status(
            f"requested {snap.id} of {drive.volume_id} ({record.kind}) "
            f"{record.seconds_from_notice:.1f} s after the {request.reason} notice"
        )
        if unmounted:
            self.ec2.detach_volume(drive.volume_id, self.me.instance_id)
            record = self._finish(drive, snap, record, request)
        return record

    def _stop_docker(self, budget_s: float) -> None:
        self.notifier.status(f"stopping docker (at most {budget_s:.0f} s)")
        try:
            self.docker.stop(timeout_s=budget_s)
        except XdriveError as e:
            # The data matters more than a clean container stop: unmount kills what is left.
            log.warning("docker did not stop cleanly: %s", e)

    def _unmount(self, drive: MountedDrive, budget_s: float) -> bool:
        mountpoint = drive.mountpoint
        if filesystem.is_mounted(mountpoint) is None:
            return True
        deadline = self.monotonic() + budget_s
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if sig is not None:
                holders = [p for p in filesystem.processes_using(mountpoint) if p != os.getpid()]
                log.warning("%s still held by pids %s: sending %s", mountpoint, holders, sig.name)
                for pid in holders:
                    try:
                        os.kill(pid, sig)
                    except ProcessLookupError:
                        pass
                time.sleep(min(HOLDER_GRACE_S, max(0.0, deadline - self.monotonic())))
            try:
                filesystem.unmount(mountpoint, timeout_s=max(1.0, deadline - self.monotonic()))
                log.info("unmounted %s (%s)", mountpoint, drive.volume_id)
                return True
            except (filesystem.MountBusy, commands.CommandFailed) as e:
                log.warning("unmount of %s failed: %s", mountpoint, e)
            if self.monotonic() >= deadline:
                break
        return False

    def _record(self, snap: Snapshot, generation: int, request: SaveRequest) -> SaveRecord:
        return SaveRecord(
            snapshot_id=snap.id,
            volume_id=snap.volume_id,
            generation=generation,
            kind=snap.kind,
            reason=request.reason,
            requested_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            seconds_from_notice=round(self.monotonic() - request.noticed_at, 3),
        )

    def _finish(
        self, drive: MountedDrive, snap: Snapshot, record: SaveRecord, request: SaveRequest
    ) -> SaveRecord:
        """With time left, wait for the snapshot and remove the volume it now holds.

        Without time, the volume stays, tagged; the next boot deletes it once the snapshot
        is completed (plan.cleanup_candidates). Never delete before `completed`.
        """
        try:
            left = max(1.0, self._left(request))
            self.ec2.wait_detached(drive.volume_id, self.me.instance_id, timeout=left)
            self.notifier.status(f"detached {drive.volume_id}; waiting for {snap.id}")
            done = self.ec2.wait_snapshot_completed(snap.id, timeout=max(1.0, self._left(request)))
        except XdriveError as e:
            log.info("leaving %s for the next boot to clean up: %s", drive.volume_id, e)
            return record
        volume = self.ec2.volume(drive.volume_id)
        snaps = self.ec2.drive_snapshots(self.config.drive)
        if volume is not None and volume.attachment is None and plan.is_saved(volume, snaps):
            self.ec2.delete_volume(drive.volume_id)
            log.info("deleted %s: its content is in %s (completed)", drive.volume_id, done.id)
        return SaveRecord(**{**record.__dict__, "completed": True})

    # --- checkpoints (the drive stays in use) --------------------------------------------

    def checkpoint(self, drive: MountedDrive, reason: str, noticed_at: float) -> SaveRecord:
        """Freeze, request a snapshot, thaw once it is pending: work pauses for a moment."""
        volume = self.ec2.volume(drive.volume_id)
        if volume is None:
            raise XdriveError(f"{drive.volume_id} vanished")
        os.sync()
        with filesystem.frozen(drive.mountpoint, timeout_s=10):
            snap = self.ec2.create_snapshot(volume, tags.CHECKPOINT, reason, self.me.instance_id)
        request = SaveRequest(reason=reason, deadline=self.monotonic(), noticed_at=noticed_at)
        record = self._record(snap, volume.generation, request)
        self.notifier.status(f"checkpoint {snap.id} of {drive.volume_id} ({reason}) requested")
        return record
