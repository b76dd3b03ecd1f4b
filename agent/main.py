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
from xdrive.agent.docker_setup import DockerControl
from xdrive.agent.dockerize import configure_docker, start_docker_on_drive
from xdrive.agent.imds import ImdsClient, InstanceIdentity
from xdrive.agent.notify import Notifier, setup_logging
from xdrive.agent.save import Saver, SaveRequest, deadline_from_notice
from xdrive.agent.state import AgentStatus, read_status, status_path
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

EXIT_CONFIG = 78  # EX_CONFIG: the unit's RestartPreventExitStatus, retrying cannot help
EXIT_BUSY = 75  # EX_TEMPFAIL: another instance holds the drive; systemd retries later
# systemd's TimeoutStopSec for the unit is 150 s; keep a margin for our own exit.
SHUTDOWN_BUDGET_S = 140.0


class StatusFile:
    """The agent's state for `xdrive-agent status`, rewritten atomically on every change."""

    def __init__(self, path: Path, status: AgentStatus) -> None:
        self.path = path
        self.current = status
        self.write()

    def update(self, **changes: object) -> None:
        self.current = self.current.with_(**changes)
        self.write()

    def write(self) -> None:
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
        self.status = StatusFile(
            status_path(config.host_path(config.state_dir)), AgentStatus(drive=config.drive)
        )

    def run(self) -> int:
        me = self.imds.identity()
        self.status.update(
            phase="restoring",
            instance_id=me.instance_id,
            availability_zone=me.availability_zone,
            mountpoint=str(self.config.mount_path),
        )
        client = make_ec2_client(self.config.region or me.region, self.config.ec2_endpoint)
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
        watching = describe_watch(monitors)
        self.status.update(
            phase="ready",
            message=f"{summary}; {watching}",
            watching=tuple(m.name for m in monitors),
        )
        self.notifier.status(f"{summary}; {watching}")
        return self._watch(ec2, me, drive, monitors)

    def _monitors(self, me: InstanceIdentity) -> list[Monitor]:
        monitors: list[Monitor] = []
        if me.life_cycle == "spot":
            monitors.append(InterruptionMonitor(self.imds))
            if self.config.watch.checkpoint_on_rebalance:
                monitors.append(RebalanceMonitor(self.imds))
        if self.config.watch.checkpoint_interval_s:
            monitors.append(PeriodicCheckpoint(self.config.watch.checkpoint_interval_s))
        return monitors

    def _watch(
        self, ec2: Ec2, me: InstanceIdentity, drive: MountedDrive, monitors: list[Monitor]
    ) -> int:
        saver = Saver(self.config, ec2, me, self.notifier, self.docker)
        noticed: dict[str, float] = {}

        def on_event(event: Event) -> bool:
            noticed[event.kind] = time.monotonic()
            if event.kind == "terminate":
                return True
            if event.kind in ("stop", "hibernate", "rebalance", "periodic"):
                # stop/hibernate keep the volume attached: flush and checkpoint; the OS
                # shutdown that follows a stop runs the full save through systemd.
                try:
                    record = saver.checkpoint(drive, event.kind, noticed[event.kind])
                    self.status.update(last_checkpoint=record)
                except XdriveError as e:
                    log.error("checkpoint failed: %s", e)
            return False

        event = WatchLoop(
            monitors, self.config.watch.poll_interval_s, self.stop_requested, on_event
        ).run()
        now = time.monotonic()
        if event.kind == "terminate":
            deadline = deadline_from_notice(event.time, now, datetime.now(timezone.utc))
            request = SaveRequest("spot-interruption", deadline, noticed[event.kind])
        else:
            request = SaveRequest("shutdown", now + SHUTDOWN_BUDGET_S, now)
        self.status.update(phase="saving")
        record = saver.save_drive(drive, request)
        self.status.update(phase="saved", last_save=record, message=self.notifier.last_status)
        self.notifier.status(
            f"saved {drive.volume_id} as {record.snapshot_id} ({record.kind}, {request.reason})"
        )
        if event.kind == "terminate":
            # The instance is about to go; stay until systemd stops us (nothing left to save).
            self.stop_requested.wait()
        return 0


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
    lines = [f"drive {s.drive}: {s.phase}" + (f" - {s.message}" if s.message else "")]
    if s.volume_id:
        origin = f" from {s.restored_from}" if s.restored_from else ""
        lines.append(f"  volume:      {s.volume_id}{origin}, generation {s.generation}")
        lines.append(f"  mounted at:  {s.mountpoint} ({s.device})")
    if s.docker_root:
        lines.append(f"  docker root: {s.docker_root}")
    if s.watching:
        lines.append(f"  watching:    {', '.join(s.watching)}")
    for label, rec in (("last save", s.last_save), ("last checkpoint", s.last_checkpoint)):
        if rec:
            lines.append(
                f"  {label + ':':<12} {rec.snapshot_id} ({rec.kind}, {rec.reason}) "
                f"at {rec.requested_at}"
            )
    lines.append(f"  instance:    {s.instance_id} in {s.availability_zone}; updated {s.updated_at}")
    return "\n".join(lines)


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
