"""The watch loop: each event once, failing monitors back off alone (never for long), a
SIGTERM ends the watch at once; the monitors against a real IMDS simulator."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest

from xdrive.agent.imds import ImdsClient
from xdrive.agent.watch import (
    MAX_BACKOFF_S,
    Event,
    InterruptionMonitor,
    PeriodicCheckpoint,
    RebalanceMonitor,
    WatchLoop,
    backoff_delay,
    describe_watch,
)
from xdrive.errors import ImdsError
from xdrive.sandbox.imds import ImdsFaults, ImdsIdentity, ImdsServer

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)


class Clock:
    """A monotonic clock that moves only when the loop waits (through the stop event)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class TickingStop(threading.Event):
    """``stop_requested`` whose wait() advances the fake clock instead of sleeping."""

    def __init__(self, clock: Clock, stop_after_s: float) -> None:
        super().__init__()
        self.clock = clock
        self.stop_after_s = stop_after_s
        self.waits: list[float] = []

    def wait(self, timeout: float | None = None) -> bool:
        self.waits.append(timeout or 0.0)
        self.clock.now += timeout or 0.0
        if self.clock.now >= self.stop_after_s:
            self.set()
        return self.is_set()


class Scripted:
    """A monitor answering from a list, one entry per poll (an exception is raised)."""

    def __init__(self, name: str, answers: list[object], clock: Clock) -> None:
        self.name = name
        self.answers = answers
        self.clock = clock
        self.polled_at: list[float] = []

    def poll(self) -> list[Event]:
        self.polled_at.append(self.clock.now)
        answer = self.answers.pop(0) if self.answers else []
        if isinstance(answer, BaseException):
            raise answer
        assert isinstance(answer, list)
        return answer


def run_loop(monitors: list[Scripted], clock: Clock, stop_after_s: float = 30.0):
    stop = TickingStop(clock, stop_after_s)
    seen: list[Event] = []

    def on_event(event: Event) -> bool:
        seen.append(event)
        return event.kind == "terminate"

    loop = WatchLoop(monitors, 1.0, stop, on_event, monotonic=clock)
    return loop.run(), seen, stop


def test_a_posted_notice_is_reported_once_and_terminate_ends_the_watch() -> None:
    clock = Clock()
    rebalance = Event("rebalance", T0, "r")
    terminate = Event("terminate", T0 + timedelta(minutes=2), "i")
    interruption = Scripted("i", [[], [], [], [terminate]], clock)
    recommendations = Scripted("r", [[rebalance]] * 10, clock)
    ended, seen, _ = run_loop([interruption, recommendations], clock)
    assert ended == terminate
    assert seen == [rebalance, terminate]  # the rebalance stayed posted: reported once


def test_sigterm_ends_the_watch_with_a_shutdown_event() -> None:
    clock = Clock()
    quiet = Scripted("i", [], clock)
    ended, seen, _ = run_loop([quiet], clock, stop_after_s=3.5)
    assert ended.kind == "shutdown" and seen == []


def test_sigterm_before_the_first_poll_polls_nothing() -> None:
    clock = Clock()
    quiet = Scripted("i", [], clock)
    stop = TickingStop(clock, 0)
    stop.set()
    loop = WatchLoop([quiet], 1.0, stop, lambda e: True, monotonic=clock)
    assert loop.run().kind == "shutdown"
    assert quiet.polled_at == []


def test_a_failing_monitor_backs_off_alone_and_never_for_long() -> None:
    clock = Clock()
    failing = Scripted("i", [ImdsError("IMDS down")] * 8, clock)
    healthy = Scripted("r", [], clock)
    ended, _, _ = run_loop([failing, healthy], clock, stop_after_s=60)
    assert ended.kind == "shutdown"
    assert healthy.polled_at == [float(t) for t in range(60)]  # every tick, unaffected
    gaps = [b - a for a, b in zip(failing.polled_at, failing.polled_at[1:])]
    assert gaps[:4] == [1.0, 2.0, 4.0, 5.0]  # doubling, capped at MAX_BACKOFF_S
    assert max(gaps) <= MAX_BACKOFF_S
    assert gaps[-1] == 1.0  # healthy again: every tick


def test_a_bug_in_a_monitor_does_not_stop_the_watch() -> None:
    clock = Clock()
    terminate = Event("terminate", T0, "i")
    buggy = Scripted("i", [KeyError("oops"), [terminate]], clock)
    ended, _, _ = run_loop([buggy], clock)
    assert ended == terminate


