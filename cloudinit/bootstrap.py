"""First-boot installer of the xdrive agent, run by user-data's runcmd: ``python3 bootstrap.py
SETTINGS.json``. Standard library only, Python 3.9+: it runs on the distribution's python3
before xdrive is importable, and user-data writes it verbatim. Steps, each safe to repeat:
a venv with --system-site-packages (pip adds only what the distribution lacks; never xdrive,
whose PyPI name is another project's); in url mode the agent archive, checked by sha256 and
unpacked as PREFIX/lib; an import and version check; then PREFIX/installed, which the unit
asserts: until it exists neither the agent nor docker (which requires it) can start.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

LIB_NAME = "lib"
VENV_NAME = "venv"
MARKER_NAME = "installed"
FETCH_ATTEMPTS = 5

# With the venv's python (boto3 is there once pip ran) and the instance profile's credentials.
_S3_FETCH = """\
import sys, boto3
bucket, _, key = sys.argv[1][5:].partition("/")
boto3.client("s3").download_file(bucket, key, sys.argv[2])
"""
# What the unit will run: the agent from PREFIX/lib, of the launcher's version, and every
# module it imports, with the venv's python.
_VERIFY = """\
import sys, xdrive, xdrive.agent.main
if not xdrive.__file__.startswith(sys.argv[1] + "/") or xdrive.__version__ != sys.argv[2]:
    sys.exit("imported xdrive %s from %s" % (xdrive.__version__, xdrive.__file__))
"""


class BootstrapError(Exception):
    """A step failed: no marker, so the agent and docker stay down."""


@dataclass(frozen=True)
class BootstrapSettings:
    prefix: str  # /opt/xdrive
    version: str  # the launcher's xdrive version
    requirements: tuple[str, ...]  # the agent's pip requirements: "boto3>=1.26", ...
    agent_url: Optional[str] = None  # https://, http:// or s3://; None: embedded
    agent_sha256: Optional[str] = None  # of the archive at agent_url

    def path(self, name: str) -> Path:
        return Path(self.prefix) / name

    def to_json(self) -> str:
        data = dict(self.__dict__, requirements=list(self.requirements))
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> BootstrapSettings:
        data = json.loads(text)
        return cls(**dict(data, requirements=tuple(data["requirements"])))


def say(message: str) -> None:
    print(f"xdrive-bootstrap: {message}", flush=True)  # to /var/log/cloud-init-output.log


def run(*argv: str, env: Optional[dict[str, str]] = None) -> None:
    say("running " + " ".join(argv))
    if subprocess.run(argv, env=env, check=False).returncode != 0:
        raise BootstrapError(f"{' '.join(argv[:4])} failed")


def fetch(url: str, python: Path, target: Path) -> bytes:
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        try:
            if url.startswith("s3://"):
                run(str(python), "-c", _S3_FETCH, url, str(target))
            else:
                with urllib.request.urlopen(url, timeout=30) as response:
                    target.write_bytes(response.read())
            return target.read_bytes()
        except (OSError, BootstrapError) as e:
            say(f"download attempt {attempt} failed: {e}")
            if attempt < FETCH_ATTEMPTS:
                time.sleep(2**attempt)
    raise BootstrapError("cannot download the agent archive")


def unpack(data: bytes, lib: Path) -> None:
    """Replace ``lib`` by the archive's xdrive/ tree, unpacked beside it and renamed."""
    staging = Path(tempfile.mkdtemp(prefix=".lib-", dir=str(lib.parent)))
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
            for member in archive.getmembers():
                parts = Path(member.name).parts
                source = archive.extractfile(member) if member.isfile() else None
                if source is None or parts[0] != "xdrive" or ".." in parts:
                    raise BootstrapError(f"unexpected {member.name!r} in the agent archive")
                target = staging.joinpath(*parts)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(source.read())
                target.chmod(0o644)
        staging.chmod(0o755)
        shutil.rmtree(lib, ignore_errors=True)
        staging.rename(lib)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def bootstrap(settings: BootstrapSettings, base_python: str) -> None:
    prefix, lib = Path(settings.prefix), settings.path(LIB_NAME)
    prefix.mkdir(parents=True, exist_ok=True)
    python = settings.path(VENV_NAME) / "bin" / "python3"
    if not python.exists():
        run(base_python, "-m", "venv", "--system-site-packages", str(python.parent.parent))
    if settings.requirements:
        pip = (str(python), "-m", "pip", "install", "--disable-pip-version-check", "--no-input")
        run(*pip, "--prefer-binary", *settings.requirements)
    if settings.agent_url:
        data = fetch(settings.agent_url, python, prefix / "agent.tar.gz")
        digest = hashlib.sha256(data).hexdigest()
        if digest != settings.agent_sha256:
            raise BootstrapError(f"agent archive sha256 {digest}, not {settings.agent_sha256}")
        unpack(data, lib)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(lib), env.get("PYTHONPATH")]))
    run(str(python), "-c", _VERIFY, str(lib), settings.version, env=env)
    marker = settings.path(MARKER_NAME)
    marker.with_suffix(".tmp").write_text(settings.version + "\n")
    os.replace(marker.with_suffix(".tmp"), marker)
    say(f"xdrive agent {settings.version} installed in {prefix}")


def main(argv: Sequence[str]) -> int:
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: bootstrap.py SETTINGS.json", file=sys.stderr)
        return 2
    # Whatever umask cloud-init runs us with: the agent, its venv and the archive are
    # root's to change and everyone's to read.
    os.umask(0o022)
    try:
        bootstrap(BootstrapSettings.from_json(Path(argv[0]).read_text()), sys.executable)
    except BootstrapError as e:
        say(f"FAILED: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
