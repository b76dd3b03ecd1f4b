"""systemd's part in a chaos cycle: run the agent, restart it after failures, kill it on cue.

``AgentSupervisor`` starts ``xdrive-agent run`` on a sandbox instance and restarts it after
any failure (``Restart=on-failure``; 78 = bad config is never retried), with a short
RestartSec so cycles stay fast. ``kill()`` SIGKILLs the agent's process group: the agent
and the commands it runs (mkfs, mount, fsfreeze), as systemd kills a unit's cgroup.
``Workload`` runs the chaos writer (``chaos_workload``) as its own process.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from xdrive.agent.config import AgentConfig
from xdrive.agent.main import EXIT_CONFIG
from xdrive.agent.state import AgentStatus
from xdrive.sandbox.core import Sandbox, SimInstance

WORKLOAD = (sys.executable, "-m", "xdrive.sandbox.chaos_workload")


class AgentSupervisor:
    """One instance's xdrive-agent unit: started, restarted on failure, stopped, killed."""

    def __init__(
        self, sb: Sandbox, inst: SimInstance, config: AgentConfig, restart_delay_s: float
    ) -> None:
        self.sb = sb
        self.inst = inst
        self.config = config
        self.restart_delay_s = restart_delay_s
        self.exits: list[int] = []
        self.starts = 0
        self.started_at = 0.0  # time.monotonic() of the current process's start
        self._start_index = 0
        self._lock = threading.RLock()
        self._done = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"unit-{inst.instance_id}", daemon=True
        )

    # -- the unit ----------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()
        self._thread.start()

    def _spawn(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._start_index = len(self.inst.notify.messages())
            self.sb.start_agent(self.inst.instance_id, self.config)
            self.started_at = time.monotonic()
            self.starts += 1

    def _run(self) -> None:
        while not self._done.is_set():
            proc = self.inst.agent
            if proc is None:
                return
            code = proc.wait()
            with self._lock:
                self.exits.append(code)
            if self._done.is_set() or code in (0, EXIT_CONFIG):
                return
            if self._done.wait(self.restart_delay_s):
                return
            self._spawn()

    @property
    def pid(self) -> Optional[int]:
        proc = self.inst.agent
        return proc.pid if proc is not None else None

    @property
    def start_index(self) -> int:
        return self._start_index

    def alive(self) -> bool:
        proc = self.inst.agent
        return proc is not None and proc.poll() is None

    def since_start(self) -> list[str]:
        """sd_notify messages sent by the current agent process."""
        return self.inst.notify.messages()[self._start_index :]

    def ready(self) -> bool:
        """The current process sent READY=1 (the drive is mounted) and still runs."""
        with self._lock:
            return self.alive() and "READY=1" in self.since_start()

    def status(self) -> Optional[AgentStatus]:
        """The status file, if the current process wrote it."""
        try:
            status = self.inst.status()
        except (ValueError, OSError):  # mid-rewrite is atomic, but be lenient
            return None
        return status if status is not None and status.pid == self.pid else None

    def kill(self) -> bool:
        """SIGKILL the agent and its children; systemd restarts it unless stopping."""
        with self._lock:
            proc = self.inst.agent
            if proc is None or proc.poll() is not None:
                return False
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its own session: pgid == pid
            except ProcessLookupError:
                return False
            proc.wait(timeout=30)
            return True

    def begin_stop(self) -> None:
        """`systemctl stop`: SIGTERM to the agent alone (KillMode=mixed); no restart."""
        with self._lock:
            self._done.set()
            proc = self.inst.agent
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def wait_exit(self, timeout_s: float) -> Optional[int]:
        proc = self.inst.agent
        if proc is None:
            return None
        try:
            return proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return None

    def finish(self) -> None:
        """The instance goes: no more restarts, and whatever still runs is killed."""
        self._done.set()
        with self._lock:
            proc = self.inst.agent
            if proc is not None and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=30)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=10)


def status_seen(messages: list[str], pattern: re.Pattern[str]) -> bool:
    return any(m.startswith("STATUS=") and pattern.search(m[len("STATUS=") :]) for m in messages)


