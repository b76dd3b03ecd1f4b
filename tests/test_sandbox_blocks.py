"""BlockPlane: volumes as sparse files, snapshots as point-in-time copies, loop devices."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from xdrive.sandbox.blocks import GIB, BlockPlane, BlockPlaneError, by_id_name, mounts_of

from .sandbox_fixtures import Mounts, loops_bound_to, wait_until

pytestmark = pytest.mark.root

VOL_A = "vol-0123456789abcdef0"
VOL_B = "vol-0fedcba987654321f"
SNAP = "snap-0aaaabbbbccccdddd"


def _write(device: str, offset: int, data: bytes) -> None:
    fd = os.open(device, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)  # reaches the block device, as a guest's sync would
    finally:
        os.close(fd)


def _read(path: Path, offset: int, size: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(size)


def test_volume_is_a_sparse_file_of_its_size(block_plane: BlockPlane) -> None:
    path = block_plane.create_volume(VOL_A, 1)
    st = path.stat()
    assert st.st_size == GIB
    assert st.st_blocks * 512 < 1024 * 1024  # sparse: nothing allocated yet


def test_attach_makes_loop_device_and_links_detach_removes_them(
    block_plane: BlockPlane, workdir: Path
) -> None:
    root = workdir / "root"
    path = block_plane.create_volume(VOL_A, 1)
    device = block_plane.attach(VOL_A, root, "/dev/sdf")

    assert loops_bound_to(path) == [device]
    by_id = root / "dev/disk/by-id" / by_id_name(VOL_A)
    assert by_id.name == "nvme-Amazon_Elastic_Block_Store_vol0123456789abcdef0"
    assert os.readlink(by_id) == device
    assert os.readlink(root / "dev/sdf") == device
    assert block_plane.device_of(VOL_A) == device
    assert not block_plane.is_mounted(VOL_A)

    block_plane.detach(VOL_A)
    assert not by_id.is_symlink() and not (root / "dev/sdf").is_symlink()
    wait_until(lambda: not loops_bound_to(path))
    assert block_plane.device_of(VOL_A) is None


def test_snapshot_holds_the_volume_as_it_was(block_plane: BlockPlane, workdir: Path) -> None:
    block_plane.create_volume(VOL_A, 1)
    device = block_plane.attach(VOL_A, workdir / "root", "/dev/sdf")
    _write(device, 0, b"A" * 4096)
    block_plane.snapshot(VOL_A, SNAP)
    _write(device, GIB // 2, b"B" * 4096)  # after the snapshot: must not be in it

    restored = block_plane.create_volume(VOL_B, 2, from_snapshot=SNAP)
    assert restored.stat().st_size == 2 * GIB  # grown to the requested size
    assert _read(restored, 0, 4096) == b"A" * 4096
    assert _read(restored, GIB // 2, 4096) == bytes(4096)
    assert _read(block_plane.volume_path(VOL_A), GIB // 2, 4096) == b"B" * 4096


def test_restore_smaller_than_snapshot_is_refused(block_plane: BlockPlane) -> None:
    block_plane.create_volume(VOL_A, 2)
    block_plane.snapshot(VOL_A, SNAP)
    with pytest.raises(BlockPlaneError):
        block_plane.create_volume(VOL_B, 1, from_snapshot=SNAP)
    assert not block_plane.has_volume(VOL_B)


def test_attached_volume_cannot_be_deleted(block_plane: BlockPlane, workdir: Path) -> None:
    block_plane.create_volume(VOL_A, 1)
    block_plane.attach(VOL_A, workdir / "root", "/dev/sdf")
    with pytest.raises(BlockPlaneError):
        block_plane.delete_volume(VOL_A)
    assert block_plane.has_volume(VOL_A)


def test_ids_cannot_escape_the_workdir(block_plane: BlockPlane) -> None:
    with pytest.raises(BlockPlaneError):
        block_plane.create_volume("vol-../../etc", 1)
    with pytest.raises(BlockPlaneError):
        block_plane.snapshot(VOL_A, "snap-/x")


def test_is_mounted_follows_mounts_and_force_detach_unmounts(
    block_plane: BlockPlane, workdir: Path, mounts: Mounts
) -> None:
    path = block_plane.create_volume(VOL_A, 1)
    device = block_plane.attach(VOL_A, workdir / "root", "/dev/sdf")
    point = mounts.mkfs_and_mount(device, workdir / "root/v1")
    assert block_plane.is_mounted(VOL_A)
    rdev = os.stat(device).st_rdev
    assert mounts_of((os.major(rdev), os.minor(rdev))) == [str(point)]

    block_plane.force_detach(VOL_A)  # the instance crashed with the volume mounted

    assert not os.path.ismount(point)
    wait_until(lambda: not loops_bound_to(path))
    assert not (workdir / "root/dev/sdf").is_symlink()


def test_teardown_frees_its_devices_and_files_and_nothing_else(
    block_plane: BlockPlane, workdir: Path, mounts: Mounts
) -> None:
    foreign_file = workdir / "foreign.img"
    with open(foreign_file, "wb") as f:
        f.truncate(64 * 1024 * 1024)
    foreign = subprocess.run(
        ["losetup", "--find", "--show", str(foreign_file)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    try:
        paths = [block_plane.create_volume(v, 1) for v in (VOL_A, VOL_B)]
        device_a = block_plane.attach(VOL_A, workdir / "root", "/dev/sdf")
        block_plane.attach(VOL_B, workdir / "root", "/dev/sdg")
        block_plane.snapshot(VOL_B, SNAP)
        mounts.mkfs_and_mount(device_a, workdir / "root/v1")  # left mounted on purpose

        block_plane.teardown()

        wait_until(lambda: not any(loops_bound_to(path) for path in paths))
        assert not any(path.exists() for path in paths)
        assert not block_plane.snapshot_path(SNAP).exists()
        assert not any(block_plane.volumes_dir.iterdir())
        assert not os.path.ismount(workdir / "root/v1")
        assert loops_bound_to(foreign_file) == [foreign]  # not ours: untouched
    finally:
        subprocess.run(["losetup", "-d", foreign], check=False)
