"""`xdrive launch` against the sandbox over HTTP: the EC2, IAM, S3 and Auto Scaling state it
leaves, the zone it picks, the image it picks, and bad input refused with nothing created.

The sandbox's spot price history is one constant for every zone, so the zone choice is
shown through the library with a ``FixedPrices`` table (the same code path, another price
source); through the CLI, a tie goes to the first zone by name.
"""

# ruff: noqa: F811 (the fixtures imported from tests.launcher_fixtures are parameters here)
from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from moto.ssm.models import Parameter, ssm_backends

import xdrive
from tests.launcher_fixtures import (  # noqa: F401 (fixtures)
    ACCOUNT,
    REGION,
    aws,
    aws_env,
    cloud_init_available,
    cloud_init_says_valid,
    decode_userdata,
    ec2,
    instance,
    instance_userdata,
    inventory,
    live_instances,
    make_snapshot,
    make_volume,
    one_line_error,
    run,
    tag_map,
)
from xdrive.ec2 import Ec2
from xdrive.launcher.aws import Aws
from xdrive.launcher.iam import (
    AGENT_POLICY_NAME,
    AGENT_PROFILE,
    AGENT_ROLE,
    PolicyScope,
    agent_policy,
)
from xdrive.launcher.images import image_parameter
from xdrive.launcher.launch import LaunchOptions, launch
from xdrive.launcher.prices import FixedPrices
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.settings import Faults

BUCKET = f"xdrive-agent-{ACCOUNT}-{REGION}"


