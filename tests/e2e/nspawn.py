"""Boot a rootfs with systemd-nspawn and drive its systemd from the host, by PID.

The container is not registered with machined (``--register=no``: the host has no systemd),
so nothing but its PIDs names it: ``script`` (which gives nspawn the pty it wants) ->
``systemd-nspawn`` -> the container's PID 1. Commands run inside with
``nsenter -t <PID 1> -a``, files are read through ``/proc/<PID 1>/root``. It shares the
host's network (no ``--private-network``): the sandbox's IMDS and EC2 on 127.0.0.1 are
reachable as they are.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

# The environment commands get inside: the host's (pytest, venv, AWS_*) must not leak in.
INSIDE_ENV = ("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG=C.UTF-8")
LEADER_TIMEOUT_S = 30.0
BOOTED_STATES = ("running", "degraded", "maintenance", "stopping")


class ContainerError(RuntimeError):
    """The container did not boot, a command inside failed, or it would not stop."""


@dataclass(frozen=True)
class Container:
    name: str
    root: Path  # the directory nspawn booted (on the host)
    console_log: Path  # what the container printed on its console
    process: subprocess.Popen[bytes]  # `script`, nspawn's parent
    leader: int  # the container's PID 1, as the host numbers it

    def path(self, inside: str) -> Path:
        """A path inside the container, seen through its PID 1's root (mounts included)."""
        return Path(f"/proc/{self.leader}/root") / inside.lstrip("/")

    def run(
        self, *argv: str, timeout_s: float = 120.0, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [
            "nsenter",
            "-t",
            str(self.leader),
            "-a",
            "/usr/bin/env",
            "-i",
            *INSIDE_ENV,
            *argv,
        ]
        try:
            proc = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ContainerError(f"{shlex.join(argv)} did not finish within {timeout_s} s") from e
        if check and proc.returncode != 0:
            raise ContainerError(
                f"{shlex.join(argv)} failed ({proc.returncode}) in {self.name}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def systemctl(self, *args: str, timeout_s: float = 120.0) -> str:
        return self.run("systemctl", *args, timeout_s=timeout_s).stdout

    def unit_properties(self, unit: str, *names: str) -> dict[str, str]:
        out = self.run("systemctl", "show", unit, *(f"--property={n}" for n in names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def wait_booted(self, timeout_s: float = 600.0) -> str:
        """Until systemd finished starting up (cloud-final included): running or degraded."""
        deadline = time.monotonic() + timeout_s
        last = ""
        while time.monotonic() < deadline:
            left = max(1.0, deadline - time.monotonic())
            proc = self.run("systemctl", "is-system-running", "--wait", timeout_s=left, check=False)
            state = proc.stdout.strip()
            if state in BOOTED_STATES:
                return state
            # Right after PID 1 starts, its bus is not up yet: systemctl cannot connect.
            last = f"{state or '?'} {proc.stderr.strip()}"
            time.sleep(0.5)
        raise ContainerError(f"{self.name} did not finish booting within {timeout_s} s ({last})")

    def is_running(self) -> bool:
        return self.process.poll() is None

    def journal(self, *args: str, lines: int = 200) -> str:
        proc = self.run("journalctl", "--no-pager", "-n", str(lines), *args, check=False)
        return proc.stdout + proc.stderr

    def poweroff(self, timeout_s: float = 300.0) -> int:
        """`systemctl poweroff` inside (units stop in order: the agent saves) and wait for
        the container to be gone; its exit code."""
        self.run("systemctl", "poweroff", "--no-block", check=False)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ContainerError(f"{self.name} did not power off within {timeout_s} s") from None

    def kill(self, timeout_s: float = 30.0) -> None:
        """Stop it now, by PID: SIGKILL to PID 1 ends its PID namespace and every process
        in it; nspawn then exits and ``script`` with it."""
        if self.is_running():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.leader, signal.SIGKILL)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _is_descendant(pid: int, ancestor: int) -> bool:
    current: int | None = pid
    while current and current > 1:
        current = _parent_of(current)
        if current == ancestor:
            return True
    return False


def _namespace_init_under(ancestor: int) -> int | None:
    """The PID (host numbering) of a descendant that is PID 1 of its own PID namespace."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        nspid = next(
            (line.split()[1:] for line in status.splitlines() if line.startswith("NSpid:")), []
        )
        if len(nspid) >= 2 and nspid[-1] == "1" and _is_descendant(int(entry.name), ancestor):
            return int(entry.name)
    return None


def _wait_for_systemd(process: subprocess.Popen[bytes], console_log: Path) -> int:
    """The container's PID 1 once it runs systemd (nspawn's child execs it after set-up)."""
    deadline = time.monotonic() + LEADER_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise ContainerError(
                f"systemd-nspawn exited with {process.returncode}:\n"
                + console_log.read_text(errors="replace")[-3000:]
            )
        leader = _namespace_init_under(process.pid)
        if leader is not None:
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{leader}/exe").endswith("/systemd"):
                    return leader
        time.sleep(0.05)
    raise ContainerError(f"no systemd in the container after {LEADER_TIMEOUT_S} s")


@contextlib.contextmanager
def booted(
    root: Path, name: str, console_log: Path, *, nspawn_args: Sequence[str] = ()
) -> Iterator[Container]:
    """Boot ``root`` (systemd as PID 1) and yield it once systemd runs; killed afterwards
    if still running (a clean stop is the caller's ``poweroff()``)."""
    nspawn = [
        "systemd-nspawn",
        "--quiet",
        f"--directory={root}",
        f"--machine={name}",
        "--boot",
        "--register=no",
        "--keep-unit",
        "--link-journal=no",
        *nspawn_args,
    ]
    # script: nspawn wants a terminal for the console. Its stdin is a pipe held open and
    # never written: EOF on it would end script, and the container with it.
    process = subprocess.Popen(
        [
            "script",
            "--quiet",
            "--flush",
            "--return",
            "--command",
            shlex.join(nspawn),
            str(console_log),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    container: Container | None = None
    try:
        leader = _wait_for_systemd(process, console_log)
        container = Container(name, root, console_log, process, leader)
        yield container
    finally:
        if container is not None:
            container.kill()
        elif process.poll() is None:
            leader_or_none = _namespace_init_under(process.pid)
            if leader_or_none is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(leader_or_none, signal.SIGKILL)
            process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
        if process.stdin is not None:
            process.stdin.close()
