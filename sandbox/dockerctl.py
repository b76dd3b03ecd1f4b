"""A real dockerd per simulated instance, started and stopped by PID.

Everything the daemon owns lives under the instance root, so several instances (and the
host's own docker) never share state:

    ROOT/etc/docker/daemon.json   config (data-root points at the drive once the agent ran)
    ROOT/run/docker.sock          API socket (unix://)
    ROOT/run/docker.pid           pidfile
    ROOT/run/docker-exec/         exec-root; holds the supervised containerd's sockets
    ROOT/var/log/dockerd.log      daemon log

No bridge and no iptables: the sandbox must not touch the host's network. Containers run
with ``network_mode="none"`` (or "host").

CLI, usable as the agent's docker start/stop commands in the sandbox::

    python -m xdrive.sandbox.dockerctl start --root /tmp/xds-1/i-0abc
    python -m xdrive.sandbox.dockerctl stop --root /tmp/xds-1/i-0abc --timeout 20
"""

from __future__ import annotations

import argparse
import hashlib
import io
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from xdrive.agent import commands, files
from xdrive.agent.filesystem import read_mountinfo
from xdrive.errors import ConfigError, XdriveError

SOCKET_PATH_MAX = 100  # sun_path holds 108 bytes; containerd adds its own names under exec-root
BUSYBOX = Path("/bin/busybox")  # Debian's busybox-static: one static binary, no libraries
_POLL_S = 0.1
_KILL_WAIT_S = 10.0


@dataclass(frozen=True)
class DockerdPaths:
    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "etc" / "docker" / "daemon.json"

    @property
    def exec_root(self) -> Path:
        return self.root / "run" / "docker-exec"

    @property
    def socket(self) -> Path:
        return self.root / "run" / "docker.sock"

    @property
    def pidfile(self) -> Path:
        return self.root / "run" / "docker.pid"

    @property
    def log(self) -> Path:
        return self.root / "var" / "log" / "dockerd.log"

    @property
    def default_data_root(self) -> Path:
        return self.root / "var" / "lib" / "docker"

    @property
    def containerd_socket(self) -> Path:
        return self.exec_root / "containerd" / "containerd.sock"

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"


def dockerd_paths(root: Path) -> DockerdPaths:
    return DockerdPaths(Path(os.path.abspath(root)))


def docker_url(root: Path) -> str:
    """The API address of the instance's dockerd, for docker.DockerClient(base_url=...)."""
    return dockerd_paths(root).url


def dockerd_argv(root: Path) -> list[str]:
    p = dockerd_paths(root)
    # A namespace of its own in case dockerd finds a system containerd and shares it.
    ns = "xdrive-" + hashlib.sha256(str(p.root).encode()).hexdigest()[:12]
    argv = [
        "dockerd",
        "--config-file",
        str(p.config_file),
        "--exec-root",
        str(p.exec_root),
        "-H",
        p.url,
        "--pidfile",
        str(p.pidfile),
        "--bridge=none",
        "--iptables=false",
        "--ip6tables=false",
        "--containerd-namespace",
        ns,
        "--containerd-plugins-namespace",
        ns + "-plugins",
    ]
    # Without a data-root of its own dockerd would use the host's /var/lib/docker. Passing
    # the flag as well as the config key is an error, so only when the config lacks it.
    if "data-root" not in files.read_json(p.config_file):
        argv += ["--data-root", str(p.default_data_root)]
    return argv


def _check_socket_paths(p: DockerdPaths) -> None:
    longest = p.exec_root / "containerd" / "containerd-debug.sock"
    for path in (p.socket, longest):
        if len(str(path)) >= SOCKET_PATH_MAX:
            raise ConfigError(
                f"instance root {p.root} is too long for unix sockets ({path} has "
                f"{len(str(path))} characters)",
                f"use a root shorter than {SOCKET_PATH_MAX - len(str(path)) + len(str(p.root))}"
                " characters, e.g. under /tmp",
            )


def ping(socket_path: Path, timeout_s: float = 2.0) -> bool:
    """True if the docker API at ``socket_path`` answers GET /_ping with 200 OK."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout_s)
            s.connect(str(socket_path))
            s.sendall(b"GET /_ping HTTP/1.0\r\nHost: docker\r\n\r\n")
            data = b""
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return False
    status = data.split(b"\r\n", 1)[0].split()
    return len(status) >= 2 and status[1] == b"200"


# -- processes, by PID only ---------------------------------------------------------------


def _stat_fields(pid: int) -> Optional[list[str]]:
    """Fields of /proc/PID/stat after the command name: [state, ppid, ...]."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    return text.rpartition(")")[2].split()


