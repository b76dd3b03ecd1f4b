"""Fixtures and helpers for the sandbox's EC2 side: block plane, fidelity middleware, server.

Needs root (loop devices, mount). Every fixture cleans up in ``finally``: servers stopped,
filesystems unmounted, loop devices freed, moto reset.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, TypeVar

import boto3
import pytest
from botocore.config import Config

from xdrive.sandbox.blocks import BlockPlane
from xdrive.sandbox.fidelity import Ec2Fidelity, reset_moto
from xdrive.sandbox.server import SandboxServer

REGION = "us-east-1"
AMI = "ami-12c6146b"  # any id will do: moto does not validate AMIs by default

T = TypeVar("T")


def wait_until(check: Callable[[], T], timeout: float = 20.0, interval: float = 0.05) -> T:
    """Poll until ``check()`` is truthy and return it; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s: {check}")
        time.sleep(interval)


def loops_bound_to(path: Path) -> list[str]:
    """Loop devices currently bound to ``path`` (``losetup -j``)."""
    out = subprocess.run(
        ["losetup", "-j", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


@dataclass(frozen=True)
class Ec2Sandbox:
    """A running sandbox EC2 endpoint and its parts."""

    server: SandboxServer
    fidelity: Ec2Fidelity
    blocks: BlockPlane
    workdir: Path

    @property
    def url(self) -> str:
        return self.server.url

    def client(self, service: str = "ec2", config: Config | None = None) -> Any:
        make_client: Any = boto3.client  # any service name: the stubs overload on literals
        return make_client(
            service,
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=config or Config(retries={"mode": "standard", "max_attempts": 1}),
        )

    def instance_root(self, instance_id: str) -> Path:
        """A simulated instance's root prefix, registered with the middleware."""
        root = self.workdir / "roots" / instance_id
        root.mkdir(parents=True, exist_ok=True)
        self.fidelity.register_instance(instance_id, root)
        return root

    def run_instance(self, az: str = "us-east-1a", register: bool = True) -> str:
        reply = self.client().run_instances(
            ImageId=AMI, MinCount=1, MaxCount=1, Placement={"AvailabilityZone": az}
        )
        instance_id: str = reply["Instances"][0]["InstanceId"]
        if register:
            self.instance_root(instance_id)
        return instance_id


@pytest.fixture
def block_plane(workdir: Path) -> Iterator[BlockPlane]:
    plane = BlockPlane(workdir / "blocks")
    try:
        yield plane
    finally:
        plane.teardown()


@pytest.fixture
def ec2_sandbox(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Ec2Sandbox]:
    # moto's ~1300 default AMI snapshots make every DescribeSnapshots slow and noisy.
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    reset_moto()
    blocks = BlockPlane(workdir / "blocks")
    fidelity = Ec2Fidelity(blocks)
    server = SandboxServer(fidelity)
    try:
        server.start()
        yield Ec2Sandbox(server=server, fidelity=fidelity, blocks=blocks, workdir=workdir)
    finally:
        server.stop()
        fidelity.close()
        blocks.teardown()
        reset_moto()


@pytest.fixture
def ec2(ec2_sandbox: Ec2Sandbox) -> Any:
    return ec2_sandbox.client()


class Mounts:
    """Mount filesystems for a test; whatever is still mounted is unmounted at the end."""

    def __init__(self) -> None:
        self._points: list[Path] = []

    def mkfs_and_mount(self, device: str, point: Path) -> Path:
        subprocess.run(["mkfs.ext4", "-q", "-F", device], check=True, capture_output=True)
        return self.mount(device, point)

    def mount(self, device: str, point: Path) -> Path:
        point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", device, str(point)], check=True, capture_output=True)
        self._points.append(point)
        return point

    def umount(self, point: Path) -> None:
        subprocess.run(["umount", str(point)], check=True, capture_output=True)
        self._points.remove(point)

    def cleanup(self) -> None:
        for point in reversed(self._points):
            done = subprocess.run(["umount", str(point)], capture_output=True, check=False)
            if done.returncode != 0:
                subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False)
        self._points.clear()


@pytest.fixture
def mounts() -> Iterator[Mounts]:
    tracker = Mounts()
    try:
        yield tracker
    finally:
        tracker.cleanup()
