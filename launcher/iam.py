"""Least-privilege IAM policies for the agent's instance profile and for the launcher user,
and the ``xdrive-agent`` instance profile the launcher creates when none is given.

No wildcard actions. Whatever EC2 lets a policy condition on a tag is conditioned on the
drive's tag: volumes and snapshots are created only with ``xdrive:name`` on them
(``aws:RequestTag``), and only resources that carry it can be attached, detached, deleted,
snapshotted or retagged (``aws:ResourceTag``); tags can be added to other resources only in
the call that creates them (``ec2:CreateAction``). Describe calls, which EC2 cannot scope to
resources, get ``"*"``. The instance side of AttachVolume/DetachVolume is not conditioned:
instances started by other tooling from ``xdrive userdata`` carry no xdrive tag, and a
volume of the drive is still required. Resource ARNs use the ``aws`` partition.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Optional

from botocore.exceptions import ClientError

from xdrive import tags
from xdrive.ec2 import aws_errors
from xdrive.errors import ConfigError

AGENT_ROLE = "xdrive-agent"
AGENT_PROFILE = "xdrive-agent"
AGENT_POLICY_NAME = "xdrive-agent"
AGENT_KEY_PREFIX = "xdrive/agent/"  # where the launcher uploads agent archives in the bucket
DEFAULT_BUCKET_PATTERN = "xdrive-agent-*"
PolicyRole = Literal["agent", "launcher"]

_EC2 = "arn:aws:ec2:*:*"
VOLUMES = f"{_EC2}:volume/*"
SNAPSHOTS = "arn:aws:ec2:*::snapshot/*"
INSTANCES = f"{_EC2}:instance/*"
SPOT_REQUESTS = f"{_EC2}:spot-instances-request/*"
LAUNCH_TEMPLATES = f"{_EC2}:launch-template/*"
TRUST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [
        {
            "Effect": "Allow",
            "Principal": {"Service": "ec2.amazonaws.com"},
            "Action": "sts:AssumeRole",
        }
    ],
}


@dataclass(frozen=True)
class PolicyScope:
    """What the policies cover: one drive or all, and where agent archives live."""

    drive: Optional[str] = None  # None: every drive (any value of xdrive:name)
    agent_bucket: Optional[str] = None  # None: any bucket named xdrive-agent-*


def _tagged(kind: Literal["ResourceTag", "RequestTag"], scope: PolicyScope) -> dict[str, Any]:
    key = f"aws:{kind}/{tags.NAME}"
    if scope.drive:
        return {"StringEquals": {key: scope.drive}}
    return {"StringLike": {key: "*"}}  # the tag must be present, whatever its value


def _statement(
    sid: str,
    actions: Sequence[str],
    resources: Sequence[str],
    condition: Optional[dict[str, Any]] = None,
) -> dict[str, Any]:
    statement: dict[str, Any] = {
        "Sid": sid,
        "Effect": "Allow",
        "Action": sorted(actions),
        "Resource": list(resources) if len(resources) > 1 else resources[0],
    }
    if condition:
        statement["Condition"] = condition
    return statement


def _bucket(scope: PolicyScope) -> str:
    return scope.agent_bucket or DEFAULT_BUCKET_PATTERN


def agent_policy(scope: PolicyScope = PolicyScope()) -> dict[str, Any]:
    """For the instance profile's role: what xdrive-agent and its bootstrap call."""
    statements = [
        _statement(
            "XdriveDescribe",
            ["ec2:DescribeVolumes", "ec2:DescribeSnapshots", "ec2:DescribeInstances"],
            ["*"],
        ),
        _statement(
            "XdriveCreateVolume", ["ec2:CreateVolume"], [VOLUMES], _tagged("RequestTag", scope)
        ),
        _statement(
            "XdriveRestoreFromSnapshot",
            ["ec2:CreateVolume"],
            [SNAPSHOTS],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveUseVolume",
            [
                "ec2:AttachVolume",
                "ec2:DetachVolume",
                "ec2:DeleteVolume",
                "ec2:CreateSnapshot",
                "ec2:CreateTags",
            ],
            [VOLUMES],
            _tagged("ResourceTag", scope),
        ),
        _statement("XdriveAttachHere", ["ec2:AttachVolume", "ec2:DetachVolume"], [INSTANCES]),
        _statement(
            "XdriveCreateSnapshot",
            ["ec2:CreateSnapshot"],
            [SNAPSHOTS],
            _tagged("RequestTag", scope),
        ),
        _statement(
            "XdriveTagOnCreate",
            ["ec2:CreateTags"],
            [VOLUMES, SNAPSHOTS],
            {"StringEquals": {"ec2:CreateAction": ["CreateSnapshot", "CreateVolume"]}},
        ),
        _statement(
            "XdriveFetchAgent",
            ["s3:GetObject"],
            [f"arn:aws:s3:::{_bucket(scope)}/{AGENT_KEY_PREFIX}*"],
        ),
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def launcher_policy(scope: PolicyScope = PolicyScope()) -> dict[str, Any]:
    """For the user (or CI role) that runs `xdrive`: launch, list, save, prune, rm, stop."""
    bucket = _bucket(scope)
    statements = [
        _statement(
            "XdriveDescribe",
            [
                "ec2:DescribeAvailabilityZones",
                "ec2:DescribeInstanceTypeOfferings",
                "ec2:DescribeInstanceTypes",
                "ec2:DescribeInstances",
                "ec2:DescribeLaunchTemplates",
                "ec2:DescribeSnapshots",
                "ec2:DescribeSpotPriceHistory",
                "ec2:DescribeSubnets",
                "ec2:DescribeVolumes",
                "autoscaling:DescribeAutoScalingGroups",
            ],
            ["*"],
        ),
        _statement(
            "XdrivePublicImages", ["ssm:GetParameter"], ["arn:aws:ssm:*::parameter/aws/service/*"]
        ),
        _statement(
            "XdriveRunTagged",
            ["ec2:RunInstances"],
            [INSTANCES, SPOT_REQUESTS],
            _tagged("RequestTag", scope),
        ),
        _statement(
            "XdriveRunWith",
            ["ec2:RunInstances"],
            [
                "arn:aws:ec2:*::image/*",
                f"{_EC2}:subnet/*",
                f"{_EC2}:network-interface/*",
                f"{_EC2}:security-group/*",
                f"{_EC2}:key-pair/*",
                VOLUMES,  # the root volume (never tagged as the drive)
                LAUNCH_TEMPLATES,
            ],
        ),
        _statement(
            "XdriveStopInstances",
            ["ec2:TerminateInstances"],
            [INSTANCES],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveTagOnCreate",
            ["ec2:CreateTags"],
            [INSTANCES, SPOT_REQUESTS, SNAPSHOTS, LAUNCH_TEMPLATES],
            {
                "StringEquals": {
                    "ec2:CreateAction": ["CreateLaunchTemplate", "CreateSnapshot", "RunInstances"]
                }
            },
        ),
        _statement(
            "XdriveManageVolumes",
            ["ec2:CreateSnapshot", "ec2:DeleteVolume"],
            [VOLUMES],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveCreateSnapshot",
            ["ec2:CreateSnapshot"],
            [SNAPSHOTS],
            _tagged("RequestTag", scope),
        ),
        _statement(
            "XdriveDeleteSnapshot",
            ["ec2:DeleteSnapshot"],
            [SNAPSHOTS],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveCreateTemplate",
            ["ec2:CreateLaunchTemplate"],
            [LAUNCH_TEMPLATES],
            _tagged("RequestTag", scope),
        ),
        _statement(
            "XdriveManageTemplate",
            [
                "ec2:CreateLaunchTemplateVersion",
                "ec2:DeleteLaunchTemplate",
                "ec2:ModifyLaunchTemplate",
            ],
            [LAUNCH_TEMPLATES],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveCreateGroup",
            ["autoscaling:CreateAutoScalingGroup"],
            ["arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/xdrive-*"],
            _tagged("RequestTag", scope),
        ),
        _statement(
            "XdriveManageGroup",
            ["autoscaling:DeleteAutoScalingGroup"],  # ForceDelete: no resize to 0 first
            ["arn:aws:autoscaling:*:*:autoScalingGroup:*:autoScalingGroupName/xdrive-*"],
            _tagged("ResourceTag", scope),
        ),
        _statement(
            "XdriveAgentProfile",
            [
                "iam:AddRoleToInstanceProfile",
                "iam:CreateInstanceProfile",
                "iam:CreateRole",
                "iam:GetInstanceProfile",
                "iam:GetRole",
                "iam:PutRolePolicy",
            ],
            [
                f"arn:aws:iam::*:role/{AGENT_ROLE}",
                f"arn:aws:iam::*:instance-profile/{AGENT_PROFILE}",
            ],
        ),
        _statement(
            "XdrivePassAgentRole",
            ["iam:PassRole"],
            [f"arn:aws:iam::*:role/{AGENT_ROLE}"],
            {"StringEquals": {"iam:PassedToService": "ec2.amazonaws.com"}},
        ),
        _statement(
            "XdriveServiceRoles",
            ["iam:CreateServiceLinkedRole"],
            ["*"],
            {
                "StringEquals": {
                    "iam:AWSServiceName": ["autoscaling.amazonaws.com", "spot.amazonaws.com"]
                }
            },
        ),
        _statement(
            "XdriveAgentBucket",
            ["s3:CreateBucket", "s3:ListBucket", "s3:PutBucketPublicAccessBlock"],
            [f"arn:aws:s3:::{bucket}"],
        ),
        _statement(
            "XdriveAgentUpload",
            ["s3:GetObject", "s3:PutObject"],
            [f"arn:aws:s3:::{bucket}/{AGENT_KEY_PREFIX}*"],
        ),
    ]
    return {"Version": "2012-10-17", "Statement": statements}


def policies(scope: PolicyScope, role: Optional[PolicyRole] = None) -> dict[str, Any]:
    """One policy document (``role`` given) or both, keyed by role."""
    if role == "agent":
        return agent_policy(scope)
    if role == "launcher":
        return launcher_policy(scope)
    return {"agent": agent_policy(scope), "launcher": launcher_policy(scope)}


def policy_actions(document: dict[str, Any]) -> frozenset[str]:
    """Every action a policy document allows (what tests compare with the calls made)."""
    found: set[str] = set()
    for statement in document["Statement"]:
        actions = statement["Action"]
        found.update([actions] if isinstance(actions, str) else actions)
    return frozenset(found)


# --- the agent's instance profile ---------------------------------------------------------

ProfileStatus = Literal["exists", "missing"]


@dataclass(frozen=True)
class ProfileChoice:
    name: str
    status: ProfileStatus
    managed: bool  # xdrive creates it when missing (the default xdrive-agent profile)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def profile_status(iam: Any, name: str) -> ProfileStatus:
    with aws_errors("iam:GetInstanceProfile"):
        try:
            iam.get_instance_profile(InstanceProfileName=name)
        except ClientError as e:
            if _code(e) == "NoSuchEntity":
                return "missing"
            raise
    return "exists"


def choose_profile(iam: Any, name: Optional[str]) -> ProfileChoice:
    """``name`` must exist; without one, ``xdrive-agent`` (created at launch if missing)."""
    if name:
        if profile_status(iam, name) == "missing":
            raise ConfigError(
                f"instance profile {name!r} does not exist",
                "create it with a role holding `xdrive iam-policy --role agent`, or leave out "
                f"--instance-profile to use (and create) {AGENT_PROFILE}",
            )
        return ProfileChoice(name, "exists", managed=False)
    return ProfileChoice(AGENT_PROFILE, profile_status(iam, AGENT_PROFILE), managed=True)


def ensure_agent_profile(iam: Any, scope: PolicyScope) -> bool:
    """Create the xdrive-agent role (with the agent policy) and profile where missing.

    Each step is skipped when already done, so an interrupted run completes on the next.
    Returns True if anything was created.
    """
    created = False
    with aws_errors("iam:GetRole"):
        try:
            iam.get_role(RoleName=AGENT_ROLE)
            role_exists = True
        except ClientError as e:
            if _code(e) != "NoSuchEntity":
                raise
            role_exists = False
    if not role_exists:
        with aws_errors("iam:CreateRole"):
            iam.create_role(
                RoleName=AGENT_ROLE,
                AssumeRolePolicyDocument=json.dumps(TRUST_POLICY),
                Description="xdrive agent: restores and saves xdrive drives (EBS) on its instance",
            )
        with aws_errors("iam:PutRolePolicy"):
            iam.put_role_policy(
                RoleName=AGENT_ROLE,
                PolicyName=AGENT_POLICY_NAME,
                PolicyDocument=json.dumps(agent_policy(scope)),
            )
        created = True
    if profile_status(iam, AGENT_PROFILE) == "missing":
        with aws_errors("iam:CreateInstanceProfile"):
            iam.create_instance_profile(InstanceProfileName=AGENT_PROFILE)
        created = True
    with aws_errors("iam:GetInstanceProfile"):
        profile = iam.get_instance_profile(InstanceProfileName=AGENT_PROFILE)["InstanceProfile"]
    if not any(r.get("RoleName") == AGENT_ROLE for r in profile.get("Roles", [])):
        with aws_errors("iam:AddRoleToInstanceProfile"):
            iam.add_role_to_instance_profile(InstanceProfileName=AGENT_PROFILE, RoleName=AGENT_ROLE)
        created = True
    return created