def wait_for_status(
    sup: AgentSupervisor,
    pattern: str,
    since: int,
    until: Callable[[], bool],
    timeout_s: float,
) -> bool:
    """True as soon as a STATUS line matching ``pattern`` arrived after message ``since``;
    False once ``until()`` holds or the time is up."""
    regex = re.compile(pattern)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        messages = sup.inst.notify.messages()
        if status_seen(messages[since:], regex):
            return True
        if until():
            return False
        sup.inst.notify.wait_for(_more_than(len(messages)), 0.05)
    return False


def _more_than(count: int) -> Callable[[list[str]], bool]:
    return lambda messages: len(messages) > count


def device_numbers(sb: Sandbox, volume_id: str) -> Optional[str]:
    """MAJOR:MINOR of the volume's block device in the sandbox, if it is attached."""
    device = sb.blocks.device_of(volume_id)
    if device is None:
        return None
    rdev = os.stat(device).st_rdev
    return f"{os.major(rdev)}:{os.minor(rdev)}"


class Workload:
    """The chaos writer on one instance's /v1, as its own process (the save may kill it)."""

    def __init__(self, log: Path, tag: str, seed: int) -> None:
        self.log = log
        self.tag = tag
        self.seed = seed
        self.proc: Optional[subprocess.Popen[bytes]] = None

    def start(self, mountpoint: Path, rdev: str) -> None:
        self.proc = subprocess.Popen(
            [
                *WORKLOAD,
                "write",
                *("--dir", str(mountpoint), "--rdev", rdev, "--log", str(self.log)),
                *("--tag", self.tag, "--seed", str(self.seed)),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass  # blocked on a frozen filesystem: the caller thaws it, then reaps


@dataclass(frozen=True)
class Verdict:
    """What ``chaos_workload verify`` said: code 0 ok, 1 data missing, else inconclusive."""

    code: int
    report: dict[str, Any]

    @property
    def conclusive(self) -> bool:
        return self.code in (0, 1)


def verify_drive(mountpoint: Path, rdev: str, log: Path, timeout_s: float = 60.0) -> Verdict:
    try:
        done = subprocess.run(
            [*WORKLOAD, "verify", "--dir", str(mountpoint), "--rdev", rdev, "--log", str(log)],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return Verdict(-1, {"error": f"verify took more than {timeout_s:.0f} s"})
    try:
        report = json.loads(done.stdout.strip().splitlines()[-1])
    except (IndexError, json.JSONDecodeError):
        report = {"error": done.stderr.strip()[-500:]}
    return Verdict(done.returncode, report)


def freeze(mountpoint: Path) -> bool:
    """Freeze the filesystem at ``mountpoint`` as a checkpoint does; True if it froze."""
    if not os.path.ismount(mountpoint):
        return False
    done = subprocess.run(
        ["fsfreeze", "-f", str(mountpoint)], capture_output=True, text=True, check=False
    )
    return done.returncode == 0


def thaw(mountpoint: Path) -> bool:
    """Thaw the filesystem at ``mountpoint`` if frozen; True if it was frozen."""
    if not os.path.ismount(mountpoint):
        return False
    done = subprocess.run(
        ["fsfreeze", "-u", str(mountpoint)], capture_output=True, text=True, check=False
    )
    return done.returncode == 0


def release_frozen_loops(prefix: Path) -> list[str]:
    """Free loop devices still bound to files under ``prefix`` after the sandbox closed.

    A filesystem unmounted while frozen keeps its superblock, and so its block device, in
    the kernel: the loop device cannot go. Mounting the device again hands that superblock
    back; thawed and unmounted, the device is released. Returns the devices released.
    """
    released = []
    for backing in Path("/sys/block").glob("loop*/loop/backing_file"):
        try:
            path = backing.read_text().strip()
        except OSError:
            continue
        if not path.startswith(str(prefix).rstrip("/") + "/"):
            continue
        device = f"/dev/{backing.parent.parent.name}"
        point = Path(tempfile.mkdtemp(prefix="xdrive-thaw-"))
        try:
            if subprocess.run(["mount", device, str(point)], capture_output=True).returncode:
                continue
            subprocess.run(["fsfreeze", "-u", str(point)], capture_output=True, check=False)
            subprocess.run(["umount", str(point)], capture_output=True, check=False)
            subprocess.run(["losetup", "-d", device], capture_output=True, check=False)
            released.append(f"{device} ({path})")
        finally:
            point.rmdir()
    return released
