"""Watching for the end: monitors each do one poll and return events; one loop owns the
ticker, dedupe and backoff (the shape of aws-node-termination-handler)."""

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


@dataclass(frozen=True)
class Event:
    kind: EventKind
    # When the action happens (interruption) or was noticed (rebalance); UTC.
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

    Returns a ``shutdown`` event when ``stop_requested`` is set (SIGTERM). Events seen
    before are dropped (a notice stays posted until the instance goes). A monitor that
    fails backs off alone; the others keep polling.
    """

    def __init__(
        self,
        monitors: list[Monitor],
        poll_interval_s: float,
        stop_requested: threading.Event,
        on_event: Callable[[Event], bool],
    ) -> None:
        self.monitors = monitors
        self.poll_interval_s = poll_interval_s
        self.stop_requested = stop_requested
        self.on_event = on_event  # True: the watch ends with this event
        self.seen: set[tuple[str, str]] = set()
        self._skip_until: dict[str, float] = {}
        self._failures: dict[str, int] = {}

    def run(self) -> Event:
        while True:
            for monitor in self.monitors:
                if self.stop_requested.is_set():
                    return Event("shutdown", datetime.now(timezone.utc), "systemd")
                for event in self._poll(monitor):
                    if event.key in self.seen:
                        continue
                    self.seen.add(event.key)
                    log.info("%s: %s at %s", monitor.name, event.kind, event.time.isoformat())
                    if self.on_event(event):
                        return event
            if self.stop_requested.wait(self.poll_interval_s):
                return Event("shutdown", datetime.now(timezone.utc), "systemd")

    def _poll(self, monitor: Monitor) -> list[Event]:
        now = time.monotonic()
        if now < self._skip_until.get(monitor.name, 0.0):
            return []
        try:
            events = monitor.poll()
        except XdriveError as e:
            n = self._failures.get(monitor.name, 0) + 1
            self._failures[monitor.name] = n
            # Short backoff: a missed notice costs the drive, so never back off far.
            delay = min(self.poll_interval_s * 2**n, 10.0)
            self._skip_until[monitor.name] = now + delay
            log.warning(
                "%s poll failed (%d in a row; retry in %.1f s): %s", monitor.name, n, delay, e
            )
            return []
        self._failures.pop(monitor.name, None)
        return events


def describe_watch(monitors: list[Monitor]) -> str:
    return "watching for " + ", ".join(m.name for m in monitors)