def launched(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def ssm_value(sandbox: Sandbox, name: str) -> str:
    value: str = sandbox.client("ssm").get_parameter(Name=name)["Parameter"]["Value"]
    return value


def publish_parameter(name: str, value: str) -> None:
    """What AWS publishes and moto lacks (its /aws/ names are read-only over the API)."""
    backend = ssm_backends[ACCOUNT][REGION]
    backend._parameters[name].append(
        Parameter(  # type: ignore[abstract]
            account_id=ACCOUNT,
            name=name,
            value=value,
            parameter_type="String",
            description=None,
            allowed_pattern=None,
            keyid=None,
            last_modified_date=datetime.now(timezone.utc),
            version=1,
            data_type="aws:ec2:image",
        )
    )


# --- a launch and the state it leaves -----------------------------------------------------------


def test_launch_starts_a_tagged_imdsv2_spot_instance_with_the_drive(
    aws_env: Sandbox, tmp_path: Path
) -> None:
    out = launched(run("launch", "work", "--json"))
    iid = out["instance"]["id"]
    data = instance(aws_env, iid)
    assert data["State"]["Name"] == "running"
    assert data["InstanceLifecycle"] == "spot"
    assert data["MetadataOptions"]["HttpTokens"] == "required"
    assert data["InstanceType"] == "t3.micro"
    assert data["Placement"]["AvailabilityZone"] == out["plan"]["zone"]
    assert tag_map(data)["xdrive:name"] == "work"
    # The image is the latest Amazon Linux 2023, from its public SSM parameter.
    al2023 = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
    assert data["ImageId"] == ssm_value(aws_env, al2023)
    shutdown = aws_env.client("ec2").describe_instance_attribute(
        InstanceId=iid, Attribute="instanceInitiatedShutdownBehavior"
    )
    assert shutdown["InstanceInitiatedShutdownBehavior"]["Value"] == "terminate"
    # The root volume is not a volume of the drive: only the agent creates those.
    assert Ec2(aws_env.client("ec2")).drive_volumes("work") == ()

    # User-data: valid cloud-config for drive work, fetching this very agent from S3.
    text = instance_userdata(aws_env, iid)
    assert text.startswith("#cloud-config\n")
    assert '"drive": "work"' in text
    # (The sha256 comes from the plan: other work on agent/ may change the sources meanwhile.)
    sha256 = out["plan"]["agent"]["sha256"]
    key = f"xdrive/agent/{xdrive.__version__}/{sha256}.tar.gz"
    assert f"s3://{BUCKET}/{key}" in text and f'"agent_sha256": "{sha256}"' in text
    if cloud_init_available():
        cloud_init_says_valid(text, tmp_path)
    body = aws_env.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256

    # The instance profile xdrive-agent was made from the generated agent policy.
    iam = aws_env.client("iam")
    profile = iam.get_instance_profile(InstanceProfileName=AGENT_PROFILE)["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == [AGENT_ROLE]
    document = iam.get_role_policy(RoleName=AGENT_ROLE, PolicyName=AGENT_POLICY_NAME)[
        "PolicyDocument"
    ]
    document = json.loads(document) if isinstance(document, str) else document
    assert document == agent_policy(PolicyScope(agent_bucket=BUCKET))
    assert out["created_profile"] is True and out["uploaded_agent"] is True

    # One writer per drive: a second launch is refused while the first instance lives.
    before = inventory(aws_env)
    assert "in use by " + iid in one_line_error(run("launch", "work"))
    assert inventory(aws_env) == before


def test_on_demand_launch_with_options(aws_env: Sandbox) -> None:
    ec2 = aws_env.client("ec2")
    group = ec2.create_security_group(GroupName="ssh", Description="ssh")["GroupId"]
    ec2.create_key_pair(KeyName="me")
    subnet = Ec2(ec2).subnets(default_for_az=True)[2]
    out = launched(
        run(
            "launch", "work", "--on-demand", "-t", "m5.large", "--key-name", "me",
            "--security-group", group, "--subnet", subnet.id, "--json",
        )
    )  # fmt: skip
    data = instance(aws_env, out["instance"]["id"])
    assert "InstanceLifecycle" not in data
    assert data["InstanceType"] == "m5.large"
    assert data["KeyName"] == "me"
    assert data["SubnetId"] == subnet.id
    assert data["Placement"]["AvailabilityZone"] == subnet.availability_zone
    assert group in [g["GroupId"] for g in data["SecurityGroups"]]
    assert data["MetadataOptions"]["HttpTokens"] == "required"


def test_dry_run_prints_the_plan_and_creates_nothing(aws_env: Sandbox) -> None:
    before = inventory(aws_env)
    aws_env.fidelity.clear_recorded()
    result = run("launch", "work", "--dry-run")
    assert result.exit_code == 0, result.output
    assert "dry run: nothing was created" in result.stdout
    assert inventory(aws_env) == before
    mutating = [
        c.iam_action
        for c in aws_env.fidelity.recorded_actions()
        if not c.action.startswith(("Describe", "Get", "List", "HEAD ", "GET "))
    ]
    # The one RunInstances was EC2's dry run (answered DryRunOperation, HTTP 412).
    assert mutating == ["ec2:RunInstances"]
    assert [
        c.status for c in aws_env.fidelity.recorded_actions() if c.action == "RunInstances"
    ] == [412]
    auto = run("launch", "work", "--auto-resume", "--dry-run", "--json")
    assert launched(auto)["plan"]["mode"] == "auto-resume"
    assert inventory(aws_env) == before


# --- auto-resume ---------------------------------------------------------------------------------


def test_auto_resume_makes_a_template_and_a_group_of_one_spot_instance(
    aws_env: Sandbox, tmp_path: Path
) -> None:
    out = launched(run("launch", "work", "--auto-resume", "--json"))
    ec2 = aws_env.client("ec2")
    version = ec2.describe_launch_template_versions(
        LaunchTemplateName="xdrive-work", Versions=["$Default"]
    )
    template = version["LaunchTemplateVersions"][0]["LaunchTemplateData"]
    assert template["MetadataOptions"]["HttpTokens"] == "required"
    assert template["IamInstanceProfile"] == {"Name": AGENT_PROFILE}
    assert "InstanceMarketOptions" not in template  # the group's distribution asks for spot
    (instance_tags,) = [
        t["Tags"] for t in template["TagSpecifications"] if t["ResourceType"] == "instance"
    ]
    assert {"Key": "xdrive:name", "Value": "work"} in instance_tags
    text = decode_userdata(template["UserData"])
    assert text.startswith("#cloud-config\n") and '"drive": "work"' in text
    if cloud_init_available():
        cloud_init_says_valid(text, tmp_path)

    (group,) = aws_env.client("autoscaling").describe_auto_scaling_groups(
        AutoScalingGroupNames=["xdrive-work"]
    )["AutoScalingGroups"]
    assert (group["MinSize"], group["MaxSize"], group["DesiredCapacity"]) == (1, 1, 1)
    policy = group["MixedInstancesPolicy"]
    assert policy["InstancesDistribution"]["OnDemandPercentageAboveBaseCapacity"] == 0
    assert policy["InstancesDistribution"]["OnDemandBaseCapacity"] == 0
    assert policy["LaunchTemplate"]["Overrides"] == [{"InstanceType": "t3.micro"}]
    assert (
        policy["LaunchTemplate"]["LaunchTemplateSpecification"]["LaunchTemplateName"]
        == "xdrive-work"
    )
    # Across the region's zones that offer the type: one default subnet each.
    subnets = set(group["VPCZoneIdentifier"].split(","))
    zones = {
        s["AvailabilityZone"] for s in ec2.describe_subnets(SubnetIds=sorted(subnets))["Subnets"]
    }
    offered = {z["availability_zone"] for z in out["plan"]["zones"]}
    assert zones == offered and len(zones) >= 3
    assert {"Key": "xdrive:name", "Value": "work"} in [
        {"Key": t["Key"], "Value": t["Value"]} for t in group["Tags"]
    ]
    # moto's Auto Scaling starts the instance itself (not through RunInstances): it carries
    # the drive's tag; moto drops the template's metadata options and profile on it.
    (member,) = [i["InstanceId"] for i in group["Instances"]]
    assert tag_map(instance(aws_env, member))["xdrive:name"] == "work"

    before = inventory(aws_env)
    assert "resumes automatically" in one_line_error(run("launch", "work", "--auto-resume"))
    assert inventory(aws_env) == before

    stopped = run("stop", "work", "--json")
    assert stopped.exit_code == 0, stopped.output
    assert json.loads(stopped.stdout)["terminated"] == [member]
    after = inventory(aws_env)
    assert "xdrive-work" not in after["groups"] and "xdrive-work" not in after["templates"]
    assert instance(aws_env, member)["State"]["Name"] in ("shutting-down", "terminated")


# --- the zone follows spot prices and the drive -----------------------------------------------


def test_zone_follows_spot_prices_and_the_drive(aws: Aws, ec2: Ec2) -> None:
    prices = FixedPrices({"t3.micro": {"us-east-1a": 0.05, "us-east-1b": 0.04, "us-east-1c": 0.01}})
    options = LaunchOptions(drive="work")

    def launch_zone() -> str:
        result = launch(aws, options, prices=prices, wait=False)
        assert result.instance is not None
        ec2.terminate_instances([result.instance.id])  # free the drive for the next case
        return result.plan.zone or ""

    assert launch_zone() == "us-east-1c"  # new drive: the cheapest zone

    # An instance died without saving: its volume in us-east-1b holds the newest state.
    stranded = make_volume(ec2, "work", "us-east-1b", generation=1)
    assert launch_zone() == "us-east-1b"

    # Saved (a completed final snapshot of its generation): the drive can go anywhere again.
    make_snapshot(ec2, stranded)
    assert launch_zone() == "us-east-1c"

    # --max-price below the cheapest: refused before anything is created.
    with pytest.raises(Exception, match="max-price"):
        launch(aws, LaunchOptions(drive="work", max_price=0.001), prices=prices)


# --- the image ---------------------------------------------------------------------------------


def _image(*args: str) -> str:
    result = run("launch", "work", "--dry-run", "--json", *args)
    image: str = launched(result)["plan"]["image"]["image_id"]
    return image


def test_image_comes_from_the_public_parameter_of_the_architecture(aws_env: Sandbox) -> None:
    assert _image() == ssm_value(aws_env, image_parameter("al2023", "x86_64", gpu=False))
    arm = ssm_value(aws_env, image_parameter("al2023", "arm64", gpu=False))
    assert _image("-t", "t4g.micro") == arm
    assert _image("--ami", "ami-0123456789abcdef0") == "ami-0123456789abcdef0"


def test_gpu_types_get_the_deep_learning_image(aws_env: Sandbox) -> None:
    name = image_parameter("al2023", "x86_64", gpu=True)
    before = inventory(aws_env)
    # Not in the sandbox until published: a clear error, nothing created.
    assert "pass --ami" in one_line_error(run("launch", "work", "-t", "g5.xlarge"))
    assert inventory(aws_env) == before
    publish_parameter(name, "ami-0dee9dee9dee9dee9")
    assert _image("-t", "g5.xlarge") == "ami-0dee9dee9dee9dee9"
    assert _image("-t", "g5.xlarge", "--no-gpu") == ssm_value(
        aws_env, image_parameter("al2023", "x86_64", gpu=False)
    )
    assert "has no GPU" in one_line_error(run("launch", "work", "--gpu"))


# --- bad input: one line, exit 1, nothing created ------------------------------------------------


def _no_default_vpc(sandbox: Sandbox) -> None:
    ec2 = sandbox.client("ec2")
    for subnet in ec2.describe_subnets()["Subnets"]:
        ec2.delete_subnet(SubnetId=subnet["SubnetId"])
    for vpc in ec2.describe_vpcs()["Vpcs"]:
        ec2.delete_vpc(VpcId=vpc["VpcId"])


@pytest.mark.parametrize(
    ("args", "setup", "env", "expected"),
    [
        (["-t", "t9.bogus"], None, {}, "unknown instance type 't9.bogus'"),
        ([], None, {}, None),  # the name is replaced by an invalid one below
        (
            [],
            None,
            {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None},
            "no AWS credentials",
        ),
        ([], None, {"AWS_REGION": None}, "no AWS region"),
        (
            ["--region", "us-eest-1"],
            None,
            {},
            "unknown AWS region 'us-eest-1'. did you mean us-east-1 or us-west-1?",
        ),
        ([], _no_default_vpc, {}, "no default VPC"),
        ([], "deny", {}, "AWS denied ec2:RunInstances"),
        (["--subnet", "subnet-00000000000000000"], None, {}, "does not exist"),
        (["--instance-profile", "nope"], None, {}, "instance profile 'nope' does not exist"),
        (["--max-price", "0.000001"], None, {}, "above --max-price"),
        (["--profile", "nosuch"], None, {}, "profile 'nosuch' is not configured"),
        (["--distro", "ubuntu"], None, {}, "pass --ami"),
    ],
    ids=[
        "instance-type",
        "name",
        "no-credentials",
        "no-region",
        "wrong-region",
        "no-default-vpc",
        "access-denied",
        "subnet",
        "profile",
        "max-price",
        "aws-profile",
        "no-ubuntu-image",
    ],
)
def test_bad_input_is_one_line_exit_1_and_creates_nothing(
    aws_env: Sandbox, args, setup, env, expected
) -> None:
    if callable(setup):
        setup(aws_env)
    elif setup == "deny":
        aws_env.fidelity.set_faults(Faults(deny_actions=frozenset({"RunInstances"})))
    name = "Bad_Name" if expected is None else "work"
    before = inventory(aws_env)
    message = one_line_error(run("launch", name, *args, env=env))
    assert expected is None or expected in message, message
    if expected is None:
        assert "invalid drive name" in message
    if setup == "deny":
        assert "xdrive iam-policy" in message  # the fix
    aws_env.fidelity.set_faults(Faults())
    assert inventory(aws_env) == before
    assert live_instances(aws_env) == []
