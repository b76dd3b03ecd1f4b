"""Pieces of the save path that need no sandbox: the budget, which deadline and reason a
save gets, how a container's main process is judged, and the status the agent leaves."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from xdrive.agent import main
from xdrive.agent.config import AgentConfig
from xdrive.agent.imds import ImdsClient, InstanceIdentity
from xdrive.agent.notify import Notifier
from xdrive.agent.processes import (
    catches_signal,
    parse_signal,
    process_running,
    process_start_time,
    wait_gone,
)
from xdrive.agent.save import MIN_CONTAINERS_S, MIN_UNMOUNT_S, deadline_from_notice, plan_budget
from xdrive.agent.state import AgentStatus, SaveRecord, initial_status, read_status, status_path
from xdrive.agent.watch import Event
from xdrive.sandbox.imds import ImdsFaults, ImdsIdentity, ImdsServer

# --- the budget -----------------------------------------------------------------------------


def test_budget_takes_the_reserve_off_the_end() -> None:
    budget = plan_budget(now=100.0, deadline=220.0, reserve_s=20.0)
    assert budget.containers_until == 200.0
    assert budget.unmount_until == 210.0
    assert budget.deadline == 220.0


def test_a_late_save_still_gives_each_step_a_moment() -> None:
    budget = plan_budget(now=100.0, deadline=105.0, reserve_s=20.0)
    assert budget.containers_until == 100.0 + MIN_CONTAINERS_S
    assert budget.unmount_until == budget.containers_until + MIN_UNMOUNT_S


def test_deadline_from_notice() -> None:
    wall = datetime(2026, 1, 1, 12, 0, tzinfo=timezone.utc)
    assert deadline_from_notice(wall + timedelta(seconds=108), 50.0, wall) == 158.0
    assert deadline_from_notice(wall - timedelta(seconds=5), 50.0, wall) == 45.0


def test_the_shutdown_budget_fits_the_unit() -> None:
    from xdrive.cloudinit import units

    assert main.SHUTDOWN_BUDGET_S + 5 <= units.STOP_TIMEOUT_S


# --- processes --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "number"),
    [(None, 15), ("", 15), ("SIGTERM", 15), ("TERM", 15), ("sigint", 2), ("9", 9), ("BOGUS", 15)],
)
def test_parse_signal(name: str | None, number: int) -> None:
    assert parse_signal(name) == number


def test_catches_signal_reads_the_handler_mask(child_procs: list[subprocess.Popen[bytes]]) -> None:
    catcher = subprocess.Popen(["sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"])
    ignorer = subprocess.Popen(["sh", "-c", "trap '' TERM; while true; do sleep 1; done"])
    plain = subprocess.Popen(["sleep", "30"])
    child_procs.extend([catcher, ignorer, plain])
    time.sleep(0.3)  # let the shells install their traps
    assert catches_signal(catcher.pid, signal.SIGTERM) is True
    assert catches_signal(ignorer.pid, signal.SIGTERM) is False  # SIG_IGN is no handler
    assert catches_signal(plain.pid, signal.SIGTERM) is False
    assert catches_signal(2**22 + 12345, signal.SIGTERM) is None  # no such process


def test_a_process_is_named_by_pid_and_start_time(
    child_procs: list[subprocess.Popen[bytes]],
) -> None:
    proc = subprocess.Popen(["sleep", "30"])
    child_procs.append(proc)
    started = process_start_time(proc.pid)
    assert started is not None
    assert process_running(proc.pid, started)
    assert not process_running(proc.pid, str(int(started) + 1))  # a reused pid is another
    proc.kill()
    assert wait_gone({proc.pid: started}, 5.0)  # a zombie counts as gone
    assert not process_running(proc.pid)


# --- which save: reason, deadline, detach -----------------------------------------------------


@pytest.fixture
def imds() -> Iterator[ImdsServer]:
    identity = ImdsIdentity("i-0123456789abcdef0", "us-east-1a", "us-east-1", "t3.micro", "spot")
    with ImdsServer(identity) as server:
        yield server


@pytest.fixture
def agent(imds: ImdsServer, workdir: Path) -> main.Agent:
    config = AgentConfig(drive="units", root=str(workdir), imds_url=imds.url)
    return main.Agent(config, ImdsClient(imds.url), Notifier())


ME = InstanceIdentity("i-0123456789abcdef0", "us-east-1a", "us-east-1", "t3.micro", "spot")


def _shutdown() -> Event:
    return Event("shutdown", datetime.now(timezone.utc), "systemd")


def test_a_notice_sets_the_deadline(agent: main.Agent) -> None:
    at = datetime.now(timezone.utc) + timedelta(seconds=90)
    request = agent._save_request(Event("terminate", at, "imds"), ME, stopping=None)
    assert request.reason == "spot-interruption" and request.detach
    assert request.deadline - time.monotonic() == pytest.approx(90, abs=2)


def test_sigterm_alone_is_a_shutdown_save(agent: main.Agent) -> None:
    request = agent._save_request(_shutdown(), ME, stopping=None)
    assert request.reason == "shutdown" and request.detach
    assert request.deadline - time.monotonic() == pytest.approx(main.SHUTDOWN_BUDGET_S, abs=2)


def test_sigterm_with_a_notice_posted_takes_the_earlier_deadline(
    agent: main.Agent, imds: ImdsServer
) -> None:
    imds.issue_interruption("terminate", datetime.now(timezone.utc) + timedelta(seconds=30))
    request = agent._save_request(_shutdown(), ME, stopping=None)
    assert request.reason == "spot-interruption"
    assert request.deadline - time.monotonic() < 31
    imds.issue_interruption("terminate", datetime.now(timezone.utc) + timedelta(seconds=600))
    request = agent._save_request(_shutdown(), ME, stopping=None)
    assert request.deadline - time.monotonic() <= main.SHUTDOWN_BUDGET_S


def test_sigterm_after_a_stop_notice_keeps_the_volume(agent: main.Agent, imds: ImdsServer) -> None:
    request = agent._save_request(_shutdown(), ME, stopping="stop")
    assert request.reason == "spot-stop" and not request.detach
    request = agent._save_request(_shutdown(), ME, stopping="hibernate")
    assert request.reason == "spot-hibernate" and not request.detach
    imds.issue_interruption("stop", datetime.now(timezone.utc) + timedelta(seconds=60))
    request = agent._save_request(_shutdown(), ME, stopping=None)
    assert request.reason == "spot-stop" and not request.detach


def test_sigterm_with_imds_down_is_still_a_save(agent: main.Agent, imds: ImdsServer) -> None:
    imds.set_faults(ImdsFaults(disabled=True))
    request = agent._save_request(_shutdown(), ME, stopping=None)
    assert request.reason == "shutdown"


def test_an_on_demand_instance_does_not_ask_imds(agent: main.Agent, imds: ImdsServer) -> None:
    on_demand = InstanceIdentity("i-1", "us-east-1a", "us-east-1", "t3.micro", "on-demand")
    imds.reset_counts()
    assert agent._save_request(_shutdown(), on_demand, stopping=None).reason == "shutdown"
    assert imds.request_counts() == {}


# --- the status the agent leaves ----------------------------------------------------------------

RECORD = SaveRecord(
    snapshot_id="snap-0abc",
    volume_id="vol-0def",
    generation=3,
    kind="final",
    reason="spot-interruption",
    requested_at="2026-01-01T12:00:05.000+00:00",
    seconds_from_notice=1.25,
    seconds_to_deadline=113.0,
    detached=True,
    completed=True,
    volume_deleted=True,
)


def test_a_new_run_keeps_the_last_save_and_checkpoint(workdir: Path) -> None:
    checkpoint = SaveRecord("snap-0c", "vol-0def", 3, "checkpoint", "rebalance", "t")
    old = AgentStatus(drive="d", phase="saved", last_save=RECORD, last_checkpoint=checkpoint)
    status_path(workdir).write_text(old.to_json())
    fresh = initial_status(workdir, "d")
    assert fresh.phase == "starting" and fresh.volume_id is None
    assert fresh.last_save == RECORD and fresh.last_checkpoint == checkpoint
    assert initial_status(workdir, "other").last_save is None  # another drive's past is not ours
    status_path(workdir).write_text("{broken")
    assert initial_status(workdir, "d") == AgentStatus(drive="d")


def test_status_files_of_other_versions_still_read(workdir: Path) -> None:
    raw = asdict(AgentStatus(drive="d", last_save=RECORD))
    raw["future_key"] = 1
    raw["last_save"]["future_field"] = "x"
    del raw["last_save"]["volume_deleted"]
    status_path(workdir).write_text(json.dumps(raw))
    read = read_status(workdir)
    assert read is not None and read.last_save is not None
    assert read.last_save.snapshot_id == "snap-0abc" and read.last_save.volume_deleted is False


def test_status_command_shows_last_save_and_checkpoint(workdir: Path) -> None:
    config = AgentConfig(drive="d", root=str(workdir))
    config_path = workdir / "agent.json"
    config_path.write_text(config.to_json())
    checkpoint = SaveRecord("snap-0c", "vol-0def", 3, "checkpoint", "rebalance", "t", 0.5)
    status = AgentStatus(drive="d", phase="ready", last_save=RECORD, last_checkpoint=checkpoint)
    state_dir = config.host_path(config.state_dir)
    state_dir.mkdir(parents=True)
    status_path(state_dir).write_text(status.to_json())
    out = subprocess.run(
        [sys.executable, "-m", "xdrive.agent.main", "status", "--config", str(config_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (save,) = [line for line in out.splitlines() if "last save:" in line]
    assert "snap-0abc of vol-0def (generation 3, final, spot-interruption)" in save
    assert "1.2 s after the notice" in save and "113 s before the deadline" in save
    assert save.endswith("detached, completed, volume deleted")
    (cp,) = [line for line in out.splitlines() if "last checkpoint:" in line]
    assert "snap-0c" in cp and "rebalance" in cp
