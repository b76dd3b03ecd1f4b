"""Fixtures and helpers for the launcher's tests: the sandbox as the AWS endpoint, the CLI
through click's runner, drive state made with the EC2 wrapper, and an inventory of every
resource a command could create (to show that a refused command created nothing).
"""

from __future__ import annotations

import base64
import gzip
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import pytest
from click.testing import CliRunner, Result

from xdrive import tags
from xdrive.ec2 import Attachment, Ec2, InstanceSpec, Snapshot, Volume
from xdrive.launcher.autoresume import group_name
from xdrive.launcher.aws import Aws, AwsTarget
from xdrive.launcher.cli import cli
from xdrive.sandbox.core import Sandbox

REGION = "us-east-1"
ACCOUNT = "123456789012"  # moto's default account
CLOUD_INIT = shutil.which("cloud-init") or "/usr/bin/cloud-init"
T0 = datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc)


@pytest.fixture
def aws_env(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Sandbox:
    """The standard AWS variables pointing at the sandbox; nothing from this machine."""
    for var in ("AWS_PROFILE", "AWS_DEFAULT_REGION", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_REGION", REGION)
    monkeypatch.setenv("AWS_ENDPOINT_URL", sandbox.url)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    return sandbox


@pytest.fixture
def aws(aws_env: Sandbox) -> Aws:
    return Aws(AwsTarget())


@pytest.fixture
def ec2(aws_env: Sandbox) -> Ec2:
    return Ec2(aws_env.client("ec2"))


def run(
    *args: str, input: Optional[str] = None, env: Optional[dict[str, Optional[str]]] = None
) -> Result:
    """`xdrive ARGS` in this process (the sandbox is in it too)."""
    return CliRunner().invoke(cli, list(args), input=input, env=env, catch_exceptions=False)


def one_line_error(result: Result) -> str:
    """The failed command's stderr: exactly one line, `xdrive: error: ...`."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("xdrive: error: "), lines[0]
    return lines[0]


# --- what exists ----------------------------------------------------------------------------


def live_instances(sandbox: Sandbox) -> list[dict[str, Any]]:
    answer = sandbox.client("ec2").describe_instances()
    return [
        i
        for r in answer["Reservations"]
        for i in r["Instances"]
        if i["State"]["Name"] not in ("terminated", "shutting-down")
    ]


def inventory(sandbox: Sandbox) -> dict[str, set[str]]:
    """Every kind of resource a launcher command can create, by id."""
    ec2 = sandbox.client("ec2")
    iam = sandbox.client("iam")
    return {
        "instances": {i["InstanceId"] for i in live_instances(sandbox)},
        "volumes": {v["VolumeId"] for v in ec2.describe_volumes()["Volumes"]},
        "snapshots": {
            s["SnapshotId"]
            for s in ec2.describe_snapshots(
                OwnerIds=["self"], Filters=[{"Name": "tag-key", "Values": [tags.NAME]}]
            )["Snapshots"]
        },
        "templates": {
            t["LaunchTemplateName"] for t in ec2.describe_launch_templates()["LaunchTemplates"]
        },
        "groups": {
            g["AutoScalingGroupName"]
            for g in sandbox.client("autoscaling").describe_auto_scaling_groups()[
                "AutoScalingGroups"
            ]
        },
        "roles": {r["RoleName"] for r in iam.list_roles()["Roles"]},
        "profiles": {
            p["InstanceProfileName"] for p in iam.list_instance_profiles()["InstanceProfiles"]
        },
        "buckets": {b["Name"] for b in sandbox.client("s3").list_buckets().get("Buckets", [])},
    }


def instance(sandbox: Sandbox, instance_id: str) -> dict[str, Any]:
    answer = sandbox.client("ec2").describe_instances(InstanceIds=[instance_id])
    found: dict[str, Any] = answer["Reservations"][0]["Instances"][0]
    return found


def tag_map(item: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in item.get("Tags", [])}


def decode_userdata(encoded: str) -> str:
    """What EC2 holds (base64) -> the #cloud-config text (gunzipped when compressed)."""
    raw = base64.b64decode(encoded)
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    return raw.decode("utf-8")


def instance_userdata(sandbox: Sandbox, instance_id: str) -> str:
    answer = sandbox.client("ec2").describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData"
    )
    return decode_userdata(answer["UserData"]["Value"])


def cloud_init_available() -> bool:
    return Path(CLOUD_INIT).exists()


def cloud_init_says_valid(text: str, workdir: Path) -> None:
    """`cloud-init schema` (Debian's) accepts the user-data."""
    target = workdir / "user-data.yaml"
    target.write_text(text)
    result = subprocess.run(
        [CLOUD_INIT, "schema", "--config-file", str(target)],
        capture_output=True,
        text=True,
        check=False,
        cwd="/",  # never this repository's cloudinit/ folder
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid cloud-config" in result.stdout


# --- drive state made with the EC2 wrapper ----------------------------------------------------


def make_volume(ec2: Ec2, name: str, zone: str = "us-east-1a", generation: int = 1) -> Volume:
    return ec2.create_volume(name, zone, 1, generation)


def make_snapshot(
    ec2: Ec2, volume: Volume, kind: str = "final", generation: Optional[int] = None
) -> Snapshot:
    """A snapshot of ``volume`` at ``generation`` (the volume is retagged first if given)."""
    if generation is not None:
        ec2.set_volume_generation(volume.id, generation)
        current = ec2.volume(volume.id)
        assert current is not None
        volume = current
    return ec2.create_snapshot(volume, kind, "test", None)


# --- a tour of the launcher ----------------------------------------------------------------


def run_every_launcher_path(sandbox: Sandbox, ec2: Ec2) -> dict[str, Result]:
    """Every launcher command along each of its paths, from a fresh sandbox (the call
    record starts empty): first launch (creates the agent bucket, role and profile), a
    relaunch that finds them, on-demand, dry run, auto-resume (and one whose template an
    interrupted launch left), the read-only commands, save, prune, stop, rm, userdata."""
    make_snapshot(ec2, make_volume(ec2, "old"))
    make_snapshot(ec2, make_volume(ec2, "old"), generation=2)
    make_volume(ec2, "left", "us-east-1b")
    # An auto-resume launch interrupted after its template was made: the next one updates it.
    ec2.create_launch_template(
        group_name("resumed"),
        InstanceSpec("ami-12c6146b", "t3.micro", b"#cloud-config\n", {tags.NAME: "resumed"}),
        {tags.NAME: "resumed"},
    )
    sandbox.fidelity.clear_recorded()
    results = {}
    for args in (
        ("launch", "work", "--json"),  # creates bucket, agent upload, role, profile
        ("launch", "gpu", "-t", "t3.small", "--on-demand", "--json"),  # finds them all
        ("launch", "plan", "--dry-run", "--json"),
        ("status", "--json"),
        ("status", "--all", "--json"),
        ("ls", "--json"),
        ("snapshots", "old", "--json"),
        ("prices", "t3.micro", "--json"),
        ("save", "left", "--json"),
        ("prune", "old", "--keep", "1", "--json"),
        ("stop", "work", "--json"),
        ("launch", "auto", "--auto-resume", "--json"),
        ("launch", "resumed", "--auto-resume", "--json"),
        ("stop", "auto", "--json"),
        ("stop", "resumed", "--json"),
        ("rm", "old", "--yes", "--json"),
        ("userdata", "work"),
    ):
        result = run(*args)
        assert result.exit_code == 0, (args, result.output)
        results[f"`xdrive {' '.join(args)}`"] = result
    return results


# --- pure values for the planning tests ---------------------------------------------------------


def volume(
    vid: str,
    zone: str = "us-east-1a",
    generation: int = 1,
    state: str = "available",
    attached_to: Optional[str] = None,
    minute: int = 0,
) -> Volume:
    return Volume(
        id=vid,
        availability_zone=zone,
        size_gib=10,
        state=state,
        encrypted=True,
        volume_type="gp3",
        create_time=T0 + timedelta(minutes=minute),
        attachments=(Attachment(attached_to, "attached", "/dev/sdf"),) if attached_to else (),
        tags={tags.NAME: "work", tags.GENERATION: str(generation)},
    )


def snapshot(
    sid: str,
    source: str,
    generation: int,
    kind: str = "final",
    state: str = "completed",
    minute: int = 0,
) -> Snapshot:
    return Snapshot(
        id=sid,
        volume_id=source,
        state=state,
        progress=100 if state == "completed" else 40,
        start_time=T0 + timedelta(minutes=minute),
        volume_size_gib=10,
        tags={
            tags.NAME: "work",
            tags.GENERATION: str(generation),
            tags.KIND: kind,
            tags.SOURCE_VOLUME: source,
        },
    )