def _start_time(pid: int) -> Optional[str]:
    fields = _stat_fields(pid)
    return fields[19] if fields and len(fields) > 19 else None


def _alive(pid: int) -> bool:
    """Running, and not a zombie. Reaps ``pid`` if it is our own child."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    fields = _stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() >= deadline:
            return False
        time.sleep(_POLL_S)
    return True


def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def _all_pids() -> list[int]:
    return [int(e.name) for e in Path("/proc").iterdir() if e.name.isdigit()]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for other in _all_pids():
        fields = _stat_fields(other)
        if fields is not None and len(fields) > 1:
            children.setdefault(int(fields[1]), []).append(other)
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _shims_of(p: DockerdPaths) -> list[int]:
    """containerd shims serving this instance's containerd (they detach from it, so they
    are found by the containerd address under this root in their arguments)."""
    address = str(p.containerd_socket)
    return [pid for pid in _all_pids() if address in _cmdline(pid)]


def _terminate(pids: dict[int, Optional[str]], timeout_s: float) -> None:
    """SIGTERM, then SIGKILL, each pid still running with the start time it had."""

    def same(pid: int) -> bool:
        return _alive(pid) and _start_time(pid) == pids[pid]

    for sig, wait in ((signal.SIGTERM, timeout_s), (signal.SIGKILL, _KILL_WAIT_S)):
        live = [pid for pid in pids if same(pid)]
        if not live:
            return
        for pid in live:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while any(same(pid) for pid in live) and time.monotonic() < deadline:
            time.sleep(_POLL_S)


def _read_pidfile(p: DockerdPaths) -> Optional[int]:
    try:
        return int(p.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _is_our_dockerd(pid: int, p: DockerdPaths) -> bool:
    """Guards against a stale pidfile whose PID now belongs to something else."""
    argv = _cmdline(pid)
    return (
        _alive(pid)
        and bool(argv)
        and os.path.basename(argv[0]) == "dockerd"
        and str(p.pidfile) in argv
    )


def dockerd_pid(root: Path) -> Optional[int]:
    """The PID of this root's running dockerd, or None."""
    p = dockerd_paths(root)
    pid = _read_pidfile(p)
    return pid if pid is not None and _is_our_dockerd(pid, p) else None


def dockerd_running(root: Path) -> bool:
    return dockerd_pid(root) is not None


def _log_tail(p: DockerdPaths, lines: int = 15) -> str:
    try:
        text = p.log.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def start_dockerd(root: Path, timeout_s: float = 30.0) -> int:
    """Start dockerd for ``root`` (or find it running) and wait until its API answers.

    Returns its PID. dockerd runs in a session of its own, so it outlives the caller.
    """
    p = dockerd_paths(root)
    _check_socket_paths(p)
    pid = dockerd_pid(root)
    if pid is None:
        if not p.config_file.exists():
            # --config-file must name an existing file; an empty object means defaults.
            files.write_atomic(p.config_file, "{}\n")
        argv = dockerd_argv(root)
        for d in (p.socket.parent, p.log.parent):
            d.mkdir(parents=True, exist_ok=True)
        with open(p.log, "ab") as log:
            # Not the agent's NOTIFY_SOCKET: dockerd would send its own READY=1 and
            # STOPPING=1 there (in production docker.service has its own socket).
            env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                env=env,
            )
        pid = proc.pid
    deadline = time.monotonic() + timeout_s
    while not ping(p.socket):
        if not _alive(pid):
            raise XdriveError(
                f"dockerd for {p.root} exited while starting",
                f"see {p.log}:\n{_log_tail(p)}",
            )
        if time.monotonic() >= deadline:
            _stop_pid(pid, p, 5.0)
            raise XdriveError(
                f"dockerd for {p.root} did not answer on {p.socket} within {timeout_s:g} s",
                f"see {p.log}:\n{_log_tail(p)}",
            )
        time.sleep(_POLL_S)
    return pid


def _stop_pid(pid: int, p: DockerdPaths, timeout_s: float) -> None:
    # Remember containerd (dockerd's child) before dockerd goes and it is reparented.
    tree = {child: _start_time(child) for child in _descendants(pid)}
    _terminate({pid: _start_time(pid)}, timeout_s)
    tree.update({shim: _start_time(shim) for shim in _shims_of(p)})
    for shim in list(tree):
        tree.update({child: _start_time(child) for child in _descendants(shim)})
    _terminate(tree, 5.0)


def _data_root(p: DockerdPaths) -> Path:
    try:
        value = files.read_json(p.config_file).get("data-root")
    except ConfigError:
        value = None
    return Path(value) if isinstance(value, str) else p.default_data_root


