"""The e2e machine image: a Debian rootfs made with debootstrap, cached, booted through an overlay.

Built once per recipe (the key hashes suite, mirror, packages, wheels, the files written
into the image and RECIPE_VERSION) in ``$XDRIVE_E2E_CACHE`` (default /var/cache/xdrive-e2e),
then used read-only as the lower layer of an overlayfs per boot, so each instance starts
from a pristine "AMI" in no time. Building needs the Debian mirror and PyPI.

What the image holds, and why (an AMI that already carries what user-data would install):
- every package the "ubuntu" user-data installs (python3-pip, -venv, -boto3, -requests,
  -docker, -systemd, docker.io) plus cloud-init, so the first boot needs no network for apt;
  ``sources.list`` is empty, so cloud-init's ``packages:`` runs apt-get update + install for
  real, offline, and finds them installed;
- the agent's pip requirements as wheels in WHEELS_DIR with /etc/pip.conf pointing pip at
  them (no index): bookworm's python3-docker is 5.0.3, the agent needs >= 6.1, so the
  bootstrap's ``pip install`` does install one package, as it would on a real instance;
- cloud-init: NoCloud only (never probe 169.254.169.254: the container shares the host's
  network), and no network configuration (it would reconfigure the host's interfaces);
- docker.service/docker.socket disabled (as on Amazon Linux: installed, not enabled; the
  user-data enables them once the drive is there), and a daemon.json keeping dockerd off
  the host's network (no bridge, no iptables): the agent must merge data-root into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

RECIPE_VERSION = 1  # bump when the build steps change (the files' texts are in the key)
DEFAULT_CACHE = Path("/var/cache/xdrive-e2e")
DEFAULT_MIRROR = "http://deb.debian.org/debian"
WHEELS_DIR = "/opt/xdrive-e2e/wheels"
BUILD_TIMEOUT_S = 1200

PACKAGES: tuple[str, ...] = (
    "cloud-init",
    "python3",
    "python3-venv",
    "python3-pip",
    "python3-boto3",
    "python3-requests",
    "python3-docker",
    "python3-systemd",
    "docker.io",
    "e2fsprogs",
    "xfsprogs",
    "util-linux",
)

CLOUD_CFG = """\
# xdrive e2e image: the seed is in /var/lib/cloud/seed/nocloud. Never probe the EC2
# metadata address or configure interfaces: this container shares the host's network.
datasource_list: [ NoCloud, None ]
network: {config: disabled}
# minbase has no locales package: the default en_US.UTF-8 cannot be generated.
locale: C.UTF-8
"""
PIP_CONF = f"""\
# xdrive e2e image: no index, only the wheels the image was built with.
[global]
no-index = true
find-links = {WHEELS_DIR}
"""
SOURCES_LIST = "# xdrive e2e image: every package is preinstalled; apt works offline.\n"
# Keep dockerd off the host's network namespace: no docker0, no iptables rules.
DAEMON_JSON = {"bridge": "none", "iptables": False, "ip-forward": False, "ip-masq": False}


class ImageBuildError(RuntimeError):
    """debootstrap, apt or pip failed while building the image."""


@dataclass(frozen=True)
class ImageSpec:
    suite: str = "bookworm"
    mirror: str = DEFAULT_MIRROR
    packages: tuple[str, ...] = PACKAGES
    wheels: tuple[str, ...] = ()  # pip requirements to ship as wheels ("docker>=6.1")

    @property
    def key(self) -> str:
        files = (CLOUD_CFG, PIP_CONF, SOURCES_LIST, json.dumps(DAEMON_JSON, sort_keys=True))
        recipe = {"recipe": RECIPE_VERSION, "files": files, **asdict(self)}
        digest = hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()
        return f"{self.suite}-{digest[:16]}"


def cache_dir() -> Path:
    return Path(os.environ.get("XDRIVE_E2E_CACHE") or DEFAULT_CACHE)


def ensure_image(spec: ImageSpec, cache: Path | None = None) -> Path:
    """The cached rootfs for ``spec``, built first if missing (under a lock: runs may race)."""
    base = cache or cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    image = base / spec.key
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (image / "ready").exists():
            return image / "rootfs"
        _prune_other_images(base, keep=spec.key)
        build = Path(tempfile.mkdtemp(prefix=".build-", dir=base))
        try:
            _build(spec, build / "rootfs")
            (build / "spec.json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
            (build / "ready").write_text("ok\n")
            build.rename(image)
        finally:
            if build.exists():
                _remove_tree(build)
    return image / "rootfs"


def _prune_other_images(base: Path, keep: str) -> None:
    """One image at a time: an older recipe's rootfs is ~800 MB nobody will use again."""
    for entry in base.iterdir():
        if entry.name != keep and (
            re.fullmatch(r"[a-z]+-[0-9a-f]{16}", entry.name) or entry.name.startswith(".build-")
        ):
            _remove_tree(entry)


