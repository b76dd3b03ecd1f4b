"""resolve_device on fake /dev and /sys trees under a tmp root."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from xdrive.agent.devices import DeviceNotFound, by_id_names, resolve_device
from xdrive.errors import ConfigError

VOL = "vol-0123456789abcdef0"
SERIAL = "vol0123456789abcdef0"
OTHER_SERIAL = "vol0fedcba9876543210"


def _node(root: Path, name: str) -> Path:
    """A stand-in device node (a plain file) at root/dev/NAME."""
    path = root / "dev" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def _link(root: Path, rel: str, target: str) -> Path:
    link = root / "dev" / rel
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def _sysfs(root: Path, name: str, serial: str, model: str = "Amazon Elastic Block Store") -> None:
    device = root / "sys" / "block" / name / "device"
    device.mkdir(parents=True)
    # the kernel pads both attributes with spaces to their NVMe field widths
    (device / "serial").write_text(serial.ljust(20) + "\n")
    (device / "model").write_text(model.ljust(40) + "\n")


def _resolve(root: Path, requested: str | None = "/dev/sdf", **kw: object) -> Path:
    kw.setdefault("timeout_s", 0)
    return resolve_device(VOL, root=root, requested_name=requested, **kw)


@pytest.mark.parametrize("name", by_id_names(VOL))
def test_by_id_link_forms(tmp_path: Path, name: str) -> None:
    node = _node(tmp_path, "nvme1n1")
    _link(tmp_path, f"disk/by-id/{name}", "../../nvme1n1")
    assert _resolve(tmp_path, None) == node.resolve()


def test_by_id_names_cover_systemd_and_amazon_ec2_utils_rules() -> None:
    assert by_id_names(VOL) == (
        f"nvme-Amazon_Elastic_Block_Store_{SERIAL}",
        f"nvme-Amazon_Elastic_Block_Store_{SERIAL}_1",
        f"nvme-Amazon_Elastic_Block_Store_{SERIAL}-ns-1",
    )


def test_requested_name_link(tmp_path: Path) -> None:
    node = _node(tmp_path, "nvme2n1")
    _link(tmp_path, "sdf", "nvme2n1")
    assert _resolve(tmp_path, "/dev/sdf") == node.resolve()


def test_xen_form_of_the_requested_name(tmp_path: Path) -> None:
    node = _node(tmp_path, "xvdf")
    assert _resolve(tmp_path, "/dev/sdf") == node.resolve()
    assert _resolve(tmp_path, "sdf") == node.resolve()


def test_sysfs_serial_scan(tmp_path: Path) -> None:
    _node(tmp_path, "nvme0n1")
    _sysfs(tmp_path, "nvme0n1", OTHER_SERIAL)
    node = _node(tmp_path, "nvme3n1")
    _sysfs(tmp_path, "nvme3n1", SERIAL)
    assert _resolve(tmp_path, None) == node.resolve()


def test_sysfs_scan_ignores_other_models_and_missing_nodes(tmp_path: Path) -> None:
    _sysfs(tmp_path, "nvme4n1", SERIAL)  # no /dev node yet
    _node(tmp_path, "nvme5n1")
    _sysfs(tmp_path, "nvme5n1", SERIAL, model="Amazon EC2 NVMe Instance Storage")
    with pytest.raises(DeviceNotFound):
        _resolve(tmp_path, None)


def test_by_id_wins_over_a_requested_name_for_another_disk(tmp_path: Path) -> None:
    _node(tmp_path, "nvme1n1")
    right = _node(tmp_path, "nvme2n1")
    _link(tmp_path, "sdf", "nvme1n1")
    _link(tmp_path, f"disk/by-id/{by_id_names(VOL)[0]}", "../../nvme2n1")
    assert _resolve(tmp_path) == right.resolve()


def test_requested_name_of_another_volume_is_ignored(tmp_path: Path) -> None:
    _node(tmp_path, "nvme1n1")
    _sysfs(tmp_path, "nvme1n1", OTHER_SERIAL)
    _link(tmp_path, "sdf", "nvme1n1")  # stale: sdf is another volume's disk
    with pytest.raises(DeviceNotFound):
        _resolve(tmp_path)


def test_dangling_link_is_not_a_device(tmp_path: Path) -> None:
    _link(tmp_path, f"disk/by-id/{by_id_names(VOL)[0]}", "../../nvme9n1")
    with pytest.raises(DeviceNotFound):
        _resolve(tmp_path, None)


def test_absolute_link_to_a_host_device(tmp_path: Path) -> None:
    # the sandbox links ROOT/dev/disk/by-id/... to a host loop device such as /dev/loop3
    _link(tmp_path, f"disk/by-id/{by_id_names(VOL)[0]}", "/dev/null")
    assert _resolve(tmp_path, None) == Path("/dev/null")


def test_device_appearing_late_is_found(tmp_path: Path) -> None:
    def attach() -> None:
        time.sleep(0.3)
        _node(tmp_path, "nvme1n1")
        _link(tmp_path, f"disk/by-id/{by_id_names(VOL)[0]}", "../../nvme1n1")

    worker = threading.Thread(target=attach)
    worker.start()
    try:
        found = _resolve(tmp_path, None, timeout_s=30, poll_s=0.05)
    finally:
        worker.join()
    assert found == (tmp_path / "dev" / "nvme1n1").resolve()


def test_timeout_backs_off_and_says_what_to_check(tmp_path: Path) -> None:
    now = [0.0]
    sleeps: list[float] = []

    def sleep(s: float) -> None:
        sleeps.append(s)
        now[0] += s

    with pytest.raises(DeviceNotFound) as err:
        resolve_device(
            VOL,
            root=tmp_path,
            requested_name="/dev/sdf",
            timeout_s=10,
            poll_s=0.1,
            clock=lambda: now[0],
            sleep=sleep,
        )
    assert sleeps[:6] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.6, 2.0])
    assert max(sleeps) == 2.0
    assert sum(sleeps) == pytest.approx(10)
    text = str(err.value)
    for expected in (
        VOL,
        "after 10 s",
        str(tmp_path / "dev/disk/by-id" / f"nvme-Amazon_Elastic_Block_Store_{SERIAL}"),
        f"nvme*n*/device/serial = {SERIAL}",
        str(tmp_path / "dev/sdf"),
        str(tmp_path / "dev/xvdf"),
        f"attached to this instance (aws ec2 describe-volumes --volume-ids {VOL})",
    ):
        assert expected in text


@pytest.mark.parametrize("bad", ["vol0123", "vol-XYZ", "i-0123456789abcdef0", ""])
def test_invalid_volume_ids_are_refused(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ConfigError):
        resolve_device(bad, root=tmp_path, requested_name=None, timeout_s=0)


def test_default_root_style_paths_are_joined_not_literal(tmp_path: Path) -> None:
    # nothing outside root is consulted: a real /dev/sdf on the host must not matter
    assert not os.path.exists(tmp_path / "dev")
    with pytest.raises(DeviceNotFound):
        _resolve(tmp_path, "/dev/loop0")
