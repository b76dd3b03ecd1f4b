"""The save path: stop docker, unmount, snapshot, detach, before the deadline.

Budgeted backwards from the deadline (the notice's time, or systemd's stop timeout)::

    start ........... containers_until ....... unmount_until ........ deadline
    | dockerd stops containers | sync, unmount    | snapshot, detach, wait, delete |
                               |<--------- snapshot_reserve_s ------------------->|

Docker's daemon is stopped, never its containers one by one: `docker stop` (or `docker
kill`) marks a container stopped by the user, and a `--restart unless-stopped` container
would then not come back on the next instance. dockerd stops every container in parallel,
each with its own stop timeout; the agent bounds that by SIGKILLing whatever still runs at
``containers_until`` (a signal from outside the daemon is not a user stop). A container
whose main process cannot receive its stop signal (PID 1 of its namespace without a
handler: the kernel drops the signal) is killed as soon as dockerd has signalled it, since
waiting out its stop timeout could not change how it ends.

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
from typing import Any, Callable, Optional

from xdrive import tags
from xdrive.agent import commands, filesystem, plan
from xdrive.agent.boot import MountedDrive
from xdrive.agent.config import AgentConfig
from xdrive.agent.docker_setup import DockerControl
from xdrive.agent.imds import InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.agent.state import SaveRecord
from xdrive.ec2 import Ec2, Snapshot, Volume
from xdrive.errors import ConfigError, PermissionDenied, XdriveError
from xdrive.tags import SnapshotKind

log = logging.getLogger("xdrive.agent.save")

HOLDER_GRACE_S = 3.0  # SIGTERM to processes still holding the drive, then SIGKILL
MIN_CONTAINERS_S = 2.0  # even past the deadline, dockerd gets this long
MIN_UNMOUNT_S = 2.0
AFTER_KILL_S = 5.0  # for dockerd to notice its killed containers and exit
FREEZE_TIMEOUT_S = 10.0
SNAPSHOT_ATTEMPTS = 3  # CreateSnapshot tries in a save (botocore retries inside each)
CHECKPOINT_BUDGET_S = 30.0
DEFAULT_STOP_TIMEOUT_S = 10.0  # docker's, for a container that sets none
# dockerd's default pidfile (/var/run is /run). The sandbox's dockerd uses ROOT/run/docker.pid.
DOCKERD_PIDFILE = "/run/docker.pid"
_POLL_S = 0.05


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


# --- processes, by pid and start time ------------------------------------------------------


def _stat_fields(pid: int) -> Optional[list[str]]:
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.rpartition(")")[2].split()  # the command name may hold spaces


def process_start_time(pid: int) -> Optional[str]:
    """The process's start time in clock ticks: with the pid, it names one process."""
    fields = _stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def process_running(pid: int, started: Optional[str] = None) -> bool:
    """Alive (not a zombie) and, if ``started`` is given, still the same process."""
    fields = _stat_fields(pid)
    if fields is None or fields[0] in ("Z", "X"):
        return False
    return started is None or (len(fields) > 19 and fields[19] == started)


def catches_signal(pid: int, signum: int) -> Optional[bool]:
    """Whether ``pid`` has a handler for ``signum`` (SigCgt), or None if unknown."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    return None


def parse_signal(name: Optional[str]) -> int:
    """A container's StopSignal (``SIGTERM``, ``TERM``, ``15``, or unset) as a number."""
    if not name:
        return int(signal.SIGTERM)
    text = name.strip().upper()
    if text.isdigit():
        return int(text)
    try:
        return int(signal.Signals[text if text.startswith("SIG") else "SIG" + text])
    except KeyError:
        return int(signal.SIGTERM)


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


