"""Bad input to the agent: each failure says what is wrong and how to fix it, and nothing
is created or changed in EC2.

The configs point at a working sandbox (EC2 endpoint, IMDS), so an agent that went ahead
despite the bad input would create a volume: "nothing created" is a real check.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import pytest

from tests.boot_helpers import DRIVE, drive_volumes, mutating_calls, run_agent_cli, statuses
from xdrive.errors import ConfigError
from xdrive.names import validate_drive_name
from xdrive.sandbox.core import Sandbox, SimInstance
from xdrive.sandbox.settings import Faults

EXIT_CONFIG = 78

BAD_NAMES = [
    "",
    "Work",
    "-work",
    "work-",
    "my_drive",
    "my drive",
    "a/b",
    "dr\u00efve",
    "x" * 64,
    "work;rm -rf /",
]


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    """One sandbox for the module (these agents change nothing, which each test checks)."""
    sb = Sandbox().start()
    try:
        yield sb
    finally:
        sb.close()


@pytest.fixture
def inst(sandbox: Sandbox) -> Iterator[SimInstance]:
    """A fresh instance, with EC2's faults cleared and its call record empty."""
    sandbox.fidelity.set_faults(Faults())
    instance = sandbox.launch("us-east-1a")
    sandbox.fidelity.clear_recorded()
    try:
        yield instance
    finally:
        sandbox.fidelity.set_faults(Faults())


def good_config(sandbox: Sandbox, inst: SimInstance) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads(sandbox.agent_config(inst, DRIVE, docker=False).to_json())
    return raw


def write_config(inst: SimInstance, raw: Any) -> Path:
    path = inst.root / "etc/xdrive/agent.json"
    path.write_text(raw if isinstance(raw, str) else json.dumps(raw, indent=2))
    return path


def assert_nothing_touched(sandbox: Sandbox) -> None:
    assert mutating_calls(sandbox, ok_only=True) == []
    assert drive_volumes(sandbox) == []


# --- drive names: one rule, shared with the launcher ---------------------------------------


@pytest.mark.parametrize("name", BAD_NAMES)
def test_invalid_drive_name_is_refused_with_the_shared_rule(
    sandbox: Sandbox, inst: SimInstance, name: str
) -> None:
    with pytest.raises(ConfigError) as rule:
        validate_drive_name(name)
    path = write_config(inst, {**good_config(sandbox, inst), "drive": name})

    checked = run_agent_cli("check-config", "--config", str(path))
    assert checked.returncode == EXIT_CONFIG
    assert str(rule.value) in checked.stderr  # the same words as the launcher's

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == EXIT_CONFIG
    assert str(rule.value) in ran.stderr
    assert statuses(inst)[-1] == f"bad configuration: {rule.value}"
    assert sandbox.fidelity.recorded_actions() == ()  # not even a describe
    assert_nothing_touched(sandbox)


@pytest.mark.parametrize("name", ["work", "ml-project", "a", "0", "x" * 63])
def test_valid_drive_names_pass_check_config(
    sandbox: Sandbox, inst: SimInstance, name: str
) -> None:
    assert validate_drive_name(name) == name
    path = write_config(inst, {**good_config(sandbox, inst), "drive": name})
    checked = run_agent_cli("check-config", "--config", str(path))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == f"{path}: valid"


# --- bad config files ------------------------------------------------------------------------


def _unknown_key(raw: dict[str, Any]) -> Any:
    raw["volume"]["sise_gib"] = 5
    return raw


def _unknown_top_key(raw: dict[str, Any]) -> Any:
    raw["mountpiont"] = "/v1"
    return raw


def _wrong_type(raw: dict[str, Any]) -> Any:
    raw["volume"]["size_gib"] = "20"
    return raw


def _bool_for_int(raw: dict[str, Any]) -> Any:
    raw["volume"]["size_gib"] = True
    return raw


def _out_of_range(raw: dict[str, Any]) -> Any:
    raw["watch"]["poll_interval_s"] = 0
    return raw