def _remove_tree(path: Path) -> None:
    """rm -rf, after unmounting what a failed debootstrap may have left mounted inside."""
    prefix = str(path) + "/"
    mounts = [
        line.split()[1]
        for line in Path("/proc/self/mounts").read_text().splitlines()
        if line.split()[1].startswith(prefix)
    ]
    for point in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False, capture_output=True)
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


def _run(argv: Sequence[str], log: Path, *, env: dict[str, str] | None = None) -> None:
    with open(log, "ab") as out:
        out.write(("\n$ " + " ".join(argv) + "\n").encode())
        out.flush()
        proc = subprocess.run(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            timeout=BUILD_TIMEOUT_S,
            check=False,
        )
    if proc.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ImageBuildError(f"{' '.join(argv[:3])} failed ({proc.returncode}):\n{tail}")


def _build(spec: ImageSpec, root: Path) -> None:
    log = root.parent / "build.log"
    # debootstrap's resolver does not follow virtual packages (cloud-init's dependency
    # python3-cryptography needs python3-cffi-backend-api-*): a minimal base, then apt.
    _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=systemd,systemd-sysv,dbus",
            spec.suite,
            str(root),
            spec.mirror,
        ],
        log,
    )
    policy = root / "usr/sbin/policy-rc.d"  # no service starts while packages install
    policy.write_text("#!/bin/sh\nexit 101\n")
    policy.chmod(0o755)
    install = (
        "apt-get update -q && apt-get install -y -q --no-install-recommends "
        + " ".join(spec.packages)
        + " && apt-get clean"
    )
    _run(
        [
            "systemd-nspawn",
            "-q",
            "-D",
            str(root),
            "--register=no",
            "--keep-unit",
            "-E",
            "DEBIAN_FRONTEND=noninteractive",
            "sh",
            "-c",
            install,
        ],
        log,
    )
    policy.unlink()
    if spec.wheels:
        wheels = root / WHEELS_DIR.lstrip("/")
        wheels.mkdir(parents=True)
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--only-binary=:all:",
                "--dest",
                str(wheels),
                *spec.wheels,
            ],
            log,
        )
    _configure(root)


def _configure(root: Path) -> None:
    (root / "etc/cloud/cloud.cfg.d/90-xdrive-e2e.cfg").write_text(CLOUD_CFG)
    (root / "etc/pip.conf").write_text(PIP_CONF)
    (root / "etc/apt/sources.list").write_text(SOURCES_LIST)
    shutil.rmtree(root / "var/lib/apt/lists", ignore_errors=True)
    (root / "var/lib/apt/lists/partial").mkdir(parents=True)
    (root / "etc/docker").mkdir(exist_ok=True)
    (root / "etc/docker/daemon.json").write_text(json.dumps(DAEMON_JSON, indent=2) + "\n")
    subprocess.run(
        ["systemctl", f"--root={root}", "disable", "docker.service", "docker.socket"],
        check=True,
        capture_output=True,
    )
    # An empty machine-id: systemd makes a fresh one at each boot, as on a first boot.
    (root / "etc/machine-id").write_text("")


@dataclass(frozen=True)
class Overlay:
    """A writable copy of the image for one instance: overlayfs over the cached rootfs."""

    lower: Path
    workdir: Path

    @property
    def merged(self) -> Path:
        return self.workdir / "root"


@contextlib.contextmanager
def overlay(lower: Path, workdir: Path) -> Iterator[Overlay]:
    """Mount a fresh overlay of ``lower`` under ``workdir``; unmount and remove it after."""
    layer = Overlay(lower, workdir)
    for sub in ("upper", "work", "root"):
        (workdir / sub).mkdir(parents=True)
    options = f"lowerdir={lower},upperdir={workdir / 'upper'},workdir={workdir / 'work'}"
    subprocess.run(
        ["mount", "-t", "overlay", "overlay", "-o", options, str(layer.merged)],
        check=True,
        capture_output=True,
    )
    try:
        yield layer
    finally:
        subprocess.run(["umount", str(layer.merged)], check=False, capture_output=True)
        if os.path.ismount(layer.merged):
            subprocess.run(["umount", "-l", str(layer.merged)], check=False, capture_output=True)
        subprocess.run(["rm", "-rf", "--one-file-system", str(workdir)], check=False)