def _send(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def wait_gone(pids: dict[int, Optional[str]], timeout_s: float) -> bool:
    """Wait until none of ``pids`` (pid -> start time) runs; True if they all ended."""
    deadline = time.monotonic() + max(0.0, timeout_s)
    while any(process_running(p, s) for p, s in pids.items()):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


# --- docker: a bounded daemon stop that never marks containers stopped --------------------


@dataclass(frozen=True)
class ContainerProcess:
    """A running container's main process, as seen before the daemon stops."""

    id: str
    name: str
    pid: int
    started: Optional[str]
    stop_signal: int
    stop_timeout_s: float
    deaf: bool  # PID 1 without a handler for its stop signal: the signal would be dropped

    def running(self) -> bool:
        return process_running(self.pid, self.started)


class _Background:
    """A call run in a thread, waited for with a timeout (the caller decides what next)."""

    def __init__(self, name: str, call: Callable[[], None]) -> None:
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as e:
            self.error = e

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()


class DockerStop:
    """Stop docker (daemon and containers) by ``until``, keeping restart policies intact."""

    def __init__(
        self,
        control: DockerControl,
        docker_url: str,
        pidfile: Path,
        notifier: Notifier,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.docker_url = docker_url
        self.pidfile = pidfile
        self.notifier = notifier
        self.monotonic = monotonic

    def run(self, until: float) -> None:
        api = self._connect()
        containers = self._running_containers(api) if api is not None else []
        deaf = {c.id: c for c in containers if c.deaf}
        stop_watching = self._kill_when_signalled(api, deaf) if api is not None and deaf else None
        left = until - self.monotonic()
        self.notifier.status(
            f"stopping docker: {len(containers)} running container(s), at most {left:.0f} s"
        )
        daemon = self._dockerd()
        stopper = _Background("docker-stop", lambda: self.control.stop(timeout_s=left + 30))
        done = self._wait_stopped(stopper, daemon, until)
        if done and stopper.error is not None and daemon is not None and process_running(*daemon):
            # The stop command failed (no systemctl, a unit error): do what it would have
            # done, so that the daemon, not the agent, stops the containers.
            log.warning("docker stop failed (%s): SIGTERM to dockerd %d", stopper.error, daemon[0])
            _send(daemon[0], signal.SIGTERM)
            wait_gone({daemon[0]: daemon[1]}, until - self.monotonic())
        survivors = [c for c in containers if c.running()]
        if done and survivors:
            # The daemon is gone but its containers run on (live-restore): stop them as
            # dockerd would, within the budget.
            log.warning("dockerd stopped, %d container(s) still run: stopping them", len(survivors))
            for c in survivors:
                _send(c.pid, c.stop_signal)
            longest = max(c.stop_timeout_s for c in survivors)
            wait_gone({c.pid: c.started for c in survivors}, min(until - self.monotonic(), longest))
            survivors = [c for c in survivors if c.running()]
        if survivors:
            names = ", ".join(c.name for c in survivors)
            log.warning("containers still running at the end of their time: SIGKILL to %s", names)
            self.notifier.status(f"killing containers that did not stop in time: {names}")
            for c in survivors:
                _send(c.pid, signal.SIGKILL)
            wait_gone({c.pid: c.started for c in survivors}, AFTER_KILL_S)
        if not done:
            done = stopper.wait(AFTER_KILL_S)
        if stop_watching is not None:
            stop_watching()
        if api is not None:
            api.close()
        if not done:
            log.warning("the docker stop command is still running; going on with the save")
        elif stopper.error is not None:
            # The data matters more than a clean daemon stop: unmount ends what is left.
            log.warning("docker did not stop cleanly: %s", stopper.error)

    def _wait_stopped(
        self, stopper: _Background, daemon: Optional[tuple[int, Optional[str]]], until: float
    ) -> bool:
        """Until the stop command returns, or dockerd is gone, or ``until``.

        At shutdown systemd has stopped docker.service before the agent (the drop-in's
        After=), but docker.socket's stop job waits for the agent: a blocking `systemctl stop
        docker.socket` would hold the save until its timeout. What matters is dockerd being
        gone, so that ends the wait too (found by the e2e boot under systemd).
        """
        while True:
            if stopper.wait(min(0.1, max(0.0, until - self.monotonic()))):
                return True
            if daemon is None or not process_running(*daemon):
                return True
            if self.monotonic() >= until:
                return False

    def _dockerd(self) -> Optional[tuple[int, Optional[str]]]:
        """The running dockerd (pid, start time) from its pidfile, or None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        started = process_start_time(pid)
        return (pid, started) if process_running(pid, started) else None

    def _connect(self) -> Any:
        # Only a running dockerd is asked anything: at shutdown systemd has stopped it
        # already, and a request to docker.socket could start it again.
        if self._dockerd() is None:
            return None
        import docker  # the agent imports the SDK only where it talks to dockerd

        try:
            return docker.APIClient(base_url=self.docker_url, timeout=5)
        except Exception as e:
            log.warning("cannot reach dockerd at %s: %s", self.docker_url, e)
            return None

    def _running_containers(self, api: Any) -> list[ContainerProcess]:
        found = []
        try:
            for summary in api.containers():
                info = api.inspect_container(summary["Id"])
                pid = int(info.get("State", {}).get("Pid") or 0)
                if pid <= 0:
                    continue
                config = info.get("Config") or {}
                stop_signal = parse_signal(config.get("StopSignal"))
                timeout = config.get("StopTimeout")
                found.append(
                    ContainerProcess(
                        id=info["Id"],
                        name=str(info.get("Name", "")).lstrip("/") or info["Id"][:12],
                        pid=pid,
                        started=process_start_time(pid),
                        stop_signal=stop_signal,
                        stop_timeout_s=DEFAULT_STOP_TIMEOUT_S if timeout is None else timeout,
                        deaf=catches_signal(pid, stop_signal) is False,
                    )
                )
        except Exception as e:
            log.warning("cannot list containers (%s): they get the stop command's time", e)
        return found

    def _kill_when_signalled(
        self, api: Any, deaf: dict[str, ContainerProcess]
    ) -> Optional[Callable[[], None]]:
        """SIGKILL each deaf container once dockerd's shutdown has sent it its stop signal.

        Not before: dockerd restarts a container that dies while it is not shutting down.
        Its "kill" event comes after it cancelled the container's restart, and the event
        stream stays open while the daemon shuts down (only its listeners close).
        """
        try:
            stream = api.events(filters={"type": ["container"], "event": ["kill"]}, decode=True)
        except Exception as e:
            log.warning("cannot follow docker events (%s): deaf containers wait their time", e)
            return None
        waiting = dict(deaf)

        def follow() -> None:
            try:
                for event in stream:
                    actor = event.get("Actor") or {}
                    c = waiting.pop(str(event.get("id") or actor.get("ID") or ""), None)
                    if c is not None and c.running():
                        log.info("container %s cannot receive its stop signal: SIGKILL", c.name)
                        _send(c.pid, signal.SIGKILL)
                    if not waiting:
                        return
            except Exception:
                pass  # the stream ends when dockerd exits or when it is closed

        threading.Thread(target=follow, name="docker-events", daemon=True).start()

        def close() -> None:
            try:
                stream.close()
            except Exception:
                pass

        return close


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
            _send(pid, sig)
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