def _bad_filesystem(raw: dict[str, Any]) -> Any:
    raw["volume"]["filesystem"] = "btrfs"
    return raw


def _volume_type(raw: dict[str, Any]) -> Any:
    raw["volume"]["volume_type"] = "io2"  # accepted and then ignored would be a silent lie
    return raw


def _missing_drive(raw: dict[str, Any]) -> Any:
    del raw["drive"]
    return raw


def _not_an_object(raw: dict[str, Any]) -> Any:
    return "[1, 2]\n"


def _invalid_json(raw: dict[str, Any]) -> Any:
    return json.dumps(raw, indent=2)[:-20]  # cut off mid-way


BAD_CONFIGS: dict[str, tuple[Callable[[dict[str, Any]], Any], tuple[str, ...]]] = {
    # name: (how to spoil a good config, words the message must hold)
    "unknown key": (_unknown_key, ("'volume.sise_gib'", "did you mean 'volume.size_gib'?")),
    "unknown top-level key": (_unknown_top_key, ("'mountpiont'", "did you mean 'mountpoint'?")),
    "wrong type": (_wrong_type, ("'volume.size_gib' must be an integer", 'got "20"')),
    "bool for int": (_bool_for_int, ("'volume.size_gib' must be an integer", "got true")),
    "out of range": (_out_of_range, ("'watch.poll_interval_s'", "0.2..30")),
    "unknown filesystem": (_bad_filesystem, ("'volume.filesystem'", "ext4, xfs")),
    "unsupported volume type": (_volume_type, ("'volume.volume_type' must be gp3",)),
    "missing drive": (_missing_drive, ("'drive' is missing", '"drive": "NAME"')),
    "not an object": (_not_an_object, ("the top level must be an object, got a list",)),
    "invalid JSON": (_invalid_json, ("not valid JSON", "line ")),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_bad_config_is_refused_before_anything_is_touched(
    sandbox: Sandbox, inst: SimInstance, case: str
) -> None:
    spoil, words = BAD_CONFIGS[case]
    path = write_config(inst, spoil(good_config(sandbox, inst)))

    checked = run_agent_cli("check-config", "--config", str(path))
    assert checked.returncode == EXIT_CONFIG
    assert str(path) in checked.stderr
    for word in words:
        assert word in checked.stderr

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == EXIT_CONFIG
    for word in words:
        assert word in ran.stderr
    assert statuses(inst)[-1].startswith("bad configuration: ")
    assert sandbox.fidelity.recorded_actions() == ()
    assert_nothing_touched(sandbox)


def test_missing_config_file(sandbox: Sandbox, inst: SimInstance) -> None:
    path = inst.root / "etc/xdrive/nothing-here.json"
    for command in ("check-config", "run", "status"):
        done = run_agent_cli(command, "--config", str(path), inst=inst)
        assert done.returncode == EXIT_CONFIG, command
        assert f"config file {path} does not exist" in done.stderr
        assert "--config PATH" in done.stderr
    assert sandbox.fidelity.recorded_actions() == ()
    assert_nothing_touched(sandbox)


# --- the environment: IMDS and IAM -------------------------------------------------------------


def closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port  # nothing listens there once the socket is closed


def test_imds_unreachable_names_the_url(sandbox: Sandbox, inst: SimInstance) -> None:
    url = f"http://127.0.0.1:{closed_port()}"
    path = write_config(inst, {**good_config(sandbox, inst), "imds_url": url})
    assert run_agent_cli("check-config", "--config", str(path)).returncode == 0

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == 1
    assert f"instance metadata at {url}/latest/" in ran.stderr
    assert "metadata service enabled" in ran.stderr  # and how to fix it
    said = statuses(inst)[-1]
    assert said.startswith("failed: instance metadata at ") and url in said
    status = inst.status()
    assert status is not None and status.phase == "failed" and url in status.message
    assert sandbox.fidelity.recorded_actions() == ()
    assert_nothing_touched(sandbox)


def test_config_for_another_region_is_refused_before_ec2_is_called(
    sandbox: Sandbox, inst: SimInstance
) -> None:
    path = write_config(inst, {**good_config(sandbox, inst), "region": "us-west-2"})
    assert run_agent_cli("check-config", "--config", str(path)).returncode == 0  # valid JSON

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == EXIT_CONFIG  # no restart: the instance stays where it is
    assert "sets region 'us-west-2' but this instance runs in 'us-east-1'" in ran.stderr
    assert "remove 'region'" in ran.stderr
    assert statuses(inst)[-1].startswith("bad configuration: the config sets region")
    assert sandbox.fidelity.recorded_actions() == ()
    assert_nothing_touched(sandbox)


def test_unmergeable_daemon_json_is_refused_before_ec2_is_called(
    sandbox: Sandbox, inst: SimInstance
) -> None:
    """Found after the mount, it would leave the drive mounted and unwatched."""
    raw = good_config(sandbox, inst)
    raw["docker"]["enabled"] = True
    path = write_config(inst, raw)
    daemon_json = inst.root / "etc/docker/daemon.json"
    daemon_json.write_text('{"graph": "/var/lib/docker"}\n')

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == EXIT_CONFIG
    assert "sets the removed key 'graph'" in ran.stderr and "remove 'graph'" in ran.stderr
    assert daemon_json.read_text() == '{"graph": "/var/lib/docker"}\n'  # left as it was
    assert sandbox.fidelity.recorded_actions() == ()
    assert_nothing_touched(sandbox)


def test_no_instance_profile_says_to_attach_one(sandbox: Sandbox, inst: SimInstance) -> None:
    """An instance launched without a profile: IMDS has no credentials to give."""
    inst.imds.set_role(None)
    path = write_config(inst, good_config(sandbox, inst))

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == 1  # not a config error: systemd retries (a profile can be added)
    assert "no AWS credentials found" in ran.stderr
    assert "attach an instance profile" in ran.stderr
    said = statuses(inst)[-1]
    assert said.startswith("failed: no AWS credentials found")
    assert sandbox.fidelity.recorded_actions() == ()  # nothing could even be signed
    assert_nothing_touched(sandbox)


@pytest.mark.parametrize("action", ["CreateVolume", "DescribeVolumes", "DescribeSnapshots"])
def test_access_denied_names_the_action_and_the_policy(
    sandbox: Sandbox, inst: SimInstance, action: str
) -> None:
    sandbox.fidelity.set_faults(Faults(deny_actions={action}))
    path = write_config(inst, good_config(sandbox, inst))

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == 1
    problem = f"AWS denied ec2:{action} (UnauthorizedOperation)"
    assert problem in ran.stderr
    assert "`xdrive iam-policy`" in ran.stderr
    said = statuses(inst)[-1]
    assert said.startswith("failed: ") and problem in said and "xdrive iam-policy" in said
    status = inst.status()
    assert status is not None and status.phase == "failed" and problem in status.message
    denied = [c for c in sandbox.fidelity.recorded_actions() if c.action == action]
    assert denied and all(c.status == 403 for c in denied)
    sandbox.fidelity.set_faults(Faults())
    assert_nothing_touched(sandbox)


def test_access_denied_after_a_volume_was_made_leaves_no_volume(
    sandbox: Sandbox, inst: SimInstance
) -> None:
    """AttachVolume denied: the empty volume this boot made is removed again."""
    sandbox.fidelity.set_faults(Faults(deny_actions={"AttachVolume"}))
    path = write_config(inst, good_config(sandbox, inst))

    ran = run_agent_cli("run", "--config", str(path), inst=inst)
    assert ran.returncode == 1
    assert "AWS denied ec2:AttachVolume (UnauthorizedOperation)" in ran.stderr
    assert "`xdrive iam-policy`" in ran.stderr
    sandbox.fidelity.set_faults(Faults())
    made = [c.action for c in sandbox.fidelity.recorded_actions() if c.status < 400]
    assert made.count("CreateVolume") == 1 and made.count("DeleteVolume") == 1
    assert drive_volumes(sandbox) == []
