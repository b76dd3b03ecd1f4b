"""`xdrive sandbox ...`: a local AWS to try xdrive on, no account needed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import click
import requests
from rich.console import Console
from rich.table import Table

from xdrive.errors import XdriveError

DEFAULT_STATE_DIR = Path(os.environ.get("XDRIVE_SANDBOX_DIR", "/tmp/xdrive-sandbox"))
console = Console()


def _state_file(state_dir: Path) -> Path:
    return state_dir / "sandbox.json"


def _running(state_dir: Path) -> Optional[dict[str, Any]]:
    try:
        state: dict[str, Any] = json.loads(_state_file(state_dir).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    try:
        pid = int(state["pid"])
    except (KeyError, ValueError):
        return None
    return state if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _require(state_dir: Path) -> dict[str, Any]:
    state = _running(state_dir)
    if state is None:
        raise XdriveError(
            f"no sandbox is running (no live sandbox in {state_dir})",
            "start one with `xdrive sandbox up`",
        )
    return state


def _call(state_dir: Path, path: str, body: Optional[dict[str, Any]] = None) -> Any:
    state = _require(state_dir)
    url = f"{state['url']}/sandbox/api{path}"
    answer = requests.post(url, json=body or {}, timeout=600)
    data = answer.json()
    if answer.status_code != 200:
        raise XdriveError(f"sandbox: {data.get('error', answer.text)}")
    return data


state_dir_option = click.option(
    "--state-dir",
    type=click.Path(path_type=Path),
    default=DEFAULT_STATE_DIR,
    show_default=True,
    help="where the running sandbox keeps its endpoint and files",
)


@click.group()
def sandbox() -> None:
    """A local AWS (moto + EC2 fidelity + loop devices + IMDS + dockerd per instance).

    \b
    Example:
      xdrive sandbox up
      xdrive sandbox launch --az us-east-1a
      xdrive sandbox agent-start i-0123... --drive work
      xdrive sandbox notice i-0123...
      xdrive sandbox down
    """


@sandbox.command()
@state_dir_option
def up(state_dir: Path) -> None:
    """Start the sandbox in the background and print its endpoint."""
    if _running(state_dir):
        raise XdriveError(f"a sandbox is already running in {state_dir}", "use it, or `down`")
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / "daemon.log", "ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "xdrive.sandbox.daemon", "--state-dir", str(state_dir)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    deadline = time.monotonic() + 30
    while _running(state_dir) is None:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise XdriveError("the sandbox did not start", f"see {state_dir / 'daemon.log'}")
        time.sleep(0.1)
    state = _require(state_dir)
    console.print(f"sandbox up at {state['url']} (pid {state['pid']})")
    console.print(f"  export AWS_ENDPOINT_URL={state['url']}")


@sandbox.command()
@state_dir_option
def down(state_dir: Path) -> None:
    """Stop the sandbox and everything it started (agents, dockerd, loop devices)."""
    state = _require(state_dir)
    pid = int(state["pid"])
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 120
    while _running(state_dir) is not None or _alive(pid):
        if time.monotonic() > deadline:
            raise XdriveError(f"the sandbox (pid {pid}) did not stop", f"kill {pid}")
        time.sleep(0.2)
    console.print("sandbox down")


@sandbox.command()
@state_dir_option
@click.option("--az", default="us-east-1a", show_default=True)
@click.option("--instance-type", default="t3.micro", show_default=True)
@click.option("--on-demand", is_flag=True, help="an on-demand instance (default: spot)")
def launch(state_dir: Path, az: str, instance_type: str, on_demand: bool) -> None:
    """Launch a simulated instance (RunInstances)."""
    body = {"availability_zone": az, "instance_type": instance_type, "spot": not on_demand}
    data = _call(state_dir, "/launch", body)
    console.print(f"{data['instance_id']} in {data['availability_zone']}")


@sandbox.command("agent-start")
@state_dir_option
@click.argument("instance_id")
@click.option("--drive", required=True, help="drive name")
@click.option("--size-gib", default=1, show_default=True)
def agent_start(state_dir: Path, instance_id: str, drive: str, size_gib: int) -> None:
    """Start xdrive-agent on a simulated instance and wait until it is ready."""
    from xdrive.names import validate_drive_name

    validate_drive_name(drive)
    body = {"instance_id": instance_id, "drive": drive, "size_gib": size_gib}
    console.print(_call(state_dir, "/agent/start", body)["status"])


@sandbox.command("agent-stop")
@state_dir_option
@click.argument("instance_id")
def agent_stop(state_dir: Path, instance_id: str) -> None:
    """`systemctl stop xdrive-agent` on a simulated instance: the agent saves the drive."""
    data = _call(state_dir, "/agent/stop", {"instance_id": instance_id})
    console.print(f"agent exited with {data['exit_status']}")


@sandbox.command()
@state_dir_option
@click.argument("instance_id")
@click.option(
    "--action", type=click.Choice(["terminate", "stop", "hibernate"]), default="terminate"
)
@click.option("--in", "in_seconds", default=120.0, show_default=True, help="seconds to go")
def notice(state_dir: Path, instance_id: str, action: str, in_seconds: float) -> None:
    """Post a spot interruption notice to an instance's IMDS."""
    body = {"instance_id": instance_id, "action": action, "in_seconds": in_seconds}
    console.print(
        f"{action} notice posted; instance goes at {_call(state_dir, '/notice', body)['time']}"
    )


@sandbox.command()
@state_dir_option
@click.argument("instance_id")
def rebalance(state_dir: Path, instance_id: str) -> None:
    """Post a rebalance recommendation to an instance's IMDS."""
    data = _call(state_dir, "/rebalance", {"instance_id": instance_id})
    console.print(f"rebalance recommendation at {data['time']}")


@sandbox.command()
@state_dir_option
@click.argument("instance_id")
@click.option("--crash", is_flag=True, help="die without shutdown: nothing is saved")
def terminate(state_dir: Path, instance_id: str, crash: bool) -> None:
    """Terminate an instance (by default after a clean OS shutdown)."""
    _call(state_dir, "/terminate", {"instance_id": instance_id, "graceful": not crash})
    console.print(f"{instance_id} terminated")


@sandbox.command()
@state_dir_option
@click.option("--json", "as_json", is_flag=True)
def status(state_dir: Path, as_json: bool) -> None:
    """The sandbox's endpoint and instances."""
    state = _require(state_dir)
    data = requests.get(f"{state['url']}/sandbox/api/state", timeout=30).json()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    console.print(f"endpoint {data['url']}  files {data['workdir']}")
    table = Table("instance", "zone", "type", "lifecycle", "agent")
    for iid, inst in data["instances"].items():
        agent = f"pid {inst['agent_pid']}" if inst["agent_running"] else "-"
        table.add_row(
            iid, inst["availability_zone"], inst["instance_type"], inst["life_cycle"], agent
        )
    console.print(table)
