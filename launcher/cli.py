"""`xdrive`: the launcher CLI. Thin: one command is one library call; errors become one line."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional, TypeVar, cast

import click

from xdrive import __version__
from xdrive.errors import XdriveError

F = TypeVar("F", bound=Callable[..., Any])


class _Group(click.Group):
    """Turns library errors into a clean one-line message and exit status 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except XdriveError as e:
            click.echo(f"xdrive: error: {e}", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xdrive")
def cli() -> None:
    """A named, portable drive for AWS spot instances.

    \b
    Example:
      xdrive launch work --instance-type g5.xlarge    # spot, cheapest zone
      xdrive ls
      xdrive stop work                                 # the agent saves the drive
      xdrive sandbox up                                # a local AWS to try it all on

    AWS access follows the usual conventions: --region / AWS_REGION, --profile /
    AWS_PROFILE, the standard credential chain, and --endpoint-url / AWS_ENDPOINT_URL
    (the sandbox's URL).
    """


# --- shared options -----------------------------------------------------------------------


def aws_options(command: F) -> F:
    options = [
        click.option(
            "--region", help="AWS region (default: AWS_REGION, AWS_DEFAULT_REGION, profile)"
        ),
        click.option("--profile", help="AWS profile (default: AWS_PROFILE)"),
        click.option(
            "--endpoint-url",
            help="AWS endpoint for every service, e.g. the sandbox's (default: AWS_ENDPOINT_URL)",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def json_option(command: F) -> F:
    return click.option("--json", "json_mode", is_flag=True, help="print JSON for scripts")(command)


def _aws(region: Optional[str], profile: Optional[str], endpoint_url: Optional[str]) -> Any:
    from xdrive.launcher.aws import Aws, AwsTarget

    return Aws(AwsTarget(region=region, profile=profile, endpoint_url=endpoint_url))


def _output(json_mode: bool) -> Any:
    from xdrive.launcher.output import Output

    return Output(json_mode)


# --- launch -------------------------------------------------------------------------------


@cli.command()
@click.argument("name")
@click.option("-t", "--instance-type", default="t3.micro", show_default=True)
@click.option("--on-demand", is_flag=True, help="on-demand instead of spot")
@click.option("--max-price", type=float, help="highest spot price to pay, USD per hour")
@click.option(
    "--ami", help="image id (default: the latest of --distro from its public SSM parameter)"
)
@click.option(
    "--gpu/--no-gpu",
    default=None,
    help="the Deep Learning GPU image (default: for instance types with GPUs)",
)
@click.option(
    "--distro", type=click.Choice(["al2023", "ubuntu"]), default="al2023", show_default=True
)
@click.option("--key-name", help="EC2 key pair for ssh")
@click.option(
    "--security-group", "security_groups", multiple=True, help="security group id (repeatable)"
)
@click.option("--subnet", help="subnet id (default: the default VPC's subnet in the chosen zone)")
@click.option(
    "--instance-profile", help="instance profile name (default: xdrive-agent, created if missing)"
)
@click.option(
    "--size", "size_gib", type=int, default=20, show_default=True, help="GiB of a new drive"
)
@click.option(
    "--agent-bucket", help="S3 bucket for the agent (default: xdrive-agent-ACCOUNT-REGION)"
)
@click.option(
    "--auto-resume", is_flag=True, help="launch template + Auto Scaling group of one spot instance"
)
@click.option("--dry-run", is_flag=True, help="print the plan; create nothing")
@click.option("--no-wait", is_flag=True, help="do not wait for the instance to run")
@json_option
@aws_options
def launch(
    name: str,
    instance_type: str,
    on_demand: bool,
    max_price: Optional[float],
    ami: Optional[str],
    gpu: Optional[bool],
    distro: str,
    key_name: Optional[str],
    security_groups: tuple[str, ...],
    subnet: Optional[str],
    instance_profile: Optional[str],
    size_gib: int,
    agent_bucket: Optional[str],
    auto_resume: bool,
    dry_run: bool,
    no_wait: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Launch an instance with drive NAME (spot, in the cheapest zone it can go to).

    \b
    Example:
      xdrive launch work --instance-type g5.xlarge
      xdrive launch work --dry-run
      xdrive launch work --auto-resume        # replaced automatically when reclaimed
    """
    from xdrive.launcher.launch import LaunchOptions
    from xdrive.launcher.launch import launch as run_launch
    from xdrive.launcher.output import launch_table, zone_table

    options = LaunchOptions(
        drive=name,
        instance_type=instance_type,
        market="on-demand" if on_demand else "spot",
        max_price=max_price,
        ami=ami,
        gpu=gpu,
        distro=cast(Any, distro),  # click.Choice checked it
        key_name=key_name,
        security_groups=security_groups,
        subnet=subnet,
        instance_profile=instance_profile,
        size_gib=size_gib,
        agent_bucket=agent_bucket,
        auto_resume=auto_resume,
    )
    out = _output(json_mode)
    aws = _aws(region, profile, endpoint_url)
    with out.progress() as progress:
        result = run_launch(aws, options, dry_run=dry_run, wait=not no_wait, progress=progress)
    if json_mode:
        out.json(result)
        return
    out.console.print(launch_table(result))
    out.console.print(zone_table(result.plan.zones, result.plan.zone))


@cli.command()
@click.argument("name")
@click.option(
    "--distro", type=click.Choice(["al2023", "ubuntu"]), default="al2023", show_default=True
)
@click.option(
    "--size", "size_gib", type=int, default=20, show_default=True, help="GiB of a new drive"
)
@click.option("--agent-url", help="where instances fetch the agent archive (no AWS call then)")
@click.option("--agent-sha256", help="sha256 of the archive at --agent-url")
@click.option(
    "--agent-bucket", help="S3 bucket to upload the agent to (default: xdrive-agent-ACCOUNT-REGION)"
)
@click.option("--gzip", "compress", is_flag=True, help="gzip it (as `launch` sends it)")
@click.option("-o", "--output", "output_path", type=click.Path(dir_okay=False, path_type=Path))
@aws_options
def userdata(
    name: str,
    distro: str,
    size_gib: int,
    agent_url: Optional[str],
    agent_sha256: Optional[str],
    agent_bucket: Optional[str],
    compress: bool,
    output_path: Optional[Path],
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Print the user-data (#cloud-config) that gives an instance drive NAME.

    Without --agent-url, the agent archive is uploaded to the account's agent bucket first
    (once per version), and the user-data fetches it from there with the instance profile.

    \b
    Example:
      xdrive userdata work > user-data.yaml
      xdrive userdata work --distro ubuntu --gzip -o user-data.gz
    """
    from xdrive.launcher.userdata import userdata as render_userdata

    aws = None if agent_url else _aws(region, profile, endpoint_url)
    result = render_userdata(
        aws,
        name,
        distro=cast(Any, distro),  # click.Choice checked it
        size_gib=size_gib,
        compress=compress,
        agent_url=agent_url,
        agent_sha256=agent_sha256,
        agent_bucket=agent_bucket,
    )
    if output_path is not None:
        output_path.write_bytes(result.data)
        click.echo(f"wrote {len(result.data)} bytes to {output_path}", err=True)
        return
    sys.stdout.flush()
    sys.stdout.buffer.write(result.data)
    sys.stdout.buffer.flush()


# --- drives ---------------------------------------------------------------------------------


@cli.command(name="ls")
@json_option
@aws_options
def list_command(
    json_mode: bool, region: Optional[str], profile: Optional[str], endpoint_url: Optional[str]
) -> None:
    """List the drives: newest state, generation, size, zone, snapshots, instances.

    \b
    Example:
      xdrive ls
      xdrive ls --json | jq '.[].name'
    """
    from xdrive.launcher.drives import list_drives
    from xdrive.launcher.output import drives_table

    out = _output(json_mode)
    drives = list_drives(_aws(region, profile, endpoint_url).ec2)
    if json_mode:
        out.json(drives)
    elif drives:
        out.console.print(drives_table(drives))
    else:
        out.line("no drives in this region")


@cli.command()
@click.argument("name")
@json_option
@aws_options
def snapshots(
    name: str,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """List the snapshots of drive NAME, oldest first.

    \b
    Example:
      xdrive snapshots work
    """
    from xdrive.launcher.drives import list_snapshots
    from xdrive.launcher.output import snapshots_table

    out = _output(json_mode)
    rows = list_snapshots(_aws(region, profile, endpoint_url).ec2, name)
    if json_mode:
        out.json(rows)
    else:
        out.console.print(snapshots_table(name, rows))


@cli.command()
@click.argument("name")
@click.option("--volume", "volume_id", help="the volume to save (default: every one left unsaved)")
@click.option("--wait", is_flag=True, help="wait until the snapshot is completed")
@json_option
@aws_options
def save(
    name: str,
    volume_id: Optional[str],
    wait: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Snapshot a volume of NAME left behind by an instance that died without saving.

    Only a detached volume, or one whose instance is terminated, is saved (kind final,
    reason manual); a running instance's agent saves its own volume.

    \b
    Example:
      xdrive save work --wait
    """
    from xdrive.launcher.manage import save_drive
    from xdrive.launcher.output import save_lines

    out = _output(json_mode)
    aws = _aws(region, profile, endpoint_url)
    with out.progress() as progress:
        result = save_drive(aws, name, volume_id=volume_id, wait=wait, progress=progress)
    if json_mode:
        out.json(result)
    else:
        for line in save_lines(result):
            out.line(line)


@cli.command()
@click.argument("name")
@click.option(
    "--keep", type=int, required=True, help="how many of the newest completed snapshots to keep"
)
@click.option("--dry-run", is_flag=True, help="show what would be deleted")
@json_option
@aws_options
def prune(
    name: str,
    keep: int,
    dry_run: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Delete old snapshots of NAME, keeping the KEEP newest completed ones.

    Never deleted: the newest completed snapshot, snapshots still pending, and the final
    snapshot of any volume still there.

    \b
    Example:
      xdrive prune work --keep 3 --dry-run
    """
    from xdrive.launcher.manage import prune_drive
    from xdrive.launcher.output import prune_table

    out = _output(json_mode)
    aws = _aws(region, profile, endpoint_url)
    with out.progress() as progress:
        result = prune_drive(aws, name, keep, dry_run=dry_run, progress=progress)
    if json_mode:
        out.json(result)
    else:
        out.console.print(prune_table(result))


@cli.command(name="rm")
@click.argument("name")
@click.option("-y", "--yes", is_flag=True, help="do not ask")
@json_option
@aws_options
def remove(
    name: str,
    yes: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Delete drive NAME: every volume and snapshot of it. Asks first.

    Refused while an instance holds the drive (`xdrive stop NAME` first).

    \b
    Example:
      xdrive rm scratch
    """
    from xdrive.launcher.manage import RemovalPlan, remove_drive
    from xdrive.launcher.output import removal_lines, removal_summary

    out = _output(json_mode)
    aws = _aws(region, profile, endpoint_url)

    def confirm(plan: RemovalPlan) -> bool:
        if yes:
            return True
        return click.confirm(f"delete {removal_summary(plan)}? This cannot be undone", err=True)

    with out.progress() as progress:
        result = remove_drive(aws, name, confirm, progress)
    if json_mode:
        out.json(result)
    else:
        for line in removal_lines(result):
            out.line(line)


@cli.command()
@click.argument("instance_type")
@json_option
@aws_options
def prices(
    instance_type: str,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Show the current spot price of INSTANCE_TYPE in each zone.

    \b
    Example:
      xdrive prices g5.xlarge --region us-west-2
    """
    from xdrive.launcher.manage import spot_prices
    from xdrive.launcher.output import prices_table

    out = _output(json_mode)
    report = spot_prices(_aws(region, profile, endpoint_url), instance_type)
    if json_mode:
        out.json(report)
    else:
        out.console.print(prices_table(report))


@cli.command(name="iam-policy")
@click.option(
    "--role", type=click.Choice(["agent", "launcher"]), help="print only this role's policy"
)
@click.option("--drive", help="limit the policy to this drive (default: every drive)")
@click.option("--agent-bucket", help="the agent bucket (default: any xdrive-agent-* bucket)")
def iam_policy(role: Optional[str], drive: Optional[str], agent_bucket: Optional[str]) -> None:
    """Print the least-privilege IAM policies as JSON: the agent's instance profile role,
    and the user who runs xdrive.

    \b
    Example:
      xdrive iam-policy --role agent > agent-policy.json
      aws iam put-role-policy --role-name my-role --policy-name xdrive \\
          --policy-document file://agent-policy.json
    """
    from xdrive.launcher.iam import PolicyScope, policies
    from xdrive.launcher.output import dumps
    from xdrive.names import validate_drive_name

    scope = PolicyScope(
        drive=validate_drive_name(drive) if drive else None, agent_bucket=agent_bucket
    )
    click.echo(dumps(policies(scope, cast(Any, role))))


@cli.command()
@click.argument("name", required=False)
@click.option("--all", "include_ended", is_flag=True, help="include terminated instances")
@json_option
@aws_options
def status(
    name: Optional[str],
    include_ended: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Show the instances of each drive (or of NAME) and what their agents have done.

    \b
    Example:
      xdrive status
      xdrive status work --all
    """
    from xdrive.launcher.manage import drive_status
    from xdrive.launcher.output import status_tables

    out = _output(json_mode)
    report = drive_status(_aws(region, profile, endpoint_url), name, include_ended)
    if json_mode:
        out.json(report)
        return
    if not report.instances and not report.groups:
        out.line("no instances")
        return
    for table in status_tables(report):
        out.console.print(table)


@cli.command()
@click.argument("name")
@click.option("--wait", is_flag=True, help="wait until the instances are gone (the drive saved)")
@json_option
@aws_options
def stop(
    name: str,
    wait: bool,
    json_mode: bool,
    region: Optional[str],
    profile: Optional[str],
    endpoint_url: Optional[str],
) -> None:
    """Terminate the instances of NAME, so their agents save the drive; end auto-resume.

    \b
    Example:
      xdrive stop work --wait
    """
    from xdrive.launcher.manage import stop_drive
    from xdrive.launcher.output import stop_lines

    out = _output(json_mode)
    aws = _aws(region, profile, endpoint_url)
    with out.progress() as progress:
        result = stop_drive(aws, name, wait=wait, progress=progress)
    if json_mode:
        out.json(result)
    else:
        for line in stop_lines(result):
            out.line(line)


def _register_subcommands() -> None:
    from xdrive.sandbox.cli import sandbox

    cli.add_command(sandbox)


def main() -> None:
    _register_subcommands()
    cli()