def _unmount_leftovers(p: DockerdPaths) -> None:
    """Unmount what a killed dockerd left mounted (container rootfs overlays, network
    namespaces, its data-root bind) under its exec-root and data-root, deepest first, so
    the drive below can be unmounted. After a clean stop there is nothing to do."""
    bases = [os.path.realpath(b) for b in (p.exec_root, _data_root(p))]
    leftovers = sorted(
        {
            e.mountpoint
            for e in read_mountinfo()
            if any(e.mountpoint.startswith(b.rstrip("/") + "/") for b in bases)
        },
        key=len,
        reverse=True,
    )
    for mountpoint in leftovers:
        commands.run(["umount", mountpoint], check=False)
    # dockerd bind-mounts its data-root onto itself (private propagation) when it sits
    # under a shared mount, and leaves this marker so it undoes that at shutdown.
    marker = p.exec_root / "unmount-on-shutdown"
    if marker.exists():
        commands.run(["umount", str(bases[1])], check=False)
        marker.unlink()


def stop_dockerd(root: Path, timeout_s: float = 30.0) -> bool:
    """Stop this root's dockerd: SIGTERM (it stops its containers), SIGKILL after
    ``timeout_s``; then make sure containerd, its shims and their mounts are gone.
    False if dockerd was not running."""
    p = dockerd_paths(root)
    pid = dockerd_pid(root)
    if pid is None:
        # dockerd may be gone while a killed one left its containerd or shims behind.
        leftovers = {shim: _start_time(shim) for shim in _shims_of(p)}
        for shim in list(leftovers):
            leftovers.update({c: _start_time(c) for c in _descendants(shim)})
        _terminate(leftovers, 5.0)
        _unmount_leftovers(p)
        return False
    _stop_pid(pid, p, timeout_s)
    _unmount_leftovers(p)
    return True


# -- a tiny image without a registry --------------------------------------------------------


def _busybox_rootfs(busybox: Path) -> bytes:
    """A tar of a rootfs holding busybox and a symlink per applet."""
    applets = commands.run([str(busybox), "--list-full"]).stdout.split()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        dirs = {"bin", "dev", "etc", "proc", "root", "sys", "tmp", "var", "usr"}
        dirs |= {os.path.dirname(a) for a in applets if os.path.dirname(a)}
        for d in sorted(dirs):
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o1777 if d == "tmp" else 0o755
            tar.addfile(info)
        data = busybox.read_bytes()
        info = tarfile.TarInfo("bin/busybox")
        info.size = len(data)
        info.mode = 0o755
        tar.addfile(info, io.BytesIO(data))
        for name, text in (
            ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
            ("etc/group", "root:x:0:\n"),
        ):
            raw = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(raw)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(raw))
        for applet in sorted(set(applets) - {"bin/busybox"}):
            info = tarfile.TarInfo(applet)
            info.type = tarfile.SYMTYPE
            info.linkname = "/bin/busybox"
            tar.addfile(info)
    return buf.getvalue()


def import_busybox_image(
    docker_url: str, tag: str = "xdrive/busybox:latest", busybox: Path = BUSYBOX
) -> str:
    """Import a busybox image into the dockerd at ``docker_url``; returns its image id."""
    import docker

    repository, sep, version = tag.rpartition(":")
    if not sep or "/" in version:
        repository, version = tag, "latest"
    data = _busybox_rootfs(busybox)
    client = docker.DockerClient(base_url=docker_url)
    try:
        client.api.import_image_from_data(data, repository=repository, tag=version)
        image_id: str = client.images.get(f"{repository}:{version}").id
    finally:
        client.close()
    return image_id


# -- CLI ------------------------------------------------------------------------------------


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdrive.sandbox.dockerctl",
        description="Start or stop the dockerd of one simulated instance root.",
        epilog="example: python -m xdrive.sandbox.dockerctl start --root /tmp/xds-1/i-0abc",
    )
    parser.add_argument("action", choices=["start", "stop", "status", "import-busybox"])
    parser.add_argument("--root", required=True, type=Path, help="the instance root")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds (default 30)")
    args = parser.parse_args(argv)
    try:
        if args.action == "start":
            print(start_dockerd(args.root, args.timeout))
        elif args.action == "stop":
            stop_dockerd(args.root, args.timeout)
        elif args.action == "status":
            pid = dockerd_pid(args.root)
            print(f"running pid {pid}" if pid else "stopped")
            return 0 if pid else 3
        else:
            print(import_busybox_image(docker_url(args.root)))
    except XdriveError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
