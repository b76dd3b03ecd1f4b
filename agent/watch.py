"""Watching for the end: monitors each do one poll and return events; one loop owns the
ticker, dedupe and backoff (the shape of aws-node-termination-handler).

A notice stays posted until the instance goes, so the loop remembers what it has seen and
reports each event once. A failing monitor backs off alone, and never for longer than AWS's
recommended 5 s poll: a missed interruption notice costs the drive.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal, Protocol

from xdrive.agent.imds import ImdsClient, MalformedNotice
from xdrive.errors import XdriveError

log = logging.getLogger("xdrive.agent.watch")

EventKind = Literal["terminate", "stop", "hibernate", "rebalance", "periodic", "shutdown"]

MAX_BACKOFF_S = 5.0


@dataclass(frozen=True)
class Event:
    kind: EventKind
    # When the action happens (interruption) or was noticed (rebalance, periodic); UTC.
    time: datetime
    source: str

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.time.isoformat())


class Monitor(Protocol):
    name: str

    def poll(self) -> list[Event]: ...


class InterruptionMonitor:
    """spot/instance-action: never cached; a 401 refreshes the token inside the client."""

    name = "spot interruption"

    def __init__(self, imds: ImdsClient) -> None:
        self.imds = imds

    def poll(self) -> list[Event]:
        try:
            notice = self.imds.interruption()
        except MalformedNotice as e:
            # Something is posted there: treat it as a termination due now rather than miss it.
            log.error("unreadable interruption notice (%s): saving now", e)
            return [Event("terminate", datetime.now(timezone.utc), self.name)]
        if notice is None:
            return []
        return [Event(notice.action, notice.time, self.name)]


class RebalanceMonitor:
    name = "rebalance recommendation"

    def __init__(self, imds: ImdsClient) -> None:
        self.imds = imds

    def poll(self) -> list[Event]:
        try:
            notice = self.imds.rebalance()
        except MalformedNotice as e:
            log.warning("unreadable rebalance recommendation: %s", e)
            return []
        return [] if notice is None else [Event("rebalance", notice.notice_time, self.name)]


class PeriodicCheckpoint:
    name = "periodic checkpoint"

    def __init__(self, interval_s: float, monotonic: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.monotonic = monotonic
        self.next_at = monotonic() + interval_s

    def poll(self) -> list[Event]:
        now = self.monotonic()
        if now < self.next_at:
            return []
        self.next_at = now + self.interval_s
        return [Event("periodic", datetime.now(timezone.utc), self.name)]


class WatchLoop:
    """Polls every monitor each tick; returns the first event that ends the watch.

    ``on_event`` is called once per new event and returns True when the watch ends with it.
    A ``shutdown`` event is returned as soon as ``stop_requested`` is set (SIGTERM), between
    polls as well as between ticks. Ticks keep their cadence: a slow poll shortens the wait
    that follows it rather than pushing every later poll back.
    """

    def __init__(
        self,
        monitors: list[Monitor],
        poll_interval_s: float,
        stop_requested: threading.Event,
        on_event: Callable[[Event], bool],
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.monitors = monitors
        self.poll_interval_s = poll_interval_s
        self.stop_requested = stop_requested
        self.on_event = on_event
        self.monotonic = monotonic
        self.seen: set[tuple[str, str]] = set()
        self._skip_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def run(self) -> Event:
        next_tick = self.monotonic()
        while True:
            for monitor in self.monitors:
                if self.stop_requested.is_set():
                    return self._shutdown()
                for event in self._poll(monitor):
                    if event.key in self.seen:
                        continue
                    self.seen.add(event.key)
                    log.info("%s: %s at %s", monitor.name, event.kind, event.time.isoformat())
                    if self.on_event(event):
                        return event
            next_tick += self.poll_interval_s
            now = self.monotonic()
            if next_tick < now:  # the polls took longer than a tick: start afresh
                next_tick = now
            if self.stop_requested.wait(next_tick - now):
                return self._shutdown()

    @staticmethod
    def _shutdown() -> Event:
        return Event("shutdown", datetime.now(timezone.utc), "systemd")

    def _poll(self, monitor: Monitor) -> list[Event]:
        now = self.monotonic()
        if now < self._skip_until.get(monitor.name, 0.0):
            return []
        try:
            events = monitor.poll()
        except Exception as e:
            # Any failure, even a bug: the other monitors, and this one after a short
            # pause, must go on watching.
            n = self._failures.get(monitor.name, 0) + 1
            self._failures[monitor.name] = n
            delay = backoff_delay(self.poll_interval_s, n)
            self._skip_until[monitor.name] = now + delay
            log.warning(
                "%s poll failed (%d in a row; next try in %.1f s): %s",
                monitor.name,
                n,
                delay,
                e,
                # A traceback only for what is not a known failure (a bug), and once.
                exc_info=not isinstance(e, XdriveError) and n == 1,
            )
            return []
        if self._failures.pop(monitor.name, None):
            log.info("%s poll works again", monitor.name)
        return events


def backoff_delay(poll_interval_s: float, failures: int) -> float:
    """Wait before the next poll of a monitor that failed ``failures`` times in a row:
    doubling from one interval, never more than MAX_BACKOFF_S (or one interval if longer)."""
    return min(poll_interval_s * 2 ** (failures - 1), max(MAX_BACKOFF_S, poll_interval_s))


def describe_watch(monitors: list[Monitor]) -> str:
    if not monitors:
        return "watching for nothing (not a spot instance, no periodic checkpoints)"
    return "watching for " + ", ".join(m.name for m in monitors)
