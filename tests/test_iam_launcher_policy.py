"""The launcher's IAM policy allows every action the launcher calls, and nothing more.

Every command runs against the sandbox along each of its paths (first launch, which creates
the agent bucket, the agent profile and role; a relaunch that finds them; spot, on-demand
and auto-resume; an interrupted auto-resume launch whose template is left; save, prune, rm,
stop; the read-only commands). The sandbox records every call of every service, S3's REST
requests under the action IAM authorizes them as. Three actions are never called as such
but are authorized by AWS inside other calls; they are named here with why.
"""

# ruff: noqa: F811 (the fixtures imported from tests.launcher_fixtures are parameters here)
from __future__ import annotations

import pytest

from tests.launcher_fixtures import (  # noqa: F401 (fixtures)
    aws_env,
    ec2,
    inventory,
    run,
    run_every_launcher_path,
)
from xdrive.ec2 import Ec2
from xdrive.launcher.iam import PolicyScope, launcher_policy, policy_actions
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.s3actions import s3_action

# Authorized by AWS within another call, never called by name.
IMPLICIT = {
    # RunInstances and CreateAutoScalingGroup with an instance profile pass its role.
    "iam:PassRole",
    # TagSpecifications on RunInstances/CreateLaunchTemplate/CreateSnapshot are authorized
    # as ec2:CreateTags with ec2:CreateAction set (the policy allows nothing else).
    "ec2:CreateTags",
    # The first spot launch / Auto Scaling group in an account creates AWS's service-linked
    # role as the caller.
    "iam:CreateServiceLinkedRole",
}
LAUNCHER_KEY = "testing"  # the aws_env fixture's AWS_ACCESS_KEY_ID
# Need no permission (GetCallerIdentity answers whoever calls).
UNGATED = {"sts:GetCallerIdentity"}


def launcher_calls(sandbox: Sandbox) -> set[str]:
    return {c.iam_action for c in sandbox.fidelity.recorded_actions()} - UNGATED


@pytest.mark.root
def test_launcher_policy_is_exactly_what_the_launcher_calls(aws_env: Sandbox, ec2: Ec2) -> None:
    # EC2 calls are also evaluated against it, conditions included (the sandbox fixture
    # fails the test on any refusal); other services' calls are compared by name only.
    aws_env.fidelity.enforce_policy(LAUNCHER_KEY, launcher_policy())
    run_every_launcher_path(aws_env, ec2)
    called = launcher_calls(aws_env)
    allowed = policy_actions(launcher_policy())
    assert {"ec2:RunInstances", "iam:CreateRole", "s3:PutObject"} <= called
    assert called <= allowed, f"called but not in the launcher policy: {sorted(called - allowed)}"
    unused = allowed - called - IMPLICIT
    assert not unused, f"the launcher policy allows actions never called: {sorted(unused)}"
    assert not any("*" in action for action in allowed)


@pytest.mark.root
@pytest.mark.policy_denials
def test_a_launcher_policy_for_another_drive_refuses_the_launch(aws_env: Sandbox) -> None:
    """The enforcement is real: scoped to "other", launching "work" is refused by EC2."""
    aws_env.fidelity.enforce_policy(LAUNCHER_KEY, launcher_policy(PolicyScope(drive="other")))
    before = inventory(aws_env)
    result = run("launch", "work")
    assert result.exit_code == 1
    assert "AWS denied ec2:RunInstances" in result.stderr
    assert [d.split(" on ")[0] for d in aws_env.fidelity.policy_denials()] == ["ec2:RunInstances"]
    after = inventory(aws_env)
    assert after["instances"] == before["instances"]
    assert after["templates"] == before["templates"]


@pytest.mark.parametrize(
    "method, path, query, action",
    [
        ("PUT", "/xdrive-agent-1", "", "CreateBucket"),
        ("HEAD", "/xdrive-agent-1", "", "ListBucket"),
        ("GET", "/xdrive-agent-1", "list-type=2&prefix=xdrive", "ListBucket"),
        ("PUT", "/xdrive-agent-1", "publicAccessBlock", "PutBucketPublicAccessBlock"),
        ("PUT", "/xdrive-agent-1/xdrive/agent/a.tar.gz", "", "PutObject"),
        ("HEAD", "/xdrive-agent-1/xdrive/agent/a.tar.gz", "", "GetObject"),
        ("GET", "/xdrive-agent-1/xdrive/agent/a.tar.gz", "", "GetObject"),
        ("DELETE", "/xdrive-agent-1/k", "", "DeleteObject"),
        ("GET", "/", "", "ListAllMyBuckets"),
        ("PUT", "/xdrive-agent-1", "acl", "PUT /xdrive-agent-1"),  # unknown: left visible
        ("GET", "/b/k", "tagging", "GET /b/k"),
    ],
)
def test_s3_requests_are_named_as_iam_authorizes_them(
    method: str, path: str, query: str, action: str
) -> None:
    assert s3_action(method, path, query) == action
