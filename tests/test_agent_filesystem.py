"""Filesystem steps on real loop devices: signature guard, mount, grow, freeze, users."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from xdrive.agent import commands, filesystem
from xdrive.agent.filesystem import (
    FsType,
    MountBusy,
    MountConflict,
    SignaturePresent,
    SignatureUnknown,
)

pytestmark = pytest.mark.root

MiB = 1024 * 1024


@dataclass(frozen=True)
class Loop:
    image: Path
    device: str


def _sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


@contextlib.contextmanager
def _loop(workdir: Path, name: str, size_mib: int = 320) -> Iterator[Loop]:
    image = workdir / name
    with open(image, "wb") as f:
        f.truncate(size_mib * MiB)
    device = _sh("losetup", "-f", "--show", str(image))
    try:
        yield Loop(image, device)
    finally:
        for entry in reversed(filesystem.read_mountinfo()):
            if entry.source == device:
                subprocess.run(["umount", entry.mountpoint], check=False)
        subprocess.run(["losetup", "-d", device], check=False)


@pytest.fixture
def loop(workdir: Path) -> Iterator[Loop]:
    with _loop(workdir, "a.img") as lp:  # sparse; mkfs.xfs needs more than 300 MB
        yield lp


@pytest.fixture
def loop2(workdir: Path) -> Iterator[Loop]:
    with _loop(workdir, "b.img") as lp:
        yield lp


def _digest(device: str, size: int = 4 * MiB) -> str:
    with open(device, "rb") as f:
        return hashlib.sha256(f.read(size)).hexdigest()


@contextlib.contextmanager
def _process(argv: list[str], cwd: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, cwd=cwd)
    try:
        yield proc
    finally:
        proc.kill()
        proc.wait()


def _wait_for(predicate, what: str, limit_s: float = 20.0) -> None:
    deadline = time.monotonic() + limit_s
    while not predicate():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


# -- signature guard ------------------------------------------------------------------------


def test_blank_device_gets_a_filesystem(loop: Loop) -> None:
    assert filesystem.read_signature(loop.device) is None
    filesystem.make_filesystem(loop.device, "ext4", "xdrive-work")
    assert filesystem.read_signature(loop.device) == "ext4"
    assert _sh("blkid", "-p", "-o", "value", "-s", "LABEL", loop.device) == "xdrive-work"


@pytest.mark.parametrize("second", ["ext4", "xfs"])
def test_mkfs_refuses_a_device_with_a_filesystem_and_the_data_survives(
    loop: Loop, workdir: Path, second: FsType
) -> None:
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    (mnt / "precious").write_text("years of work")
    filesystem.unmount(mnt)
    before = _digest(loop.device)

    with pytest.raises(SignaturePresent, match="already holds ext4"):
        filesystem.make_filesystem(loop.device, second, "other")

    assert _digest(loop.device) == before
    filesystem.mount(loop.device, mnt, "ext4")
    assert (mnt / "precious").read_text() == "years of work"


def test_mkfs_refuses_a_device_with_only_a_partition_table(loop: Loop) -> None:
    commands.run(["sfdisk", "-q", loop.device], input="label: gpt\n,\n")
    assert filesystem.read_signature(loop.device) == "gpt"
    before = _digest(loop.device)
    with pytest.raises(SignaturePresent, match="gpt"):
        filesystem.make_filesystem(loop.device, "ext4", "drive")
    assert _digest(loop.device) == before


def test_a_blkid_failure_is_never_taken_for_blank(loop: Loop, workdir: Path) -> None:
    # xfs with an ext4 superblock copied over it: blkid -p exits 8 (ambivalent)
    filesystem.make_filesystem(loop.device, "xfs", "drive")
    ext4 = workdir / "ext4.img"
    with open(ext4, "wb") as f:
        f.truncate(64 * MiB)
    commands.run(["mkfs.ext4", "-q", "-F", str(ext4)])
    with open(ext4, "rb") as src, open(loop.device, "r+b") as dst:
        src.seek(1024)
        dst.seek(1024)
        dst.write(src.read(1024))
    before = _digest(loop.device)
    assert subprocess.run(["blkid", "-p", loop.device], capture_output=True).returncode == 8

    with pytest.raises(SignatureUnknown, match="cannot tell"):
        filesystem.read_signature(loop.device)
    with pytest.raises(SignatureUnknown):
        filesystem.make_filesystem(loop.device, "ext4", "drive")
    assert _digest(loop.device) == before


def test_a_missing_or_empty_device_is_never_taken_for_blank(workdir: Path) -> None:
    # blkid -p exits 2 ("nothing found") for these too
    missing = workdir / "no-such-device"
    assert subprocess.run(["blkid", "-p", str(missing)], capture_output=True).returncode == 2
    with pytest.raises(SignatureUnknown, match="cannot read"):
        filesystem.read_signature(missing)
    with pytest.raises(SignatureUnknown):
        filesystem.make_filesystem(missing, "ext4", "drive")
    # a device of size 0 (as a detached NVMe or loop device reads)
    with _loop(workdir, "empty.img", 0) as empty:
        assert subprocess.run(["blkid", "-p", empty.device]).returncode == 2
        with pytest.raises(SignatureUnknown, match="size 0"):
            filesystem.read_signature(empty.device)


def test_bad_fstype_and_label_are_refused(loop: Loop) -> None:
    with pytest.raises(Exception, match="unsupported filesystem"):
        filesystem.make_filesystem(loop.device, "btrfs", "x")
    with pytest.raises(Exception, match="label"):
        filesystem.make_filesystem(loop.device, "xfs", "thirteen-char")
    assert filesystem.read_signature(loop.device) is None


# -- mount ----------------------------------------------------------------------------------


def test_mount_is_idempotent_and_refuses_conflicts(loop: Loop, loop2: Loop, workdir: Path) -> None:
    mnt, other = workdir / "deep" / "mnt", workdir / "other"
    for lp in (loop, loop2):
        filesystem.make_filesystem(lp.device, "ext4", "drive")
    assert filesystem.is_mounted(mnt) is None

    assert filesystem.mount(loop.device, mnt, "ext4") is True  # creates the directory
    assert filesystem.mount(loop.device, mnt, "ext4") is False
    assert filesystem.is_mounted(mnt) == Path(loop.device)
    assert sum(e.source == loop.device for e in filesystem.read_mountinfo()) == 1

    with pytest.raises(MountConflict, match="already has"):
        filesystem.mount(loop2.device, mnt, "ext4")
    with pytest.raises(MountConflict, match="already mounted at"):
        filesystem.mount(loop.device, other, "ext4")
    assert filesystem.is_mounted(other) is None

    assert filesystem.unmount(mnt) is True
    assert filesystem.unmount(mnt) is False
    assert filesystem.is_mounted(mnt) is None


def test_xfs_clones_of_one_filesystem_mount_side_by_side(
    workdir: Path,
) -> None:
    # two volumes restored from one snapshot carry the same xfs UUID
    with _loop(workdir, "x1.img") as a:
        filesystem.make_filesystem(a.device, "xfs", "drive")
        with _loop(workdir, "x2.img") as b:
            commands.run(["dd", f"if={a.device}", f"of={b.device}", "bs=4M", "conv=fsync"])
            filesystem.mount(a.device, workdir / "m1", "xfs")
            filesystem.mount(b.device, workdir / "m2", "xfs")
            assert filesystem.is_mounted(workdir / "m2") == Path(b.device)


# -- grow -----------------------------------------------------------------------------------


def _has_cap_sys_resource() -> bool:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) & (1 << 24))
    return False


def _enlarge(lp: Loop, size_mib: int) -> None:
    with open(lp.image, "r+b") as f:
        f.truncate(size_mib * MiB)
    commands.run(["losetup", "-c", lp.device])


@pytest.mark.parametrize("fstype", ["ext4", "xfs"])
def test_grow_fills_an_enlarged_device(
    loop: Loop, workdir: Path, fstype: filesystem.FsType
) -> None:
    if fstype == "ext4" and not _has_cap_sys_resource():
        pytest.skip("online ext4 resize needs CAP_SYS_RESOURCE (see the test below)")
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, fstype, "drive")
    filesystem.mount(loop.device, mnt, fstype)
    (mnt / "keep").write_text("still here")
    assert filesystem.grow_filesystem(loop.device, mnt, fstype) is False  # already full

    before = _statvfs_bytes(mnt)
    _enlarge(loop, 640)
    assert filesystem.grow_filesystem(loop.device, mnt, fstype) is True
    after = _statvfs_bytes(mnt)
    assert after > before + 250 * MiB
    assert filesystem.grow_filesystem(loop.device, mnt, fstype) is False
    assert _statvfs_bytes(mnt) == after
    assert (mnt / "keep").read_text() == "still here"


def test_online_ext4_grow_without_cap_sys_resource_says_why(loop: Loop, workdir: Path) -> None:
    if _has_cap_sys_resource():
        pytest.skip("this process may resize ext4 online")
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    before = _statvfs_bytes(mnt)
    _enlarge(loop, 640)
    with pytest.raises(commands.CommandFailed, match="CAP_SYS_RESOURCE"):
        filesystem.grow_filesystem(loop.device, mnt, "ext4")
    assert _statvfs_bytes(mnt) == before
    assert filesystem.is_mounted(mnt) == Path(loop.device)


def test_ext4_grows_unmounted(loop: Loop, workdir: Path) -> None:
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    (mnt / "keep").write_text("still here")
    before = _statvfs_bytes(mnt)
    with pytest.raises(MountConflict, match="mounted"):
        filesystem.grow_unmounted(loop.device, "ext4")
    filesystem.unmount(mnt)
    assert filesystem.grow_unmounted(loop.device, "ext4") is False  # already full
    _enlarge(loop, 640)
    assert filesystem.grow_unmounted(loop.device, "ext4") is True
    assert filesystem.grow_unmounted(loop.device, "ext4") is False
    filesystem.mount(loop.device, mnt, "ext4")
    assert _statvfs_bytes(mnt) > before + 250 * MiB
    assert (mnt / "keep").read_text() == "still here"


def test_grow_refuses_an_unmounted_filesystem(loop: Loop, workdir: Path) -> None:
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    with pytest.raises(MountConflict, match="not mounted"):
        filesystem.grow_filesystem(loop.device, workdir / "mnt", "ext4")


def _statvfs_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_blocks * st.f_frsize


# -- freeze ---------------------------------------------------------------------------------


def test_freeze_blocks_writes_until_thaw(loop: Loop, workdir: Path) -> None:
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    filesystem.freeze(mnt)
    writer = subprocess.Popen(["sh", "-c", f"echo data > {mnt}/f"])
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            writer.wait(timeout=1.0)  # blocked by the freeze
        with pytest.raises(commands.CommandFailed):
            filesystem.freeze(mnt)  # already frozen
        assert filesystem.thaw(mnt) is True
        assert writer.wait(timeout=30) == 0
    finally:
        filesystem.thaw(mnt)
        writer.kill()
        writer.wait()
    assert (mnt / "f").read_text() == "data\n"
    assert filesystem.thaw(mnt) is False  # not frozen: no error, safe in a finally


def test_frozen_context_thaws_when_the_body_fails(loop: Loop, workdir: Path) -> None:
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    with pytest.raises(RuntimeError), filesystem.frozen(mnt):
        raise RuntimeError("snapshot request failed")
    done = threading.Event()

    def write() -> None:
        (mnt / "after").write_text("ok")
        done.set()

    t = threading.Thread(target=write, daemon=True)
    t.start()
    t.join(timeout=30)
    assert done.is_set(), "filesystem still frozen after the with block"
    filesystem.thaw(mnt)


# -- processes using a mountpoint -----------------------------------------------------------


def test_processes_using_finds_open_files_cwd_and_deleted_files(loop: Loop, workdir: Path) -> None:
    mnt = workdir / "mnt"
    filesystem.make_filesystem(loop.device, "ext4", "drive")
    filesystem.mount(loop.device, mnt, "ext4")
    (mnt / "sub").mkdir()
    assert filesystem.processes_using(mnt) == []
    holder = ["sh", "-c", f"exec 3>>{mnt}/sub/held; exec sleep 600"]
    deleted = ["sh", "-c", f"exec 3>{mnt}/gone; rm {mnt}/gone; exec sleep 600"]
    mapped = [
        sys.executable,
        "-c",
        "import mmap,sys,time\n"
        f"f=open('{mnt}/map','w+b'); f.write(b'x'*4096); f.flush()\n"
        "m=mmap.mmap(f.fileno(),4096); f.close(); print('ok',flush=True); time.sleep(600)",
    ]
    with contextlib.ExitStack() as stack:
        procs = [
            stack.enter_context(_process(holder)),
            stack.enter_context(_process(deleted)),
            stack.enter_context(_process(["sleep", "600"], cwd=mnt / "sub")),
            stack.enter_context(_process(mapped)),
        ]
        want = {p.pid for p in procs}
        _wait_for(lambda: want <= set(filesystem.processes_using(mnt)), "all holders")
        found = filesystem.processes_using(mnt)
        assert want <= set(found)
        assert os.getpid() not in found

        with pytest.raises(MountBusy) as busy:
            filesystem.unmount(mnt)
        assert want <= set(busy.value.pids)
        assert filesystem.is_mounted(mnt) == Path(loop.device)
    assert filesystem.processes_using(mnt) == []
    assert filesystem.unmount(mnt) is True


def test_processes_using_an_unmounted_directory_matches_paths_only(workdir: Path) -> None:
    d = workdir / "plain"
    d.mkdir()
    with _process(["sleep", "600"], cwd=d) as p:
        _wait_for(lambda: p.pid in filesystem.processes_using(d), "the sleeper")
        # the directory lives on the root filesystem; only paths under it count
        assert set(filesystem.processes_using(d)) == {p.pid}
