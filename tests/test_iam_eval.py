"""The sandbox's IAM evaluator, and what the generated agent policy allows through it."""

from __future__ import annotations

from typing import Any

import pytest

from xdrive.launcher.iam import PolicyScope, agent_policy, launcher_policy
from xdrive.sandbox.iam_eval import Check, Ec2State, UnsupportedPolicy, allows, ec2_checks

STATE = Ec2State(
    region="us-east-1",
    account="123456789012",
    tags={
        "vol-work": {"xdrive:name": "work"},
        "vol-other": {"xdrive:name": "other"},
        "vol-plain": {"Name": "not a drive"},
        "snap-work": {"xdrive:name": "work"},
        "i-1": {},
        "i-work": {"xdrive:name": "work"},
        "lt-work": {"xdrive:name": "work"},
        "lt-other": {"xdrive:name": "other"},
    },
    attached_to={"vol-work": "i-1"},
    launch_templates={"xdrive-work": "lt-work", "xdrive-other": "lt-other"},
)
WORK = agent_policy(PolicyScope(drive="work"))


def tag_spec(kind: str, **tags: str) -> list[tuple[str, str]]:
    params = [("TagSpecification.1.ResourceType", kind)]
    for n, (k, v) in enumerate(tags.items(), 1):
        params += [(f"TagSpecification.1.Tag.{n}.Key", k), (f"TagSpecification.1.Tag.{n}.Value", v)]
    return params


def may(action: str, params: list[tuple[str, str]], policy: Any = WORK) -> bool:
    return all(allows(policy, c) for c in ec2_checks(action, params, STATE))


def test_checks_of_a_snapshot_cover_the_volume_the_snapshot_and_its_tags() -> None:
    checks = ec2_checks(
        "CreateSnapshot",
        [("VolumeId", "vol-work"), *tag_spec("snapshot", **{"xdrive:name": "work"})],
        STATE,
    )
    assert checks == [
        Check(
            "ec2:CreateSnapshot",
            "arn:aws:ec2:us-east-1::snapshot/*",
            {"aws:RequestTag/xdrive:name": "work"},
        ),
        Check(
            "ec2:CreateSnapshot",
            "arn:aws:ec2:us-east-1:123456789012:volume/vol-work",
            {"aws:ResourceTag/xdrive:name": "work", "aws:RequestTag/xdrive:name": "work"},
        ),
        Check(
            "ec2:CreateTags",
            "arn:aws:ec2:us-east-1::snapshot/*",
            {"aws:RequestTag/xdrive:name": "work", "ec2:CreateAction": "CreateSnapshot"},
        ),
    ]


def test_a_detach_is_checked_against_the_instance_the_volume_is_attached_to() -> None:
    arns = [c.arn for c in ec2_checks("DetachVolume", [("VolumeId", "vol-work")], STATE)]
    assert arns[1] == "arn:aws:ec2:us-east-1:123456789012:instance/i-1"


@pytest.mark.parametrize(
    ("action", "params", "allowed"),
    [
        ("CreateVolume", tag_spec("volume", **{"xdrive:name": "work"}), True),
        ("CreateVolume", tag_spec("volume", **{"xdrive:name": "other"}), False),
        ("CreateVolume", [], False),  # untagged: it could never be found or cleaned up
        (
            "CreateVolume",
            [("SnapshotId", "snap-work"), *tag_spec("volume", **{"xdrive:name": "work"})],
            True,
        ),
        ("DeleteVolume", [("VolumeId", "vol-work")], True),
        ("DeleteVolume", [("VolumeId", "vol-other")], False),
        ("DeleteVolume", [("VolumeId", "vol-plain")], False),  # someone else's volume
        ("AttachVolume", [("VolumeId", "vol-work"), ("InstanceId", "i-1")], True),
        ("AttachVolume", [("VolumeId", "vol-plain"), ("InstanceId", "i-1")], False),
        ("CreateTags", [("ResourceId.1", "vol-work"), ("Tag.1.Key", "xdrive:generation")], True),
        ("CreateTags", [("ResourceId.1", "vol-plain"), ("Tag.1.Key", "xdrive:name")], False),
        ("DeleteSnapshot", [("SnapshotId", "snap-work")], False),  # the agent never may
        ("DescribeVolumes", [], True),
        ("TerminateInstances", [("InstanceId.1", "i-1")], False),
    ],
)
def test_the_drive_scoped_agent_policy(
    action: str, params: list[tuple[str, str]], allowed: bool
) -> None:
    assert may(action, params) is allowed


def test_any_drive_policy_needs_the_tag_but_not_its_value() -> None:
    anyone = agent_policy()
    assert may("DeleteVolume", [("VolumeId", "vol-other")], anyone)
    assert not may("DeleteVolume", [("VolumeId", "vol-plain")], anyone)


def test_deny_wins_and_unknown_operators_are_refused() -> None:
    check = Check("ec2:DeleteVolume", "arn:aws:ec2:us-east-1:1:volume/vol-1", {})
    allow = {"Effect": "Allow", "Action": "ec2:*", "Resource": "*"}
    deny = {"Effect": "Deny", "Action": "ec2:DeleteVolume", "Resource": "*"}
    assert allows({"Statement": [allow]}, check)
    assert not allows({"Statement": [allow, deny]}, check)
    odd = {**allow, "Condition": {"NumericLessThan": {"aws:MultiFactorAuthAge": "3600"}}}
    with pytest.raises(UnsupportedPolicy, match="NumericLessThan"):
        allows({"Statement": [odd]}, check)


LAUNCHER = launcher_policy(PolicyScope(drive="work"))
SPOT_RUN = [
    ("ImageId", "ami-1"),
    ("InstanceType", "t3.micro"),
    ("InstanceMarketOptions.MarketType", "spot"),
]


def tagged_run(drive: str) -> list[tuple[str, str]]:
    params = list(SPOT_RUN)
    for n, kind in enumerate(("instance", "spot-instances-request"), 1):
        params += [
            (f"TagSpecification.{n}.ResourceType", kind),
            (f"TagSpecification.{n}.Tag.1.Key", "xdrive:name"),
            (f"TagSpecification.{n}.Tag.1.Value", drive),
        ]
    return params


@pytest.mark.parametrize(
    ("action", "params", "allowed"),
    [
        ("RunInstances", tagged_run("work"), True),
        ("RunInstances", tagged_run("other"), False),
        ("RunInstances", SPOT_RUN, False),  # an untagged instance could not be found again
        ("TerminateInstances", [("InstanceId.1", "i-work")], True),
        ("TerminateInstances", [("InstanceId.1", "i-1")], False),  # not xdrive's
        ("DeleteLaunchTemplate", [("LaunchTemplateName", "xdrive-work")], True),
        ("DeleteLaunchTemplate", [("LaunchTemplateName", "xdrive-other")], False),
        ("DeleteSnapshot", [("SnapshotId", "snap-work")], True),
        ("DeleteVolume", [("VolumeId", "vol-plain")], False),
    ],
)
def test_the_drive_scoped_launcher_policy(
    action: str, params: list[tuple[str, str]], allowed: bool
) -> None:
    assert may(action, params, LAUNCHER) is allowed
