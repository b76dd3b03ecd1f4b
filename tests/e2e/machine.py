"""A simulated EC2 instance that really boots: sandbox instance + image overlay + container.

The sandbox gives the instance its id, zone, IMDS and (once the agent attaches the drive)
a loop device linked under its root; this module gives it a machine: a fresh overlay of
the cached image, the user-data as a NoCloud seed, systemd booted in a container, and the
device relay standing in for udev. The agent inside runs with its production paths
(root "/", /etc/xdrive/agent.json, /v1); only the endpoints point at the sandbox.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.e2e.devices import DeviceRelay, relayed
from tests.e2e.nspawn import Container, booted
from tests.e2e.rootfs import overlay
from xdrive.agent.config import AgentConfig, DockerSettings, VolumeSettings, WatchSettings
from xdrive.sandbox.core import REGION, Sandbox, SimInstance

SEED_DIR = "var/lib/cloud/seed/nocloud"
IMDS_DROPIN = "etc/systemd/system/xdrive-agent.service.d/10-sandbox-imds.conf"


@dataclass(frozen=True)
class Machine:
    instance: SimInstance
    container: Container
    relay: DeviceRelay
    workdir: Path

    @property
    def instance_id(self) -> str:
        return self.instance.instance_id

    def diagnostics(self) -> str:
        """What to read when a step failed: failed units, the agent's journal, cloud-init."""
        c = self.container
        if not c.is_running():
            return f"{c.name} is not running; console:\n" + _tail(c.console_log, 60)
        parts = [
            c.run("systemctl", "--failed", "--no-pager", check=False).stdout,
            c.journal("-u", "xdrive-agent", "-u", "docker", lines=80),
            c.run("tail", "-n", "60", "/var/log/cloud-init-output.log", check=False).stdout,
            f"relay errors: {self.relay.errors}",
        ]
        return "\n".join(parts)


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(none)"


def agent_config(sandbox: Sandbox, inst: SimInstance, drive: str, *, docker: bool) -> AgentConfig:
    """The config a launch for this instance would put in user-data: production paths,
    the sandbox's endpoints."""
    return AgentConfig(
        drive=drive,
        region=REGION,
        imds_url=inst.imds.url,
        ec2_endpoint=sandbox.url,
        volume=VolumeSettings(size_gib=1, filesystem="ext4"),
        docker=DockerSettings(enabled=docker, stop_timeout_s=30.0),
        watch=WatchSettings(poll_interval_s=1.0),
    )


def seed(root: Path, inst: SimInstance, userdata: bytes) -> None:
    """The NoCloud seed cloud-init reads at first boot, and where boto3 finds IMDS."""
    seed_dir = root / SEED_DIR
    seed_dir.mkdir(parents=True, exist_ok=True)
    (seed_dir / "user-data").write_bytes(userdata)
    (seed_dir / "meta-data").write_text(
        f"instance-id: {inst.instance_id}\nlocal-hostname: {inst.instance_id}\n"
    )
    # The instance profile's credentials come from the instance's IMDS, as on EC2; only
    # its address differs (169.254.169.254 there). No keys anywhere in the machine.
    dropin = root / IMDS_DROPIN
    dropin.parent.mkdir(parents=True, exist_ok=True)
    dropin.write_text(
        "# xdrive e2e: the sandbox instance's metadata service.\n[Service]\n"
        f"Environment=AWS_EC2_METADATA_SERVICE_ENDPOINT={inst.imds.url}/\n"
    )


@contextlib.contextmanager
def boot_machine(
    inst: SimInstance, image: Path, userdata: bytes, workdir: Path
) -> Iterator[Machine]:
    """Boot a fresh copy of ``image`` as ``inst``; stopped, unmounted and removed after."""
    with overlay(image, workdir / "layer") as layer:
        seed(layer.merged, inst, userdata)
        name = "xd-" + inst.instance_id.removeprefix("i-")
        boot = booted(layer.merged, name, workdir / "console.log")
        with boot as container, relayed(inst.root, container.path("/")) as relay:
            yield Machine(inst, container, relay, workdir)
