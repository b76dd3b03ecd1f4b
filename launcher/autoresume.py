"""`launch --auto-resume`: a launch template and an Auto Scaling group of one spot instance.

When AWS reclaims the instance, its agent saves the drive, and the group starts another
one in whichever zone has capacity; that instance's agent restores the drive, so the work
resumes with nobody at the keyboard. Max size 1 keeps one writer per drive. The group's
instances distribution (not the template) asks for spot, which is what Auto Scaling
requires of a mixed-instances group. Capacity rebalancing stays off: it would start the
replacement while the old instance still holds the drive, and the new agent could only wait.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from botocore.exceptions import ClientError

from xdrive import tags
from xdrive.ec2 import MarketType, aws_errors

GROUP_PREFIX = "xdrive-"


def group_name(drive: str) -> str:
    """The Auto Scaling group (and launch template) name of a drive."""
    return f"{GROUP_PREFIX}{drive}"


@dataclass(frozen=True)
class AutoResumeGroup:
    name: str
    drive: Optional[str]
    min_size: int
    max_size: int
    desired: int
    instances: tuple[str, ...]
    zones: tuple[str, ...]
    template: Optional[str]
    status: Optional[str]  # "Delete in progress" while going away
    market: Optional[MarketType]


def _group_from_api(data: Mapping[str, Any]) -> AutoResumeGroup:
    group_tags = {t["Key"]: t["Value"] for t in data.get("Tags", [])}
    policy = data.get("MixedInstancesPolicy") or {}
    spec = (
        (policy.get("LaunchTemplate") or {}).get("LaunchTemplateSpecification")
        or data.get("LaunchTemplate")
        or {}
    )
    distribution = policy.get("InstancesDistribution") or {}
    market: Optional[MarketType] = None
    if distribution:
        on_demand = int(distribution.get("OnDemandPercentageAboveBaseCapacity", 100))
        market = "on-demand" if on_demand >= 100 else "spot"
    return AutoResumeGroup(
        name=data["AutoScalingGroupName"],
        drive=group_tags.get(tags.NAME),
        min_size=int(data.get("MinSize", 0)),
        max_size=int(data.get("MaxSize", 0)),
        desired=int(data.get("DesiredCapacity", 0)),
        instances=tuple(sorted(i["InstanceId"] for i in data.get("Instances", []))),
        zones=tuple(sorted(data.get("AvailabilityZones", []))),
        template=spec.get("LaunchTemplateName"),
        status=data.get("Status"),
        market=market,
    )


def describe_group(autoscaling: Any, drive: str) -> Optional[AutoResumeGroup]:
    with aws_errors("autoscaling:DescribeAutoScalingGroups"):
        answer = autoscaling.describe_auto_scaling_groups(AutoScalingGroupNames=[group_name(drive)])
    found = answer.get("AutoScalingGroups", [])
    return _group_from_api(found[0]) if found else None


def describe_groups(autoscaling: Any) -> tuple[AutoResumeGroup, ...]:
    """Every Auto Scaling group of a drive (tagged ``xdrive:name``), by name."""
    groups: list[AutoResumeGroup] = []
    with aws_errors("autoscaling:DescribeAutoScalingGroups"):
        for page in autoscaling.get_paginator("describe_auto_scaling_groups").paginate():
            for data in page.get("AutoScalingGroups", []):
                group = _group_from_api(data)
                if group.drive:
                    groups.append(group)
    return tuple(sorted(groups, key=lambda g: g.name))


def create_group(
    autoscaling: Any,
    drive: str,
    template: str,
    subnet_ids: Sequence[str],
    instance_type: str,
    market: MarketType,
    max_price: Optional[str] = None,
) -> None:
    """One instance (min = max = desired = 1) from ``template`` across ``subnet_ids``."""
    distribution: dict[str, Any] = {
        "OnDemandBaseCapacity": 0,
        "OnDemandPercentageAboveBaseCapacity": 0 if market == "spot" else 100,
        # Spot pools least likely to be interrupted soon, among the cheap ones.
        "SpotAllocationStrategy": "price-capacity-optimized",
    }
    if market == "spot" and max_price is not None:
        distribution["SpotMaxPrice"] = max_price
    group_tags = {tags.NAME: drive, tags.CONSOLE_NAME: group_name(drive)}
    with aws_errors("autoscaling:CreateAutoScalingGroup"):
        autoscaling.create_auto_scaling_group(
            AutoScalingGroupName=group_name(drive),
            MinSize=1,
            MaxSize=1,
            DesiredCapacity=1,
            VPCZoneIdentifier=",".join(subnet_ids),
            MixedInstancesPolicy={
                "LaunchTemplate": {
                    "LaunchTemplateSpecification": {
                        "LaunchTemplateName": template,
                        "Version": "$Default",
                    },
                    "Overrides": [{"InstanceType": instance_type}],
                },
                "InstancesDistribution": distribution,
            },
            CapacityRebalance=False,
            HealthCheckType="EC2",
            Tags=[
                {
                    "Key": key,
                    "Value": value,
                    "PropagateAtLaunch": True,
                    "ResourceId": group_name(drive),
                    "ResourceType": "auto-scaling-group",
                }
                for key, value in sorted(group_tags.items())
            ],
        )


def delete_group(autoscaling: Any, drive: str) -> bool:
    """Delete the drive's group and terminate its instance (their agents save the drive).

    False if there was no group.
    """
    with aws_errors("autoscaling:DeleteAutoScalingGroup"):
        try:
            autoscaling.delete_auto_scaling_group(
                AutoScalingGroupName=group_name(drive), ForceDelete=True
            )
        except ClientError as e:
            if "not found" in str(e.response.get("Error", {}).get("Message", "")):
                return False
            raise
    return True
