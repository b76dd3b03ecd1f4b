"""User-data: valid for cloud-init, under 16 KB, free of credentials, and it installs exactly
the launcher's agent.

Real parts: Debian's cloud-init reads the rendered user-data with its own code (gunzip,
content-type detection, YAML, the write_files module) into a temporary root; ``cloud-init
schema`` validates it; ``systemd-analyze verify`` checks the unit and the docker drop-in;
the bootstrap runs for real (venv, pip, download over HTTP from 127.0.0.1 or from moto's S3,
sha256 check, import check, marker).

How ``systemd-analyze verify`` (systemd 252) behaves, and why the test builds a root for it:
without ``--root`` it checks ExecStart= against the host, where /usr/local/bin/xdrive-agent
does not exist ("Command ... is not executable", rc 1). With ``--root=DIR`` it resolves
executables and units inside DIR, and then needs the targets the unit pulls in
(sysinit.target, ...): the test copies the host's /usr/lib/systemd/system into DIR and puts
stub executables at every Exec path the units name. Unknown keys and bad values only warn
(rc 0, stderr), so the test requires rc 0 and an empty stderr.
"""

from __future__ import annotations

import grp
import gzip
import hashlib
import http.server
import importlib
import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import pytest

import xdrive
from xdrive.agent.config import AgentConfig, DockerSettings
from xdrive.cloudinit import bundle, layout, units, yamltext
from xdrive.cloudinit.bootstrap import BootstrapSettings
from xdrive.cloudinit.credentials import CredentialsInUserData
from xdrive.cloudinit.render import (
    USERDATA_LIMIT,
    UserDataSettings,
    UserDataTooLarge,
    compress,
    render_document,
    render_userdata,
    userdata_sizes,
    write_userdata,
)
from xdrive.errors import ConfigError

CLOUD_INIT = shutil.which("cloud-init") or "/usr/bin/cloud-init"
CLOUD_INIT_PYTHON = "/usr/bin/python3"  # Debian's cloud-init package runs on it
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
KEYS_22_2 = {"write_files", "packages", "runcmd", "bootcmd"}
WRITE_FILES_KEYS_22_2 = {"path", "content", "permissions", "owner", "encoding", "append"}
NO_ENV: dict[str, str] = {}
FAKE_SHA = "0" * 64
PRESIGNED = (
    "https://xdrive-agents.s3.us-east-1.amazonaws.com/xdrive-0.1.0.tar.gz"
    "?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20240101T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=" + "ab" * 32
)


def _cloud_init_available() -> bool:
    if not Path(CLOUD_INIT).exists() or not Path(CLOUD_INIT_PYTHON).exists():
        return False
    probe = [CLOUD_INIT_PYTHON, "-c", "import cloudinit.config.cc_write_files"]
    return subprocess.run(probe, capture_output=True, check=False, cwd="/").returncode == 0


needs_cloud_init = pytest.mark.skipif(
    not _cloud_init_available(),
    reason="Debian's cloud-init is not installed (scripts/install-deps.sh installs it)",
)

# Runs under cloud-init's python: cloud-init's own reading of user-data, then its
# write_files module with every path moved under ROOT. Always with cwd="/": from the
# repository root, `python3 -c` would import this repository's cloudinit/ folder instead of
# cloud-init (the reason the project never has a top-level package of that name).
_CLOUD_INIT_UNPACK = r"""
import json, sys
from cloudinit import handlers, util
from cloudinit.config import cc_write_files
from cloudinit.user_data import convert_string
data = open(sys.argv[1], "rb").read()
root, owner = sys.argv[2], sys.argv[3]
payload = convert_string(data).get_payload(decode=True)
ctype = handlers.type_from_starts_with(payload)
if ctype != "text/cloud-config":
    sys.exit("cloud-init sees %r, not text/cloud-config" % ctype)
cfg = util.load_yaml(payload)
files = [dict(f, path=root + f["path"]) for f in cfg["write_files"]]
cc_write_files.write_files("write_files", files, owner)
json.dump({k: v for k, v in cfg.items() if k != "write_files"}, sys.stdout)
print()
json.dump(cfg["write_files"], sys.stdout)
"""


