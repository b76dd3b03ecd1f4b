"""`xdrive launch`: plan (reads only), then carry the plan out.

The plan reads everything and checks everything a launch depends on before the first
change: the name, the instance type, the drive (one writer: no instance may hold it), the
image, the zones, the subnets, the instance profile, the user-data (16 KB, no
credentials), and a RunInstances dry run, which is how EC2 says whether the call would be
allowed and valid without doing it. Bad input therefore fails with nothing created, and
``--dry-run`` shows the plan and stops there.

Then, in order: the ``xdrive-agent`` instance profile if it is missing, the agent archive
in S3 if it is missing, and the instance (or the launch template and the Auto Scaling
group with ``--auto-resume``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable, Literal, Optional

from xdrive import __version__, tags
from xdrive.cloudinit.bundle import AgentArchive
from xdrive.cloudinit.render import Distro
from xdrive.ec2 import (
    Ec2,
    Ec2ApiError,
    InstanceDetails,
    InstanceSpec,
    LaunchTemplate,
    MarketType,
    Subnet,
)
from xdrive.errors import AwsError, ConfigError, DriveBusy
from xdrive.launcher import autoresume, iam
from xdrive.launcher.agentstore import is_uploaded
from xdrive.launcher.autoresume import AutoResumeGroup
from xdrive.launcher.aws import Aws
from xdrive.launcher.drives import observe_drive, require_free
from xdrive.launcher.images import ImageChoice, resolve_image
from xdrive.launcher.placement import DrivePlacement, choose_zone, drive_placement
from xdrive.launcher.prices import Ec2PriceSource, PriceSource, ZonePrice
from xdrive.launcher.userdata import (
    DEFAULT_SIZE_GIB,
    AgentSource,
    publish_agent,
    render,
    s3_agent_source,
)
from xdrive.names import validate_drive_name

DEFAULT_INSTANCE_TYPE = "t3.micro"
PROFILE_PROPAGATION_S = 90.0
# RunInstances errors about capacity, price and quotas, not about the request.
_NO_CAPACITY = frozenset(
    {
        "InsufficientInstanceCapacity",
        "InstanceLimitExceeded",
        "MaxSpotInstanceCountExceeded",
        "SpotMaxPriceTooLow",
        "VcpuLimitExceeded",
    }
)  # IAM: a new instance profile takes a while to reach EC2
Progress = Callable[[str], None]
LaunchMode = Literal["instance", "auto-resume"]


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class LaunchOptions:
    drive: str
    instance_type: str = DEFAULT_INSTANCE_TYPE
    market: MarketType = "spot"
    max_price: Optional[float] = None  # USD per hour; spot only
    ami: Optional[str] = None
    gpu: Optional[bool] = None  # None: the GPU image exactly for GPU instance types
    distro: Distro = "al2023"
    key_name: Optional[str] = None
    security_groups: tuple[str, ...] = ()
    subnet: Optional[str] = None
    instance_profile: Optional[str] = None  # None: xdrive-agent, created if missing
    size_gib: int = DEFAULT_SIZE_GIB  # of a new drive's first volume
    agent_bucket: Optional[str] = None  # None: xdrive-agent-ACCOUNT-REGION
    auto_resume: bool = False


@dataclass(frozen=True)
class LaunchPlan:
    drive: str
    region: str
    mode: LaunchMode
    instance_type: str
    market: MarketType
    max_price: Optional[float]
    image: ImageChoice
    placement: DrivePlacement
    zone: Optional[str]  # the one zone of a single instance; None: the group's zones
    price: Optional[float]  # spot price in ``zone``
    zones: tuple[ZonePrice, ...]  # the zones considered, with their spot prices
    subnets: tuple[Subnet, ...]
    profile: iam.ProfileChoice
    agent: AgentSource
    agent_in_s3: bool  # the archive is already uploaded
    spec: InstanceSpec  # the instance (or template) request, user-data included
    group: Optional[str]  # Auto Scaling group and launch template name

    @property
    def userdata_bytes(self) -> int:
        return len(self.spec.user_data)


@dataclass(frozen=True)
class LaunchResult:
    plan: LaunchPlan
    dry_run: bool
    instance: Optional[InstanceDetails] = None
    template: Optional[LaunchTemplate] = None
    group: Optional[AutoResumeGroup] = None
    created_profile: bool = False
    uploaded_agent: bool = False


def _check_options(options: LaunchOptions) -> None:
    validate_drive_name(options.drive)
    if options.max_price is not None:
        if options.market != "spot":
            raise ConfigError("--max-price is for spot instances", "drop it with --on-demand")
        if options.max_price <= 0:
            raise ConfigError(
                f"--max-price {options.max_price} is not a price", "give USD per hour, e.g. 0.5"
            )


def plan_launch(
    aws: Aws,
    options: LaunchOptions,
    prices: Optional[PriceSource] = None,
) -> tuple[LaunchPlan, AgentArchive]:
    """Everything a launch needs, read and checked; nothing is created."""
    _check_options(options)
    ec2 = aws.ec2
    name = options.drive
    instance_type = ec2.instance_type(options.instance_type)
    group = autoresume.describe_group(aws.client("autoscaling"), name)
    if group is not None:
        raise DriveBusy(
            f"cannot launch: drive {name} already resumes automatically "
            f"(Auto Scaling group {group.name})",
            f"stop it first with `xdrive stop {name}`",
        )
    view = observe_drive(ec2, name)
    require_free(view, "launch")
    image = resolve_image(
        aws.client("ssm"), options.distro, instance_type, options.gpu, options.ami
    )
    placement = drive_placement(view.volumes, view.snapshots)
    region_zones = ec2.availability_zones()
    offered = set(ec2.instance_type_zones(instance_type.name))
    subnets = _subnets(aws, options.subnet)
    usable = offered & {s.availability_zone for s in subnets}
    spot = options.market == "spot"
    spot_prices = (prices or Ec2PriceSource(ec2)).spot_prices(instance_type.name) if spot else None
    if options.auto_resume:
        # The group spans every usable zone: an instance elsewhere than an unsaved volume's
        # zone first saves and moves it (slower, never lost).
        everywhere = replace(placement, zones=None)
        choice = choose_zone(name, everywhere, region_zones, usable, spot_prices, options.max_price)
        zone: Optional[str] = None
        chosen = tuple(
            s
            for s in subnets
            if s.availability_zone in {z.availability_zone for z in choice.candidates}
        )
    else:
        choice = choose_zone(name, placement, region_zones, usable, spot_prices, options.max_price)
        zone = choice.zone
        chosen = (next(s for s in subnets if s.availability_zone == zone),)
    profile = iam.choose_profile(aws.client("iam"), options.instance_profile)
    archive, agent = s3_agent_source(aws, options.agent_bucket)
    in_s3 = agent.target is None or is_uploaded(aws.client("s3"), agent.target, aws.account_id)
    user_data = render(name, agent, distro=options.distro, size_gib=options.size_gib, compress=True)
    spec = InstanceSpec(
        image_id=image.image_id,
        instance_type=instance_type.name,
        user_data=user_data,
        tags={tags.NAME: name, tags.CONSOLE_NAME: f"xdrive-{name}", tags.VERSION: __version__},
        market=options.market,
        max_price=_price_text(options.max_price),
        subnet_id=chosen[0].id if not options.auto_resume else None,
        security_group_ids=options.security_groups,
        key_name=options.key_name,
        instance_profile=profile.name,
    )
    # EC2 checks permissions, image, subnet, security groups and key pair, creating nothing.
    # A profile not created yet cannot be named in it.
    probe = spec if profile.status == "exists" else replace(spec, instance_profile=None)
    ec2.run_instance(replace(probe, subnet_id=chosen[0].id), dry_run=True)
    plan = LaunchPlan(
        drive=name,
        region=aws.region,
        mode="auto-resume" if options.auto_resume else "instance",
        instance_type=instance_type.name,
        market=options.market,
        max_price=options.max_price,
        image=image,
        placement=placement,
        zone=zone,
        price=choice.price if zone else None,
        zones=choice.candidates,
        subnets=chosen,
        profile=profile,
        agent=agent,
        agent_in_s3=in_s3,
        spec=spec,
        group=autoresume.group_name(name) if options.auto_resume else None,
    )
    return plan, archive


def _price_text(price: Optional[float]) -> Optional[str]:
    return None if price is None else f"{price:.6f}".rstrip("0").rstrip(".")


def _subnets(aws: Aws, subnet: Optional[str]) -> tuple[Subnet, ...]:
    if subnet:
        return aws.ec2.subnets([subnet])
    found = aws.ec2.subnets(default_for_az=True)
    if not found:
        raise ConfigError(
            f"there is no default VPC in {aws.region}",
            "pass --subnet subnet-... (with a route to the internet for the agent's download),"
            " or create the default VPC: `aws ec2 create-default-vpc`",
        )
    return found


def launch(
    aws: Aws,
    options: LaunchOptions,
    *,
    dry_run: bool = False,
    wait: bool = True,
    prices: Optional[PriceSource] = None,
    progress: Progress = _quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> LaunchResult:
    """`xdrive launch`: plan, and unless ``dry_run``, launch."""
    plan, archive = plan_launch(aws, options, prices)
    if dry_run:
        return LaunchResult(plan, dry_run=True)
    created_profile = False
    if plan.profile.managed and plan.profile.status == "missing":
        progress(f"creating instance profile {plan.profile.name}")
        bucket = plan.agent.target.bucket if plan.agent.target else None
        created_profile = iam.ensure_agent_profile(
            aws.client("iam"), iam.PolicyScope(agent_bucket=bucket)
        )
    uploaded = False
    if not plan.agent_in_s3:
        progress(f"uploading the agent to {plan.agent.url}")
        uploaded = publish_agent(aws, archive, plan.agent)
    if plan.mode == "auto-resume":
        template, group = _start_group(aws, plan, progress)
        return LaunchResult(
            plan,
            False,
            template=template,
            group=group,
            created_profile=created_profile,
            uploaded_agent=uploaded,
        )
    progress(f"launching {plan.instance_type} ({plan.market}) in {plan.zone}")
    instance = start_instance(aws.ec2, plan.spec, created_profile, sleep)
    if wait:

        def report(found: object) -> None:
            progress(f"waiting for {instance.id} to run")

        aws.ec2.wait_instances([instance.id], ("running",), on_progress=report)
        instance = next(i for i in aws.ec2.drive_instances(plan.drive) if i.id == instance.id)
    return LaunchResult(
        plan, False, instance=instance, created_profile=created_profile, uploaded_agent=uploaded
    )


def start_instance(
    ec2: Ec2, spec: InstanceSpec, new_profile: bool, sleep: Callable[[float], None]
) -> InstanceDetails:
    """RunInstances; a profile created moments ago is retried until EC2 knows it."""
    waited = 0.0
    while True:
        try:
            instance = ec2.run_instance(spec)
        except Ec2ApiError as e:
            if e.code in _NO_CAPACITY:
                raise AwsError(
                    f"EC2 cannot start a {spec.instance_type} now ({e.code}: {e.aws_message})",
                    "retry in a while, or choose another --instance-type, a higher --max-price "
                    "or --on-demand (for a quota, ask AWS to raise it); nothing was launched",
                ) from e
            propagating = "profile" in e.aws_message.lower() and e.code in (
                "InvalidParameterValue",
                "NoSuchEntity",
            )
            if not (new_profile and propagating and waited < PROFILE_PROPAGATION_S):
                raise
            sleep(5.0)
            waited += 5.0
            continue
        assert instance is not None
        return instance


def _start_group(
    aws: Aws, plan: LaunchPlan, progress: Progress
) -> tuple[LaunchTemplate, Optional[AutoResumeGroup]]:
    assert plan.group is not None
    existing = aws.ec2.launch_template(plan.group)
    if existing is None:
        progress(f"creating launch template {plan.group}")
        template = aws.ec2.create_launch_template(
            plan.group, plan.spec, {tags.NAME: plan.drive, tags.CONSOLE_NAME: plan.group}
        )
    else:
        progress(f"updating launch template {plan.group}")
        template = aws.ec2.update_launch_template(plan.group, plan.spec)
    progress(f"creating Auto Scaling group {plan.group} across {len(plan.subnets)} zone(s)")
    autoscaling = aws.client("autoscaling")
    autoresume.create_group(
        autoscaling,
        plan.drive,
        template.name,
        [s.id for s in plan.subnets],
        plan.instance_type,
        plan.market,
        _price_text(plan.max_price),
    )
    return template, autoresume.describe_group(autoscaling, plan.drive)
