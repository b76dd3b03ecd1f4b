"""No credential is ever written: not by the agent (its log at --verbose, its status and
state, anything under the instance's root), and not by the launcher (any command's output,
errors included, or the user-data it renders).

The agent gets its credentials as on EC2, from its instance's IMDS (random secret and
session token per instance); the launcher from the standard variables, set here to
distinctive values. Both run their error and retry paths too: that is where a careless
log line would dump a request.
"""

# ruff: noqa: F811 (the fixtures imported from tests.launcher_fixtures are parameters here)
from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.boot_helpers import DRIVE, wait_status
from tests.launcher_fixtures import (  # noqa: F401 (fixtures)
    aws_env,
    ec2,
    make_volume,
    run,
    run_every_launcher_path,
)
from xdrive.ec2 import Ec2
from xdrive.sandbox.core import Sandbox, SimInstance
from xdrive.sandbox.imds import ImdsFaults
from xdrive.sandbox.settings import Faults

pytestmark = pytest.mark.root


def written_files(root: Path) -> Iterator[tuple[Path, bytes]]:
    """Every regular file under ``root`` (symlinks to devices and sockets are skipped)."""
    for path in sorted(root.rglob("*")):
        if path.is_file() and not path.is_symlink():
            yield path, path.read_bytes()


def instance_secrets(inst: SimInstance) -> dict[str, str]:
    role = inst.imds.role()
    assert role is not None
    found = {"secret access key": role.secret_access_key, "session token": role.token}
    for n, token in enumerate(inst.imds.issued_tokens()):
        found[f"IMDS token {n}"] = token
    return found


def assert_nowhere(named: dict[str, str], where: dict[str, bytes]) -> None:
    for name, value in named.items():
        for place, data in where.items():
            assert value.encode() not in data, f"the {name} is written in {place}"


def test_the_agent_writes_no_credential_even_verbose_and_failing(sandbox: Sandbox) -> None:
    a = sandbox.launch("us-east-1a")
    sandbox.start_agent(a.instance_id, sandbox.agent_config(a, DRIVE, docker=False), verbose=True)
    sandbox.wait_ready(a.instance_id)
    # Retry paths: IMDS refusing and failing reads, EC2 throttling, while a checkpoint runs.
    a.imds.set_faults(ImdsFaults(fail_next_reads_with_401=3, fail_next_reads_with_500=3))
    sandbox.fidelity.set_faults(Faults(throttle_rate=0.3, seed=7))
    sandbox.rebalance(a.instance_id)
    wait_status(a, r"^checkpoint snap-")
    sandbox.fidelity.set_faults(Faults())
    assert sandbox.stop_agent(a.instance_id) == 0  # the save on SIGTERM

    # An error path: AWS refuses the attach, the agent reports AWS's answer and gives up.
    b = sandbox.launch("us-east-1b")
    sandbox.fidelity.set_faults(Faults(deny_actions={"AttachVolume"}))
    sandbox.start_agent(b.instance_id, sandbox.agent_config(b, DRIVE, docker=False), verbose=True)
    assert sandbox.wait_agent_exit(b.instance_id) == 1
    sandbox.fidelity.set_faults(Faults())

    assert b" DEBUG IMDS " in a.agent_log.read_bytes(), "no retry logged at --verbose"
    for inst in (a, b):
        files = {str(p.relative_to(inst.root)): data for p, data in written_files(inst.root)}
        assert "var/lib/xdrive/status.json" in files
        assert_nowhere(instance_secrets(inst), files)
    assert b"UnauthorizedOperation" in b.agent_log.read_bytes()  # the error was logged


def test_the_launcher_prints_no_credential(
    aws_env: Sandbox, ec2: Ec2, monkeypatch: pytest.MonkeyPatch
) -> None:
    mine = {
        "secret access key": "launcher-secret-" + secrets.token_hex(12),
        "session token": "launcher-token-" + secrets.token_hex(24),
    }
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", mine["secret access key"])
    monkeypatch.setenv("AWS_SESSION_TOKEN", mine["session token"])
    outputs = {
        command: (result.stdout + result.stderr).encode()
        for command, result in run_every_launcher_path(aws_env, ec2).items()
    }
    make_volume(ec2, "unsaved", "us-east-1c")
    # Errors print AWS's answer: refused calls, and a launch whose every zone is refused.
    for denied, args in (
        ("RunInstances", ("launch", "denied", "--json")),
        ("DescribeVolumes", ("ls",)),
        ("CreateSnapshot", ("save", "unsaved")),
    ):
        aws_env.fidelity.set_faults(Faults(deny_actions={denied}))
        result = run(*args)
        aws_env.fidelity.set_faults(Faults())
        assert result.exit_code == 1, (args, result.output)
        assert "AWS denied" in result.stderr, result.stderr
        outputs[f"`xdrive {' '.join(args)}` ({denied} denied)"] = result.stderr.encode()
    rendered = run("userdata", "work", "--gzip")
    assert rendered.exit_code == 0
    outputs["gzip'd user-data"] = rendered.stdout_bytes
    assert_nowhere(mine, outputs)
