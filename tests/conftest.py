"""Shared fixtures, and a session-wide check that nothing was left behind."""

from __future__ import annotations

import os
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from xdrive.sandbox.core import Sandbox

pytest_plugins = ["tests.sandbox_fixtures"]


def _loop_devices() -> set[str]:
    out = subprocess.run(["losetup", "-a"], capture_output=True, text=True, check=False).stdout
    return {line.strip() for line in out.splitlines() if line.strip()}


def _mounts() -> set[str]:
    return set(Path("/proc/self/mounts").read_text().splitlines())


_BEFORE: dict[str, set[str]] = {}


def pytest_sessionstart(session: pytest.Session) -> None:
    _BEFORE["loops"] = _loop_devices()
    _BEFORE["mounts"] = _mounts()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if tests leaked loop devices or mounts (cleanup must survive failures)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        return
    leaked_loops = _loop_devices() - _BEFORE.get("loops", set())
    leaked_mounts = _mounts() - _BEFORE.get("mounts", set())
    if leaked_loops or leaked_mounts:
        print("\nLEAK: tests left behind:")
        for item in sorted(leaked_loops | leaked_mounts):
            print("  ", item)
        session.exitstatus = 1


@pytest.fixture
def child_procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Processes a test starts: killed (if still running) and reaped after it, pass or fail."""
    procs: list[subprocess.Popen[bytes]] = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A short path (unix sockets under it must stay < 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
    yield path
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


@pytest.fixture
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    """A whole local AWS, torn down (agents, dockerd, mounts, loop devices) even on failure.

    Its agents run under the generated agent policy: a test that did not ask for denials
    (``@pytest.mark.policy_denials``) fails if the policy refused the agent anything.
    """
    sb = Sandbox().start()
    try:
        yield sb
    finally:
        denials = sb.fidelity.policy_denials()
        sb.close()
    if request.node.get_closest_marker("policy_denials") is None:
        assert denials == (), f"the agent policy refused: {denials}"
