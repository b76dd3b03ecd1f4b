"""Fixtures for the end-to-end boots: the cached image, the agent download, booted machines.

These tests run only when asked for (``make e2e``, i.e. ``pytest -m e2e tests/e2e``): the
first run builds the image with debootstrap (about a minute, network to the Debian mirror
and PyPI), and each boots real systemd in containers. A plain ``pytest`` skips them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Callable

import pytest

from tests.e2e.archive_server import ArchiveServer
from tests.e2e.machine import Machine, boot_machine
from tests.e2e.rootfs import ImageSpec, ensure_image
from xdrive.cloudinit.bundle import agent_archive, agent_requirements
from xdrive.sandbox.core import SimInstance

TOOLS = ("debootstrap", "systemd-nspawn", "script", "nsenter", "mount")

BootMachine = Callable[[SimInstance, bytes], Machine]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if "e2e" in (config.option.markexpr or ""):
        return
    skip = pytest.mark.skip(reason="boots systemd in containers: run `make e2e` (pytest -m e2e)")
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def e2e_image() -> Path:
    """The cached rootfs (built on first use); asked for explicitly, so missing tools fail."""
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing or os.geteuid() != 0:
        pytest.fail(
            f"the e2e boot needs root and {', '.join(TOOLS)} (missing: {', '.join(missing)}); "
            "run `make setup` as root"
        )
    return ensure_image(ImageSpec(wheels=agent_requirements()))


@pytest.fixture(scope="session")
def agent_download() -> Iterator[ArchiveServer]:
    server = ArchiveServer(agent_archive()).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def boot(e2e_image: Path) -> Iterator[BootMachine]:
    """Boot machines for sandbox instances; each is killed, unmounted and removed at the
    end of the test even if it failed (before the sandbox frees its loop devices)."""
    workdir = Path(tempfile.mkdtemp(prefix="xdrive-e2e-", dir="/tmp"))
    with contextlib.ExitStack() as stack:

        def start(inst: SimInstance, userdata: bytes) -> Machine:
            machine_dir = workdir / inst.instance_id
            machine_dir.mkdir()
            return stack.enter_context(boot_machine(inst, e2e_image, userdata, machine_dir))

        try:
            yield start
        finally:
            stack.close()
            subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