def test_ticks_keep_their_cadence() -> None:
    clock = Clock()

    class Slow(Scripted):
        def poll(self) -> list[Event]:
            self.clock.now += 0.3  # each poll takes 0.3 s
            return super().poll()

    slow = Slow("i", [], clock)
    _, _, stop = run_loop([slow], clock, stop_after_s=5)
    assert stop.waits[:3] == pytest.approx([0.7, 0.7, 0.7])


def test_backoff_delay() -> None:
    assert [backoff_delay(2.0, n) for n in (1, 2, 3, 4)] == [2.0, 4.0, 5.0, 5.0]
    assert backoff_delay(10.0, 3) == 10.0  # a poll slower than the cap: one interval


def test_periodic_checkpoint() -> None:
    clock = Clock()
    periodic = PeriodicCheckpoint(600, monotonic=clock)
    assert periodic.poll() == []
    clock.now = 600
    (event,) = periodic.poll()
    assert event.kind == "periodic"
    assert periodic.poll() == []
    clock.now = 1199
    assert periodic.poll() == []
    clock.now = 1200
    assert len(periodic.poll()) == 1


def test_describe_watch() -> None:
    assert describe_watch([]).startswith("watching for nothing")
    clock = Clock()
    assert describe_watch([PeriodicCheckpoint(60, monotonic=clock)]) == (
        "watching for periodic checkpoint"
    )


# --- the monitors against the IMDS simulator ----------------------------------------------


@pytest.fixture
def imds() -> Iterator[ImdsServer]:
    identity = ImdsIdentity("i-0123456789abcdef0", "us-east-1a", "us-east-1", "t3.micro", "spot")
    with ImdsServer(identity) as server:
        yield server


def test_interruption_monitor_reads_every_action(imds: ImdsServer) -> None:
    client = ImdsClient(imds.url, attempts=1)
    monitor = InterruptionMonitor(client)
    assert monitor.poll() == []
    at = imds.issue_interruption("stop", T0 + timedelta(minutes=2))
    (event,) = monitor.poll()
    assert (event.kind, event.time) == ("stop", at)
    at = imds.issue_interruption("terminate", T0 + timedelta(minutes=3))
    (event,) = monitor.poll()
    assert (event.kind, event.time) == ("terminate", at)
    client.close()


def test_rebalance_monitor(imds: ImdsServer) -> None:
    client = ImdsClient(imds.url, attempts=1)
    monitor = RebalanceMonitor(client)
    assert monitor.poll() == []
    at = imds.issue_rebalance(T0)
    (event,) = monitor.poll()
    assert (event.kind, event.time) == ("rebalance", at)
    client.close()


def test_the_notice_is_never_cached(imds: ImdsServer) -> None:
    client = ImdsClient(imds.url, attempts=1)
    monitor = InterruptionMonitor(client)
    for _ in range(3):
        assert monitor.poll() == []
    imds.issue_interruption("terminate", T0)
    assert monitor.poll()[0].kind == "terminate"
    assert imds.request_count("/latest/meta-data/spot/instance-action") == 4
    client.close()


def test_a_run_of_401s_delays_the_notice_but_does_not_lose_it(imds: ImdsServer) -> None:
    """The loop with the real client: each read renews the token on a 401; reads that still
    fail back off briefly; the notice is reported once IMDS answers again."""
    client = ImdsClient(imds.url, attempts=2, backoff_s=0.01)
    imds.issue_interruption("terminate", T0)
    imds.set_faults(ImdsFaults(fail_next_reads_with_401=9))
    stop = threading.Event()
    loop = WatchLoop([InterruptionMonitor(client)], 0.05, stop, lambda e: e.kind == "terminate")
    timer = threading.Timer(20, stop.set)  # a safety net, not a timing assertion
    timer.start()
    try:
        ended = loop.run()
    finally:
        timer.cancel()
        client.close()
    assert ended.kind == "terminate"
    assert imds.status_counts()[401] == 9


def test_a_malformed_notice_is_read_as_a_termination_now(imds: ImdsServer) -> None:
    """Something is posted at spot/instance-action that the agent cannot read: save now."""

    class Garbled(ImdsClient):
        def read(self, path: str) -> str | None:
            return "{not json" if path == "spot/instance-action" else super().read(path)

    client = Garbled(imds.url, attempts=1)
    before = datetime.now(timezone.utc)
    (event,) = InterruptionMonitor(client).poll()
    assert event.kind == "terminate" and event.time >= before
    client.close()
