"""IAM in the sandbox: evaluate a policy document against the EC2 calls a caller makes.

moto accepts every call. To show that the generated policies work, conditions included,
the sandbox can enforce a policy for one access key: each EC2 request is turned into the
authorization checks EC2 makes (one per resource it touches, with the condition keys that
apply: ``aws:ResourceTag/K`` of an existing resource, ``aws:RequestTag/K`` of the tags in
the request, ``ec2:CreateAction`` for tags applied on create) and every check must be
allowed. The resource model follows EC2's service authorization reference for the actions
xdrive's agent calls; any other action is checked against ``Resource: "*"``, so a policy
can only grant it unconditionally (conservative: an unmodelled action is never allowed by
a condition the sandbox cannot evaluate).

The evaluator supports what the generated policies use (Allow/Deny, action and resource
wildcards, StringEquals and StringLike) and refuses anything else rather than guess.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

from xdrive.sandbox.ec2wire import numbered

_SPEC_TYPE = re.compile(r"^TagSpecification\.(\d+)\.ResourceType$")
_OPERATORS = ("StringEquals", "StringLike")
# Resource id prefix -> ARN resource type; snapshots and images have no account in theirs.
_KINDS = {
    "vol": "volume",
    "snap": "snapshot",
    "i": "instance",
    "lt": "launch-template",
    "sg": "security-group",
    "subnet": "subnet",
    "ami": "image",
    "eni": "network-interface",
}
_ACCOUNTLESS = ("snapshot", "image")


@dataclass(frozen=True)
class Check:
    """One authorization: ``action`` on the resource ``arn`` with these condition keys."""

    action: str
    arn: str
    context: Mapping[str, str] = field(default_factory=dict)


class UnsupportedPolicy(ValueError):
    """The policy uses IAM features this evaluator does not model."""


def allows(policy: Mapping[str, Any], check: Check) -> bool:
    """Whether ``policy`` allows ``check``: some Allow statement matches and no Deny does."""
    allowed = False
    for statement in policy["Statement"]:
        if not _matches(statement, check):
            continue
        if statement["Effect"] == "Deny":
            return False
        allowed = True
    return allowed


def _listed(value: Any) -> list[str]:
    return [value] if isinstance(value, str) else list(value)


def _matches(statement: Mapping[str, Any], check: Check) -> bool:
    unsupported = set(statement) - {"Sid", "Effect", "Action", "Resource", "Condition"}
    if unsupported:
        raise UnsupportedPolicy(f"statement keys {sorted(unsupported)} are not modelled")
    if not any(
        fnmatch.fnmatchcase(check.action.lower(), a.lower()) for a in _listed(statement["Action"])
    ):
        return False
    if not any(fnmatch.fnmatchcase(check.arn, r) for r in _listed(statement["Resource"])):
        return False
    return _conditions_hold(statement.get("Condition", {}), check.context)


def _conditions_hold(condition: Mapping[str, Any], context: Mapping[str, str]) -> bool:
    for operator, pairs in condition.items():
        if operator not in _OPERATORS:
            raise UnsupportedPolicy(f"condition operator {operator} is not modelled")
        for key, expected in pairs.items():
            actual = context.get(key)
            if actual is None:  # a key absent from the request never matches
                return False
            patterns = _listed(expected)
            if operator == "StringEquals" and actual not in patterns:
                return False
            if operator == "StringLike" and not any(
                fnmatch.fnmatchcase(actual, p) for p in patterns
            ):
                return False
    return True


# --- EC2 requests as authorization checks --------------------------------------------------


@dataclass(frozen=True)
class Ec2State:
    """What the checks read of EC2: the caller's region and account, resource tags, and
    which instance a volume is attached to."""

    region: str
    account: str
    tags: Mapping[str, Mapping[str, str]]  # resource id -> its tags
    attached_to: Mapping[str, str]  # volume id -> instance id
    launch_templates: Mapping[str, str] = field(default_factory=dict)  # name -> id

    def arn(self, resource_id: str) -> str:
        kind = _KINDS.get(resource_id.split("-")[0], "unknown")
        if kind in _ACCOUNTLESS:
            return f"arn:aws:ec2:{self.region}::{kind}/{resource_id}"
        return f"arn:aws:ec2:{self.region}:{self.account}:{kind}/{resource_id}"

    def new(self, kind: str) -> str:
        """The ARN a resource being created is authorized as."""
        if kind in _ACCOUNTLESS:
            return f"arn:aws:ec2:{self.region}::{kind}/*"
        return f"arn:aws:ec2:{self.region}:{self.account}:{kind}/*"

    def resource_tags(self, resource_id: str) -> dict[str, str]:
        return {f"aws:ResourceTag/{k}": v for k, v in self.tags.get(resource_id, {}).items()}


def _tags(params: Sequence[tuple[str, str]], prefix: str = "") -> dict[str, str]:
    """The tags of ``{prefix}Tag.N.Key`` / ``{prefix}Tag.N.Value`` parameters."""
    pattern = re.compile(rf"^{re.escape(prefix)}Tag\.(\d+)\.(Key|Value)$")
    keys: dict[str, str] = {}
    values: dict[str, str] = {}
    for name, value in params:
        m = pattern.match(name)
        if m:
            (keys if m.group(2) == "Key" else values)[m.group(1)] = value
    return {key: values.get(n, "") for n, key in keys.items()}


def _request_tags(params: Sequence[tuple[str, str]]) -> dict[str, dict[str, str]]:
    """TagSpecification.N: resource type -> the tags it asks for."""
    found: dict[str, dict[str, str]] = {}
    for name, value in params:
        m = _SPEC_TYPE.match(name)
        if m:
            found.setdefault(value, {}).update(_tags(params, f"TagSpecification.{m.group(1)}."))
    return found


def _as_request_tags(tags: Mapping[str, str]) -> dict[str, str]:
    return {f"aws:RequestTag/{k}": v for k, v in tags.items()}


def ec2_checks(action: str, params: Sequence[tuple[str, str]], state: Ec2State) -> list[Check]:
    """The authorization checks EC2 makes for one request."""
    get = dict(params).get
    name = f"ec2:{action}"
    specs = _request_tags(params)
    if action.startswith("Describe"):
        return [Check(name, "*")]
    if action in ("CreateVolume", "CreateSnapshot"):
        kind = "volume" if action == "CreateVolume" else "snapshot"
        asked = _as_request_tags(specs.get(kind, {}))
        checks = [Check(name, state.new(kind), asked)]
        source = get("SnapshotId") if kind == "volume" else get("VolumeId")
        if source:
            checks.append(Check(name, state.arn(source), {**state.resource_tags(source), **asked}))
        if specs.get(kind):  # tags on create are authorized as ec2:CreateTags too
            checks.append(
                Check("ec2:CreateTags", state.new(kind), {**asked, "ec2:CreateAction": action})
            )
        return checks
    if action in ("AttachVolume", "DetachVolume"):
        volume = get("VolumeId") or ""
        checks = [Check(name, state.arn(volume), state.resource_tags(volume))]
        instance = get("InstanceId") or state.attached_to.get(volume)
        if instance:  # (a detach of a volume attached nowhere fails on its state instead)
            checks.append(Check(name, state.arn(instance), state.resource_tags(instance)))
        return checks
    if action in ("DeleteVolume", "DeleteSnapshot"):
        resource = get("VolumeId") or get("SnapshotId") or ""
        return [Check(name, state.arn(resource), state.resource_tags(resource))]
    if action == "RunInstances":
        return _run_instances_checks(params, specs, state)
    if action == "CreateLaunchTemplate":
        asked = _as_request_tags(specs.get("launch-template", {}))
        checks = [Check(name, state.new("launch-template"), asked)]
        if asked:
            on_create = {**asked, "ec2:CreateAction": action}
            checks.append(Check("ec2:CreateTags", state.new("launch-template"), on_create))
        return checks
    if action in ("CreateLaunchTemplateVersion", "ModifyLaunchTemplate", "DeleteLaunchTemplate"):
        template = get("LaunchTemplateId") or state.launch_templates.get(
            get("LaunchTemplateName") or "", ""
        )
        return [Check(name, state.arn(template), state.resource_tags(template))]
    if action == "TerminateInstances":
        ids = numbered(params, "InstanceId")
        return [Check(name, state.arn(i), state.resource_tags(i)) for i in ids]
    if action == "CreateTags":
        asked = _as_request_tags(_tags(params))
        return [
            Check(name, state.arn(r), {**state.resource_tags(r), **asked})
            for r in numbered(params, "ResourceId")
        ]
    return [Check(name, "*")]


def _run_instances_checks(
    params: Sequence[tuple[str, str]], specs: Mapping[str, Mapping[str, str]], state: Ec2State
) -> list[Check]:
    """RunInstances is authorized on each resource it uses or creates; the tags asked for
    (instance and spot request) apply to all of them, and are authorized as CreateTags."""
    get = dict(params).get
    name = "ec2:RunInstances"
    asked: dict[str, str] = {}
    for tags in specs.values():
        asked.update(_as_request_tags(tags))

    def existing(resource_id: Optional[str], kind: str) -> str:
        return state.arn(resource_id) if resource_id else state.new(kind)

    groups = numbered(params, "SecurityGroupId")
    used = [
        existing(get("ImageId"), "image"),
        existing(get("SubnetId"), "subnet"),
        *([state.arn(g) for g in groups] or [state.new("security-group")]),
        state.new("network-interface"),
        state.new("volume"),  # the root volume
        state.new("instance"),
    ]
    if get("KeyName"):
        used.append(f"arn:aws:ec2:{state.region}:{state.account}:key-pair/{get('KeyName')}")
    if get("InstanceMarketOptions.MarketType") == "spot":
        used.append(state.new("spot-instances-request"))
    checks = [Check(name, arn, asked) for arn in used]
    for kind in specs:
        on_create = {**asked, "ec2:CreateAction": "RunInstances"}
        checks.append(Check("ec2:CreateTags", state.new(kind), on_create))
    return checks


def first_denied(policy: Mapping[str, Any], checks: Sequence[Check]) -> Optional[Check]:
    for check in checks:
        if not allows(policy, check):
            return check
    return None