def make_settings(
    distro: str = "al2023",
    source: str = "url",
    compressed: bool = True,
    agent: Optional[AgentConfig] = None,
    url: str = PRESIGNED,
    sha256: str = FAKE_SHA,
) -> UserDataSettings:
    return UserDataSettings(
        drive="work",
        agent=agent or AgentConfig(drive="work"),
        distro=distro,
        agent_source=source,
        agent_url=url if source == "url" else None,
        agent_sha256=sha256 if source == "url" else None,
        compress=compressed,
    )


def userdata_bytes(settings: UserDataSettings) -> bytes:
    """As sent to EC2, without the size limit (an embedded agent is over it today)."""
    text = render_document(settings, environ=NO_ENV).encode()
    return compress(text) if settings.compress else text


def unpack_with_cloud_init(data: bytes, root: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Write the user-data's files under ``root`` the way cloud-init does on the instance."""
    root.mkdir(parents=True, exist_ok=True)
    blob = root.parent / f"{root.name}.userdata"
    blob.write_bytes(data)
    owner = f"{pwd.getpwuid(os.getuid()).pw_name}:{grp.getgrgid(os.getgid()).gr_name}"
    result = subprocess.run(
        [CLOUD_INIT_PYTHON, "-c", _CLOUD_INIT_UNPACK, str(blob), str(root), owner],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    config_line, files_line = result.stdout.splitlines()
    return json.loads(config_line), json.loads(files_line)


def unit_settings(text: str) -> dict[str, list[str]]:
    """KEY -> values of a unit file (comments and section headers dropped)."""
    values: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            values.setdefault(key, []).append(value)
    return values


# --- cloud-init accepts it ----------------------------------------------------------------


@needs_cloud_init
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("source", ["url", "embedded"])
@pytest.mark.parametrize("distro", ["al2023", "ubuntu"])
def test_cloud_init_schema_says_valid(
    workdir: Path, distro: str, source: str, compressed: bool
) -> None:
    settings = make_settings(distro, source, compressed)
    data = userdata_bytes(settings)
    # cloud-init's own reader gunzips it and sees #cloud-config.
    config, files = unpack_with_cloud_init(data, workdir / "root")
    plain = gzip.decompress(data) if compressed else data
    assert plain.startswith(b"#cloud-config\n")
    target = workdir / "user-data.yaml"
    target.write_bytes(plain)  # `cloud-init schema` does not gunzip by itself
    result = subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(target)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout
    # Only modules and keys cloud-init 22.2 (Amazon Linux 2023) knows; schema allows more.
    assert set(config) | {"write_files"} <= KEYS_22_2
    for entry in files:
        assert set(entry) <= WRITE_FILES_KEYS_22_2, entry["path"]


@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("distro", ["al2023", "ubuntu"])
def test_url_userdata_fits_16k(distro: str, compressed: bool) -> None:
    # A long presigned URL (temporary credentials add a session token) must fit too.
    url = PRESIGNED + "&X-Amz-Security-Token=" + "Q" * 1200
    data = render_userdata(make_settings(distro, "url", compressed, url=url), environ=NO_ENV)
    assert len(data) <= USERDATA_LIMIT
    assert data.startswith(b"\x1f\x8b") == compressed


def test_sizes_are_measured_at_render_time() -> None:
    """The measurement the report quotes; also printed with ``pytest -s``."""
    sources = bundle.agent_files()
    raw_sources = sum(len(f.content) for f in sources)
    for source in ("embedded", "url"):
        sizes = userdata_sizes(make_settings("al2023", source), environ=NO_ENV)
        print(f"\n{source}: raw {sizes.raw} B, gzip {sizes.gzip} B, limit {sizes.limit} B")
        assert 0 < sizes.gzip < sizes.raw
        if source == "embedded":
            assert sizes.raw > raw_sources  # every source file is in there
    print(f"agent sources: {len(sources)} files, {raw_sources} B")


def test_over_limit_raises_and_writes_nothing(workdir: Path) -> None:
    settings = make_settings("al2023", "embedded", compressed=False)
    sizes = userdata_sizes(settings, environ=NO_ENV)
    assert sizes.raw > USERDATA_LIMIT  # the agent's sources alone are over 16 KB
    target = workdir / "user-data"
    target.write_bytes(b"previous")
    with pytest.raises(UserDataTooLarge) as caught:
        write_userdata(settings, target, environ=NO_ENV)
    message = str(caught.value)
    assert str(sizes.raw) in message and "16384" in message
    assert "compress" in message and "--agent-url" in message
    assert target.read_bytes() == b"previous"
    assert sorted(p.name for p in workdir.iterdir()) == ["user-data"]  # no temp file left


def test_embedded_compressed_fits_or_says_what_to_do() -> None:
    settings = make_settings("ubuntu", "embedded", compressed=True)
    sizes = userdata_sizes(settings, environ=NO_ENV)
    if sizes.gzip <= USERDATA_LIMIT:
        assert len(render_userdata(settings, environ=NO_ENV)) == sizes.gzip
        return
    with pytest.raises(UserDataTooLarge) as caught:
        render_userdata(settings, environ=NO_ENV)
    assert f"{sizes.gzip} bytes gzip-compressed" in str(caught.value)
    assert "--agent-url" in str(caught.value) and "compress it" not in str(caught.value)


def test_write_userdata_writes_what_render_returns(workdir: Path) -> None:
    settings = make_settings("al2023", "url")
    size = write_userdata(settings, workdir / "ud", environ=NO_ENV)
    assert (workdir / "ud").read_bytes() == render_userdata(settings, environ=NO_ENV)
    assert size == (workdir / "ud").stat().st_size


# --- exactly the launcher's agent -----------------------------------------------------------


def _package_sources() -> dict[str, bytes]:
    """The agent's sources found through xdrive.__file__ (independently of bundle.py)."""
    import xdrive.agent

    found = {}
    for package, reldir in ((xdrive, "xdrive"), (xdrive.agent, "xdrive/agent")):
        assert package.__file__
        for path in sorted(Path(package.__file__).parent.glob("*.py")):
            found[f"{reldir}/{path.name}"] = path.read_bytes()
    return found


@needs_cloud_init
@pytest.mark.parametrize("compressed", [False, True], ids=["plain", "gzip"])
def test_embedded_files_are_the_package_sources(workdir: Path, compressed: bool) -> None:
    root = workdir / "root"
    unpack_with_cloud_init(userdata_bytes(make_settings("al2023", "embedded", compressed)), root)
    lib = root / layout.LIB_DIR.lstrip("/")
    written = {
        str(p.relative_to(lib)): p.read_bytes() for p in sorted(lib.rglob("*")) if p.is_file()
    }
    assert written == _package_sources()
    assert not {"launcher", "sandbox", "cloudinit"} & {p.name for p in lib.rglob("*")}
    assert (root / layout.VERSION_FILE.lstrip("/")).read_text() == xdrive.__version__ + "\n"


@needs_cloud_init
def test_embedded_agent_imports_from_the_written_tree(workdir: Path) -> None:
    root = workdir / "root"
    unpack_with_cloud_init(userdata_bytes(make_settings("ubuntu", "embedded", False)), root)
    lib = str(root / layout.LIB_DIR.lstrip("/"))
    # -S: no site-packages, so the editable install cannot stand in for the written files.
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import xdrive, xdrive.agent.config; "
        "assert xdrive.__file__.startswith(sys.argv[1]), xdrive.__file__; "
        "print(xdrive.__version__)"
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", code, lib], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == xdrive.__version__


def _python39() -> Optional[str]:
    """A working Python 3.9 (pyenv's shims exist even when they cannot run one)."""
    candidates = [str(p) for p in sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python3.9"))]
    candidates += [c for c in (shutil.which("python3.9"), "/usr/bin/python3.9") if c]
    probe = "import sys; assert sys.version_info[:2] == (3, 9)"
    for candidate in candidates:
        try:
            ok = subprocess.run([candidate, "-c", probe], capture_output=True, check=False)
        except OSError:
            continue
        if ok.returncode == 0:
            return candidate
    return None


@needs_cloud_init
def test_embedded_agent_compiles_and_imports_on_python39(workdir: Path) -> None:
    python39 = _python39()
    if python39 is None:
        pytest.skip("no python3.9 here (Amazon Linux 2023's python3); the 3.9 check needs one")
    root = workdir / "root"
    unpack_with_cloud_init(userdata_bytes(make_settings("al2023", "embedded", True)), root)
    lib = root / layout.LIB_DIR.lstrip("/")
    bootstrap = root / layout.BOOTSTRAP_SCRIPT.lstrip("/")
    compiled = subprocess.run(
        [python39, "-m", "compileall", "-q", str(lib), str(bootstrap)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    code = "import sys; sys.path.insert(0, sys.argv[1]); import xdrive.agent.config"
    imported = subprocess.run(
        [python39, "-S", "-c", code, str(lib)], capture_output=True, text=True, check=False
    )
    assert imported.returncode == 0, imported.stderr
    # The bootstrap runs on 3.9 as far as its usage message without a network.
    usage = subprocess.run([python39, str(bootstrap)], capture_output=True, text=True, check=False)
    assert usage.returncode == 2 and "usage" in usage.stderr


def test_archive_is_reproducible_and_holds_the_sources() -> None:
    import io
    import tarfile

    first, second = bundle.agent_archive(), bundle.agent_archive()
    assert first.data == second.data
    assert first.sha256 == hashlib.sha256(first.data).hexdigest()
    with tarfile.open(fileobj=io.BytesIO(first.data), mode="r:gz") as tar:
        members = {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
        }
    assert members == _package_sources()


@needs_cloud_init
def test_both_distros_install_the_same_agent_version(workdir: Path) -> None:
    seen = []
    for distro in ("al2023", "ubuntu"):
        root = workdir / distro
        unpack_with_cloud_init(userdata_bytes(make_settings(distro, "url")), root)
        settings_file = root / layout.BOOTSTRAP_SETTINGS.lstrip("/")
        boot = BootstrapSettings.from_json(settings_file.read_text())
        seen.append((boot.version, boot.requirements, boot.agent_sha256))
        assert (root / layout.VERSION_FILE.lstrip("/")).read_text().strip() == boot.version
    assert seen[0] == seen[1]
    version, requirements, _ = seen[0]
    assert version == xdrive.__version__
    # The agent's dependencies only; xdrive itself never comes from PyPI.
    assert {re.split(r"[<>=!~; ]", r)[0] for r in requirements} == {"boto3", "requests", "docker"}


# --- what runs at boot ----------------------------------------------------------------------


@needs_cloud_init
@pytest.mark.parametrize("distro", ["al2023", "ubuntu"])
def test_runcmd_installs_before_it_starts(workdir: Path, distro: str) -> None:
    config, _ = unpack_with_cloud_init(userdata_bytes(make_settings(distro)), workdir / "r")
    runcmd = [c if isinstance(c, str) else " ".join(c) for c in config["runcmd"]]
    assert runcmd[0] == "set -eu"  # a failed step stops the rest: no half-installed agent
    position = {line: i for i, line in enumerate(runcmd)}
    docker_install = next(i for i, c in enumerate(runcmd) if "dockerd" in c)
    bootstrap = position[
        f"{layout.SYSTEM_PYTHON} {layout.BOOTSTRAP_SCRIPT} {layout.BOOTSTRAP_SETTINGS}"
    ]
    reload = position["systemctl daemon-reload"]
    start_agent = position["systemctl enable --now xdrive-agent.service"]
    start_docker = position["systemctl start docker.socket docker.service"]
    # docker first (Ubuntu's docker.io starts docker while installing: the unit's assert
    # must still fail then), the marker next, then systemd.
    assert docker_install < bootstrap < reload < start_agent < start_docker
    assert "systemctl enable docker.socket docker.service" in runcmd
    assert not any("pip install xdrive" in c for c in runcmd)
    packages = config["packages"]
    if distro == "ubuntu":
        assert {"python3-boto3", "python3-requests", "python3-docker", "python3-venv"} <= set(
            packages
        )
        assert "apt-get install" in runcmd[docker_install]
        assert "docker.io" in runcmd[docker_install]
    else:
        assert "dnf install -y docker" in runcmd[docker_install]
        assert "python3-pip" in packages


@needs_cloud_init
def test_docker_disabled_means_no_docker_parts(workdir: Path) -> None:
    agent = AgentConfig(drive="work", docker=DockerSettings(enabled=False))
    data = userdata_bytes(make_settings("ubuntu", agent=agent))
    config, files = unpack_with_cloud_init(data, workdir / "root")
    assert layout.DOCKER_DROPIN_FILE not in {f["path"] for f in files}
    assert not any("docker" in json.dumps(c) for c in config["runcmd"])


@needs_cloud_init
def test_written_config_is_the_agent_config(workdir: Path) -> None:
    agent = AgentConfig(drive="work", mountpoint="/data")
    root = workdir / "root"
    _, files = unpack_with_cloud_init(userdata_bytes(make_settings(agent=agent)), root)
    modes = {f["path"]: f["permissions"] for f in files}
    assert modes[layout.CONFIG_FILE] == "0644" and modes[layout.ENTRY_SCRIPT] == "0755"
    written = root / layout.CONFIG_FILE.lstrip("/")
    assert written.read_text() == agent.to_json()
    assert written.stat().st_mode & 0o777 == 0o644
    assert (root / layout.ENTRY_SCRIPT.lstrip("/")).stat().st_mode & 0o777 == 0o755
    dropin = (root / layout.DOCKER_DROPIN_FILE.lstrip("/")).read_text()
    assert unit_settings(dropin)["AssertPathIsMountPoint"] == ["/data"]


def test_unit_settings() -> None:
    unit = unit_settings(units.render_unit())
    assert unit["Type"] == ["notify"] and unit["NotifyAccess"] == ["main"]
    assert unit["ExecStart"] == [f"{layout.ENTRY_SCRIPT} run --config {layout.CONFIG_FILE}"]
    assert unit["KillMode"] == ["mixed"] and unit["TimeoutStopSec"] == ["150"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["AssertPathExists"] == [layout.INSTALLED_MARKER]
    assert unit["Before"] == ["docker.service"]
    assert unit["After"] == ["network-online.target"]  # never cloud-final: runcmd starts it
    assert unit["WantedBy"] == ["multi-user.target"]
    main = importlib.import_module("xdrive.agent.main")
    assert unit["RestartPreventExitStatus"] == [str(main.EXIT_CONFIG)]
    assert main.SHUTDOWN_BUDGET_S < units.STOP_TIMEOUT_S
    dropin = unit_settings(units.render_docker_dropin())
    assert dropin["After"] == dropin["Requires"] == [layout.AGENT_UNIT]
    assert dropin["AssertPathIsMountPoint"] == ["/v1"]


def test_agent_and_user_data_dropins_are_the_same_text() -> None:
    """The agent rewrites the drop-in at boot; the same text means no unit change on disk
    (systemd would otherwise warn that docker.service changed and wants daemon-reload)."""
    from xdrive.agent.docker_setup import render_docker_dropin as agent_dropin

    for mountpoint in ("/v1", "/data"):
        assert units.render_docker_dropin(mountpoint=mountpoint) == agent_dropin(
            mountpoint=mountpoint
        )


def _verify_root(root: Path, unit_texts: dict[str, str]) -> None:
    """A root holding the host's units, ``unit_texts`` and stubs for every Exec path."""
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    for relpath, text in unit_texts.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_text(text)
    exec_re = re.compile(r"^Exec\w+=[-@+!:]*(/\S+)", re.MULTILINE)
    texts = list(unit_texts.values())
    docker_unit = root / "usr/lib/systemd/system/docker.service"
    if docker_unit.exists():
        texts.append(docker_unit.read_text())
    for text in texts:
        for path in exec_re.findall(text):
            stub = root / path.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("#!/bin/sh\n")
            stub.chmod(0o755)


def _verify(root: Path, unit: str) -> subprocess.CompletedProcess[str]:
    assert SYSTEMD_ANALYZE
    return subprocess.run(
        [SYSTEMD_ANALYZE, "verify", f"--root={root}", unit],
        capture_output=True,
        text=True,
        check=False,
    )


@needs_cloud_init
@pytest.mark.skipif(not SYSTEMD_ANALYZE, reason="systemd-analyze is not installed")
@pytest.mark.skipif(
    not Path("/usr/lib/systemd/system/sysinit.target").exists(), reason="no systemd units here"
)
def test_systemd_analyze_verify_accepts_unit_and_dropin(workdir: Path) -> None:
    # The texts as cloud-init writes them from the user-data.
    root = workdir / "root"
    unpack_with_cloud_init(userdata_bytes(make_settings("ubuntu")), root)
    texts = {
        path.lstrip("/"): (root / path.lstrip("/")).read_text()
        for path in (layout.UNIT_FILE, layout.DOCKER_DROPIN_FILE)
    }
    verify_root = workdir / "verify"
    if not Path("/usr/lib/systemd/system/docker.service").exists():
        # Shaped like docker's own unit, for machines without docker.io.
        texts["etc/systemd/system/docker.service"] = (
            "[Unit]\nDescription=Docker\n[Service]\nType=notify\nExecStart=/usr/bin/dockerd\n"
        )
    _verify_root(verify_root, texts)
    for unit in (layout.AGENT_UNIT, "docker.service"):
        result = _verify(verify_root, unit)
        assert (result.returncode, result.stderr) == (0, ""), unit
    # The same check fails a broken unit: it would catch a mistake in ours.
    broken = texts[layout.UNIT_FILE.lstrip("/")].replace("Type=notify", "Type=bogus")
    (verify_root / layout.UNIT_FILE.lstrip("/")).write_text(broken)
    result = _verify(verify_root, layout.AGENT_UNIT)
    assert "bogus" in result.stderr


# --- credentials ----------------------------------------------------------------------------


def test_access_key_in_config_is_refused_without_echoing_it(workdir: Path) -> None:
    key = "AKIAIOSFODNN7EXAMPLE"
    agent = AgentConfig(drive="work", ec2_endpoint=f"https://{key}@ec2.example.com")
    target = workdir / "ud"
    with pytest.raises(CredentialsInUserData) as caught:
        write_userdata(make_settings(agent=agent), target, environ=NO_ENV)
    assert "ec2_endpoint" in str(caught.value) and key not in str(caught.value)
    assert not target.exists()


def test_secret_setting_names_are_refused() -> None:
    docker = DockerSettings(start_command=("env", "AWS_SECRET_ACCESS_KEY=x", "systemctl"))
    with pytest.raises(CredentialsInUserData, match=r"docker\.start_command"):
        render_userdata(make_settings(agent=AgentConfig(drive="work", docker=docker)), environ={})


def test_values_of_the_launchers_credential_variables_are_refused() -> None:
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYzEXAMPLEKEY"  # matches no pattern by itself
    agent = AgentConfig(drive="work", state_dir=f"/var/lib/{secret}")
    render_userdata(make_settings(agent=agent), environ={})  # unknown value: accepted
    with pytest.raises(CredentialsInUserData, match=r"AWS_SECRET_ACCESS_KEY"):
        render_userdata(make_settings(agent=agent), environ={"AWS_SECRET_ACCESS_KEY": secret})


def test_presigned_url_signature_is_allowed_elsewhere_refused() -> None:
    token = "IQoJb3JpZ2luX2VjEHQaCXVzLWVhc3QtMSJHMEUCIQ" * 8
    url = PRESIGNED + "&X-Amz-Security-Token=" + token
    env = {"AWS_ACCESS_KEY_ID": "AKIAIOSFODNN7EXAMPLE", "AWS_SESSION_TOKEN": token}
    data = render_userdata(make_settings(url=url, compressed=False), environ=env)
    assert url.encode() in data
    leaky = PRESIGNED.replace("xdrive-0.1.0", "AKIAIOSFODNN7EXAMPLE/xdrive-0.1.0")
    with pytest.raises(CredentialsInUserData, match="agent URL"):
        render_userdata(make_settings(url=leaky), environ={})


def test_rendered_userdata_has_no_key_looking_strings() -> None:
    for source in ("embedded", "url"):
        text = render_document(make_settings("ubuntu", source, url="s3://b/k"), environ={})
        assert not re.search(r"(AKIA|ASIA)[A-Z0-9]{16}", text)
        assert "secret_access_key" not in text.lower()


# --- settings -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"drive": "Bad_Name"}, "invalid drive name"),
        ({"drive": "other"}, "is for drive 'work'"),
        ({"distro": "fedora"}, "unknown distro"),
        ({"agent_url": None}, "no agent URL"),
        ({"agent_url": "ftp://host/agent.tar.gz"}, "must start with"),
        ({"agent_url": "s3://bucket-only"}, "no object"),
        ({"agent_url": "https://host/a b.tar.gz"}, "spaces"),
        ({"agent_sha256": "abc"}, "64 lowercase hex"),
        ({"agent_source": "embedded"}, "for an embedded agent"),
    ],
)
def test_bad_settings_are_refused(changes: dict[str, Any], message: str) -> None:
    base = make_settings()
    fields = {
        "drive": base.drive,
        "agent": base.agent,
        "distro": base.distro,
        "agent_source": base.agent_source,
        "agent_url": base.agent_url,
        "agent_sha256": base.agent_sha256,
    }
    with pytest.raises(ConfigError, match=message):
        UserDataSettings(**{**fields, **changes})


def test_agent_config_the_agent_would_refuse_is_refused_here() -> None:
    agent = replace(AgentConfig(drive="work"), mountpoint="relative")
    with pytest.raises(ConfigError, match="mountpoint"):
        render_userdata(make_settings(agent=agent), environ={})


# --- the YAML writer ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "",
        "one line",
        "a\n",
        "a\nb",
        "a\n\n\n",
        "  leading spaces\nx\n",
        "\tleading tab\n",
        "\nleading newline\n",
        "x\n\ty\n   \n  z  \n",
        "trailing space \nx",
        "# not a comment\n---\n...\nkey: value\n- item\n",
        "quotes \" ' \\ and {braces} [brackets] & *star !tag %\n",
        "unicode é ☃ 😀\n",
        "line\u2028separator\n",
        "nel\x85x\n",
        "carriage\r\nreturn\n",
        "bell\x07 and del\x7f\n",
    ],
)
def test_yaml_strings_read_back_identically(text: str) -> None:
    yaml = pytest.importorskip("yaml")
    document = {"write_files": [{"path": "/p", "content": text}], "runcmd": [[text, "x"], text]}
    loaded = yaml.safe_load(yamltext.dump(document))
    assert loaded["write_files"][0]["content"] == text
    assert loaded["runcmd"] == [[text, "x"], text]


def test_python_sources_are_block_literals() -> None:
    text = render_document(make_settings(source="embedded"), environ={})
    assert "  content: |\n    # Installed by xdrive user-data" in text
    assert text.count("content: |") >= len(bundle.agent_files()) - 1  # empty __init__.py


# --- the bootstrap, for real ----------------------------------------------------------------


def _base_python() -> str:
    """The interpreter this venv was made from: the bootstrap makes its own venv from it."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return str(Path(sys.base_prefix) / "bin" / version)


@pytest.fixture
def served() -> Iterator[dict[str, Any]]:
    """An HTTP server on 127.0.0.1 serving ``served["files"][path]``."""
    state: dict[str, Any] = {"files": {}}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = state["files"].get(self.path.split("?")[0])
            self.send_response(200 if body is not None else 404)
            self.send_header("Content-Length", str(len(body or b"")))
            self.end_headers()
            self.wfile.write(body or b"")

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state["base"] = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def run_bootstrap(
    workdir: Path, settings: UserDataSettings, env: Optional[dict[str, str]] = None
) -> tuple[subprocess.CompletedProcess[str], Path]:
    """Unpack the user-data with cloud-init and run its bootstrap under a temporary prefix.

    The agent's dependencies come from this test venv's site-packages through PYTHONPATH,
    standing in for what the distribution packages (so pip finds them installed, offline).
    """
    if not Path(_base_python()).exists():
        pytest.skip(f"the base interpreter {_base_python()} is not there")
    root = workdir / "root"
    unpack_with_cloud_init(userdata_bytes(settings), root)
    boot = BootstrapSettings.from_json((root / layout.BOOTSTRAP_SETTINGS.lstrip("/")).read_text())
    prefix = root / layout.PREFIX.lstrip("/")
    local = replace(boot, prefix=str(prefix))
    (workdir / "bootstrap.json").write_text(local.to_json())
    full_env = {
        **os.environ,
        **(env or {}),
        "PYTHONPATH": sysconfig.get_paths()["purelib"],
        "PIP_NO_INDEX": "1",  # never the network: everything must be satisfied already
    }
    result = subprocess.run(
        [_base_python(), str(prefix / "bootstrap.py"), str(workdir / "bootstrap.json")],
        capture_output=True,
        text=True,
        env=full_env,
        check=False,
        timeout=180,
        preexec_fn=lambda: os.umask(0),  # the most careless umask cloud-init could give
    )
    return result, prefix


@needs_cloud_init
def test_bootstrap_installs_the_archive_from_a_url(workdir: Path, served: dict[str, Any]) -> None:
    archive = bundle.agent_archive()
    served["files"]["/xdrive.tar.gz"] = archive.data
    url = f"{served['base']}/xdrive.tar.gz?X-Amz-Signature={'cd' * 32}"
    settings = make_settings("al2023", "url", url=url, sha256=archive.sha256)
    result, prefix = run_bootstrap(workdir, settings)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (prefix / "installed").read_text() == xdrive.__version__ + "\n"
    lib = prefix / "lib"
    written = {str(p.relative_to(lib)): p.read_bytes() for p in lib.rglob("*.py")}
    assert written == _package_sources()
    cfg = (prefix / "venv" / "pyvenv.cfg").read_text()
    assert "include-system-site-packages = true" in cfg
    writable = [p for p in prefix.rglob("*") if not p.is_symlink() and p.stat().st_mode & 0o022]
    assert not writable, f"writable by others: {writable[:5]}"
    # The installed entry point accepts the config the user-data wrote.
    entry = workdir / "xdrive-agent"
    entry.write_text(units.render_entry_script(lib_dir=str(lib), venv_dir=str(prefix / "venv")))
    config = workdir / "root" / layout.CONFIG_FILE.lstrip("/")
    check = subprocess.run(
        ["sh", str(entry), "check-config", "--config", str(config)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": sysconfig.get_paths()["purelib"]},
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr


@needs_cloud_init
def test_bootstrap_refuses_an_archive_with_another_sha256(
    workdir: Path, served: dict[str, Any]
) -> None:
    archive = bundle.agent_archive()
    tampered = bundle.agent_archive(
        (*bundle.agent_files(), bundle.AgentFile("xdrive/agent/extra.py", b"x = 1\n"))
    )
    served["files"]["/xdrive.tar.gz"] = tampered.data
    url = f"{served['base']}/xdrive.tar.gz"
    result, prefix = run_bootstrap(workdir, make_settings(url=url, sha256=archive.sha256))
    assert result.returncode == 1
    assert "sha256" in result.stdout
    assert not (prefix / "installed").exists()  # the agent and docker stay down
    assert not (prefix / "lib").exists()


@needs_cloud_init
def test_bootstrap_fetches_s3_urls_with_the_instance_credentials(workdir: Path) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    archive = bundle.agent_archive()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        env = {
            "AWS_ENDPOINT_URL": f"http://{host}:{port}",
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        s3 = boto3.client(
            "s3",
            endpoint_url=env["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
        )
        s3.create_bucket(Bucket="agents")
        s3.put_object(Bucket="agents", Key="xdrive/agent.tar.gz", Body=archive.data)
        settings = make_settings(
            "ubuntu", url="s3://agents/xdrive/agent.tar.gz", sha256=archive.sha256
        )
        result, prefix = run_bootstrap(workdir, settings, env)
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    assert (prefix / "installed").read_text().strip() == xdrive.__version__


@needs_cloud_init
def test_bootstrap_verifies_an_embedded_agent(workdir: Path) -> None:
    result, prefix = run_bootstrap(workdir, make_settings("al2023", "embedded", True))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (prefix / "installed").read_text().strip() == xdrive.__version__
    assert not (prefix / "agent.tar.gz").exists()  # nothing was downloaded
