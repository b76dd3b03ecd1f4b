"""Processes by pid and start time: a pid alone may name a new process once the old one
exits; with its start time (from /proc) it names exactly one. Used by the save to end
containers and the processes holding the drive.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Optional

POLL_S = 0.05


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


def send_signal(pid: int, signum: int) -> None:
    """``kill(pid, signum)``; a process already gone is not an error."""
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
        time.sleep(POLL_S)
    return True
