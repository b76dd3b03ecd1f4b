"""`xdrive-agent`: the systemd service that restores the drive at boot and saves it at the end.

    xdrive-agent run [--config /etc/xdrive/agent.json]    # what the unit runs
    xdrive-agent status [--json]                          # what it is doing, for humans/scripts
    xdrive-agent check-config [--config PATH]             # validate without touching anything

argparse, not click: the agent runs on the distribution's Python with few packages.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from xdrive import __version__
from xdrive.agent import files
from xdrive.agent.boot import BootRunner, MountedDrive
from xdrive.agent.config import DEFAULT_CONFIG_PATH, AgentConfig, load_config
from xdrive.agent.docker_setup import DockerControl, read_daemon_json
from xdrive.agent.dockerize import configure_docker, start_docker_on_drive
from xdrive.agent.imds import ImdsClient, InstanceIdentity, InterruptionNotice
from xdrive.agent.notify import Notifier, setup_logging
from xdrive.agent.save import CheckpointRunner, Saver, SaveRequest, deadline_from_notice
from xdrive.agent.state import AgentStatus, SaveRecord, initial_status, read_status, status_path
from xdrive.agent.watch import (
    Event,
    InterruptionMonitor,
    Monitor,
    PeriodicCheckpoint,
    RebalanceMonitor,
    WatchLoop,
    describe_watch,
)
from xdrive.ec2 import Ec2, make_ec2_client
from xdrive.errors import ConfigError, DriveBusy, XdriveError

log = logging.getLogger("xdrive.agent")
# IMDS reads of the instance profile's credentials before boto3 gives up (see make_ec2_client).
CREDENTIAL_ATTEMPTS = 5

EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus, retrying cannot help
EXIT_BUSY = 75  # EX_TEMPFAIL: another instance holds the drive; systemd retries later
# A save on SIGTERM gets this long: the unit's TimeoutStopSec is 150 s
# (cloudinit/units.py STOP_TIMEOUT_S), and the agent must exit before systemd kills it.
SHUTDOWN_BUDGET_S = 140.0


class StatusFile:
    """The agent's state for `xdrive-agent status`, rewritten atomically on every change
    (from the main thread and the checkpoint thread, hence the lock)."""

    def __init__(self, path: Path, status: AgentStatus) -> None:
        self.path = path
        self.current = status
        self._lock = threading.Lock()
        self.write()

    def update(self, **changes: object) -> None:
        with self._lock:
            self.current = self.current.with_(**changes)
            self._write_locked()

    def write(self) -> None:
        with self._lock:
            self._write_locked()

    def _write_locked(self) -> None:
        stamped = self.current.with_(
            updated_at=datetime.now(timezone.utc).isoformat(timespec="seconds"), pid=os.getpid()
        )
        files.write_atomic(self.path, stamped.to_json(), 0o644)


class Agent:
    def __init__(self, config: AgentConfig, imds: ImdsClient, notifier: Notifier) -> None:
        self.config = config
        self.imds = imds
        self.notifier = notifier
        self.stop_requested = threading.Event()
        self.docker = DockerControl(
            start_argv=config.docker.start_command, stop_argv=config.docker.stop_command
        )
        state_dir = config.host_path(config.state_dir)
        self.status = StatusFile(status_path(state_dir), initial_status(state_dir, config.drive))

    def run(self) -> int:
        me = self.imds.identity()
        try:
            self._preflight(me)
        except ConfigError as e:  # nothing was touched yet; no restart would help
            log.error("%s", e)
            self.status.update(phase="failed", message=str(e))
            self.notifier.status(f"bad configuration: {e}")
            return EXIT_CONFIG
        self.status.update(
            phase="restoring",
            instance_id=me.instance_id,
            availability_zone=me.availability_zone,
            mountpoint=str(self.config.mount_path),
        )
        client = make_ec2_client(
            self.config.region or me.region,
            self.config.ec2_endpoint,
            credential_attempts=CREDENTIAL_ATTEMPTS,
        )
        ec2 = Ec2(client)
        drive = BootRunner(self.config, ec2, me, self.notifier).restore_drive()
        summary = f"mounted {drive.describe()} at {self.config.mountpoint}"
        self.status.update(
            volume_id=drive.volume_id,
            restored_from=drive.restored_from,
            generation=drive.generation,
            device=str(drive.device),
        )
        if self.config.docker.enabled:
            configure_docker(self.config)
        # READY before docker starts: docker.service is ordered After= this unit, so a
        # blocking start before READY would wait forever (see docs/ARCHITECTURE.md).
        self.notifier.ready(summary)
        if self.config.docker.enabled:
            self.notifier.status(f"{summary}; starting docker")
            root = start_docker_on_drive(self.config, self.docker)
            summary += f"; docker on {self.config.mountpoint}/docker"
            self.status.update(docker_root=root)
        monitors = self._monitors(me)
        summary += f"; {describe_watch(monitors)}"
        self.status.update(phase="ready", message=summary, watching=tuple(m.name for m in monitors))
        self.notifier.status(summary)
        return self._watch_then_save(ec2, me, drive, monitors, summary)

    def _preflight(self, me: InstanceIdentity) -> None:
        """What the config can only be checked against on the instance, before EC2 is
        touched: past this point a failure would leave the drive mounted and unwatched."""
        if self.config.region and self.config.region != me.region:
            # Volumes attach only within the instance's region: a drive looked for elsewhere
            # would be "new" there, and an empty volume made for nothing.
            raise ConfigError(
                f"the config sets region {self.config.region!r} but this instance runs in "
                f"{me.region!r}",
                "remove 'region' from the agent config (the default is the instance's own) "
                "or launch the instance in the drive's region",
            )
        if self.config.docker.enabled:
            read_daemon_json(self.config.host_path(self.config.docker.daemon_json))

    def _monitors(self, me: InstanceIdentity) -> list[Monitor]:
        monitors: list[Monitor] = []
        if me.life_cycle == "spot":
            monitors.append(InterruptionMonitor(self.imds))
            if self.config.watch.checkpoint_on_rebalance:
                monitors.append(RebalanceMonitor(self.imds))
        if self.config.watch.checkpoint_interval_s:
            monitors.append(PeriodicCheckpoint(self.config.watch.checkpoint_interval_s))
        return monitors

    def _watch_then_save(
        self,
        ec2: Ec2,
        me: InstanceIdentity,
        drive: MountedDrive,
        monitors: list[Monitor],
        summary: str,
    ) -> int:
        """Watch until the end, then save once, whatever ended the watch.

        - terminate notice: the full save, by the notice's time.
        - stop/hibernate notice: the instance will resume with the drive's volume still
          attached. Checkpoint at once (a hibernation brings no shutdown at all); the OS
          shutdown of a stop (SIGTERM) then gets the full save without the detach: the
          instance starts again on the same volume (no restore, no lazy loading), and the
          final snapshot holds the drive should it never start again.
        - rebalance recommendation, periodic timer: a checkpoint; work goes on.
        - SIGTERM (shutdown, user termination, `systemctl stop`): the full save, by the
          unit's stop timeout, or by a notice's time if one is posted.
        """
        saver = Saver(self.config, ec2, me, self.notifier, self.docker)

        def checkpointed(record: SaveRecord) -> None:
            self.status.update(last_checkpoint=record)
            self.notifier.status(f"{summary}; last checkpoint {record.snapshot_id}")

        checkpoints = CheckpointRunner(saver, drive, checkpointed)
        spot_stop: list[Event] = []  # stop/hibernate notices seen: the instance resumes later

        def on_event(event: Event) -> bool:
            if event.kind == "terminate":
                return True
            if event.kind in ("stop", "hibernate"):
                # The volume stays attached and the instance resumes with it: checkpoint now
                # (a hibernation gets no shutdown; a stop's shutdown saves through systemd).
                spot_stop.append(event)
                checkpoints.start(f"spot-{event.kind}", time.monotonic())
            elif event.kind in ("rebalance", "periodic"):
                checkpoints.start(event.kind, time.monotonic())
            return False

        event = WatchLoop(
            monitors, self.config.watch.poll_interval_s, self.stop_requested, on_event
        ).run()
        request = self._save_request(event, me, stopping=spot_stop[-1].kind if spot_stop else None)
        # A frozen drive would keep docker from stopping: the checkpoint ends first.
        checkpoints.finish(timeout_s=min(10.0, max(1.0, (request.deadline - time.monotonic()) / 6)))
        self.status.update(phase="saving", message=f"saving ({request.reason})")
        try:
            record = saver.save_drive(drive, request)
        except XdriveError as e:
            self.status.update(phase="failed", message=f"save failed: {e}")
            raise
        self.status.update(phase="saved", last_save=record, message=self.notifier.last_status)
        self.notifier.status(
            f"saved {drive.volume_id} as {record.snapshot_id} ({record.kind}, {request.reason})"
        )
        if request.reason == "spot-interruption" and event.kind != "shutdown":
            # The instance is about to go: stay, with nothing left to do, until systemd stops
            # us, so a SIGTERM arriving now does not find a unit that already exited.
            self.stop_requested.wait()
        return 0

    def _save_request(
        self, event: Event, me: InstanceIdentity, stopping: Optional[str] = None
    ) -> SaveRequest:
        """Exactly one save follows the watch, whatever ended it; its deadline is the
        earliest known: the notice's time, or systemd's stop timeout."""
        now = time.monotonic()
        shutdown_deadline = now + SHUTDOWN_BUDGET_S
        if event.kind == "terminate":
            deadline = deadline_from_notice(event.time, now, datetime.now(timezone.utc))
            return SaveRequest("spot-interruption", deadline, now)
        # SIGTERM: a notice posted since the last poll still sets the deadline and reason.
        notice = self._notice_now(me)
        if notice is not None and notice.action == "terminate":
            deadline = deadline_from_notice(notice.time, now, datetime.now(timezone.utc))
            return SaveRequest("spot-interruption", min(deadline, shutdown_deadline), now)
        if notice is not None and notice.action in ("stop", "hibernate"):
            stopping = notice.action
        if stopping:
            return SaveRequest(f"spot-{stopping}", shutdown_deadline, now, detach=False)
        return SaveRequest("shutdown", shutdown_deadline, now)

    def _notice_now(self, me: InstanceIdentity) -> Optional[InterruptionNotice]:
        if me.life_cycle != "spot":
            return None
        quick = ImdsClient(self.config.imds_url, timeout_s=0.5, attempts=1)
        try:
            return quick.interruption()
        except XdriveError as e:
            log.info("no interruption notice readable at shutdown: %s", e)
            return None
        finally:
            quick.close()


def _install_signal_handlers(stop: threading.Event) -> None:
    def handler(signum: int, _frame: object) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def cmd_run(args: argparse.Namespace) -> int:
    setup_logging(args.verbose)
    notifier = Notifier()
    try:
        config = load_config(Path(args.config))
    except ConfigError as e:
        log.error("%s", e)
        notifier.status(f"bad configuration: {e}")
        return EXIT_CONFIG
    agent = Agent(config, ImdsClient(config.imds_url), notifier)
    _install_signal_handlers(agent.stop_requested)
    try:
        return agent.run()
    except DriveBusy as e:
        log.error("%s", e)
        agent.status.update(phase="failed", message=str(e))
        notifier.status(f"waiting: {e}")
        return EXIT_BUSY
    except XdriveError as e:
        log.error("%s", e)
        agent.status.update(phase="failed", message=str(e))
        notifier.status(f"failed: {e}")
        return 1


def cmd_status(args: argparse.Namespace) -> int:
    try:
        config = load_config(Path(args.config))
    except ConfigError as e:
        print(f"xdrive-agent: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    status = read_status(config.host_path(config.state_dir))
    if status is None:
        print("xdrive-agent: not started yet (no status file)", file=sys.stderr)
        return 3
    if args.json:
        print(json.dumps(asdict(status), indent=2, sort_keys=True))
        return 0
    print(_human_status(status))
    return 0


def _human_status(s: AgentStatus) -> str:
    rows: list[tuple[str, str]] = []
    if s.volume_id:
        origin = f" from {s.restored_from}" if s.restored_from else ""
        rows.append(("volume", f"{s.volume_id}{origin}, generation {s.generation}"))
        rows.append(("mounted at", f"{s.mountpoint} ({s.device})"))
    if s.docker_root:
        rows.append(("docker root", s.docker_root))
    if s.watching:
        rows.append(("watching", ", ".join(s.watching)))
    for label, rec in (("last save", s.last_save), ("last checkpoint", s.last_checkpoint)):
        if rec:
            rows.append((label, _describe_record(rec)))
    rows.append(("instance", f"{s.instance_id} in {s.availability_zone}; updated {s.updated_at}"))
    head = f"drive {s.drive}: {s.phase}" + (f" - {s.message}" if s.message else "")
    return "\n".join([head] + [f"  {label + ':':<17}{text}" for label, text in rows])


def _describe_record(rec: SaveRecord) -> str:
    text = (
        f"{rec.snapshot_id} of {rec.volume_id} (generation {rec.generation}, {rec.kind}, "
        f"{rec.reason}) requested {rec.requested_at}"
    )
    if rec.seconds_from_notice is not None:
        text += f", {rec.seconds_from_notice:.1f} s after the notice"
    if rec.seconds_to_deadline is not None and rec.reason == "spot-interruption":
        text += f", {rec.seconds_to_deadline:.0f} s before the deadline"
    done = [
        w
        for w, yes in (
            ("detached", rec.detached),
            ("completed", rec.completed),
            ("volume deleted", rec.volume_deleted),
        )
        if yes
    ]
    return text + (f"; {', '.join(done)}" if done else "")


def cmd_check_config(args: argparse.Namespace) -> int:
    try:
        load_config(Path(args.config))
    except ConfigError as e:
        print(f"xdrive-agent: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    print(f"{args.config}: valid")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xdrive-agent", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"xdrive-agent {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("run", cmd_run, "restore the drive, watch, save (what the systemd unit runs)"),
        ("status", cmd_status, "show what the agent is doing"),
        ("check-config", cmd_check_config, "validate the configuration file"),
    ):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--config", default=str(DEFAULT_CONFIG_PATH))
        p.set_defaults(func=func)
        if name == "run":
            p.add_argument("-v", "--verbose", action="store_true")
        if name == "status":
            p.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Optional[list[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
