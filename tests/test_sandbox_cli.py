"""`xdrive sandbox ...` end to end: a background sandbox, driven and torn down by the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from xdrive.sandbox.core import Sandbox, SandboxError

pytestmark = pytest.mark.root


XDRIVE = str(Path(sys.executable).parent / "xdrive")  # the console script


def xdrive(state_dir: Path, command: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [XDRIVE, "sandbox", command, "--state-dir", str(state_dir), *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_cli_up_launch_agent_notice_down(workdir: Path) -> None:
    state = workdir / "sb"
    assert xdrive(state, "up").returncode == 0
    try:
        launched = xdrive(state, "launch", "--az", "us-east-1b")
        assert launched.returncode == 0, launched.stderr
        iid = launched.stdout.split()[0]
        started = xdrive(state, "agent-start", iid, "--drive", "cli-test")
        assert started.returncode == 0, started.stderr
        assert "mounted vol-" in started.stdout
        info = json.loads(xdrive(state, "status", "--json").stdout)
        inst = info["instances"][iid]
        assert inst["availability_zone"] == "us-east-1b" and inst["agent_running"]
        assert os.path.ismount(Path(inst["root"]) / "v1")
        assert xdrive(state, "notice", iid, "--in", "60").returncode == 0
    finally:
        down = xdrive(state, "down")
    assert down.returncode == 0, down.stderr
    # Everything the sandbox started is gone: its files, mounts and state.
    assert not (state / "sandbox.json").exists()
    assert str(state) not in Path("/proc/self/mounts").read_text()


def test_cli_without_a_sandbox_says_what_to_do(workdir: Path) -> None:
    for args in (("down",), ("status",), ("launch",)):
        result = xdrive(workdir / "none", *args)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [
            f"xdrive: error: no sandbox is running (no live sandbox in {workdir / 'none'}). "
            "start one with `xdrive sandbox up`"
        ]


def test_unknown_instance_and_double_close_are_clear(sandbox: Sandbox) -> None:
    with pytest.raises(SandboxError, match=r"unknown instance 'i-nope'.*instances in this"):
        sandbox.instance("i-nope")
    with pytest.raises(SandboxError, match="no agent is running"):
        inst = sandbox.launch()
        sandbox.stop_agent(inst.instance_id)
    sandbox.close()
    sandbox.close()  # a second teardown is harmless
    with pytest.raises(SandboxError, match="not running"):
        sandbox.client()
