"""`make demo`: the whole xdrive story on the local sandbox, with a timeline and a verdict.

A spot instance in one zone gets the drive, runs a container that keeps writing, receives
the interruption notice and saves; a new instance in another zone restores the drive, the
files match byte for byte and the container is running again there.
"""

from __future__ import annotations

import hashlib
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from rich.console import Console
from rich.table import Table

from xdrive.errors import XdriveError
from xdrive.launcher.aws import Aws, AwsTarget
from xdrive.launcher.launch import LaunchOptions, LaunchResult, launch
from xdrive.sandbox.core import REGION, SANDBOX_CREDENTIALS, Sandbox, SimInstance
from xdrive.sandbox.dockerctl import import_busybox_image
from xdrive.sandbox.settings import Latencies
from xdrive.sandbox.userdata_boot import boot_from_userdata

DRIVE = "demo"
IMAGE = "xdrive/busybox:latest"
# Slow enough to look like EC2's shape, fast enough for a demo.
LATENCIES = Latencies(volume_create=1.0, attach=0.5, device_appear=0.3, detach=0.5, snapshot=2.0)
console = Console(width=max(110, Console().width))


@dataclass
class Timeline:
    start: float = field(default_factory=time.monotonic)
    rows: list[tuple[float, str, str]] = field(default_factory=list)

    def step(self, what: str, ids: str = "") -> None:
        t = time.monotonic() - self.start
        self.rows.append((t, what, ids))
        console.print(f"[dim]{t:7.1f}s[/dim]  {what}  [cyan]{ids}[/cyan]")


def manifest(root: Path) -> dict[str, str]:
    """sha256 of every file under ``root``, by relative path."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def write_project(root: Path) -> None:
    """Some work worth keeping: a few files of different sizes."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(20):
        (root / f"notes-{i:02d}.txt").write_text(f"experiment {i}: " + "x" * (i * 1000) + "\n")
    (root / "model.bin").write_bytes(hashlib.sha256(b"weights").digest() * 32768)  # 1 MiB


def wait_for(check: Callable[[], Any], what: str, timeout_s: float = 60) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise XdriveError(f"timed out waiting for {what}")


def launch_with_launcher(
    sb: Sandbox, tl: Timeline, instance_type: str, zone: str | None = None
) -> SimInstance:
    """`xdrive launch` against the sandbox's endpoint; the instance boots from its user-data."""
    os.environ.update(SANDBOX_CREDENTIALS)  # the laptop's AWS credentials, sandbox edition
    aws = Aws(AwsTarget(region=REGION, endpoint_url=sb.url))
    subnet = None
    if zone is not None:
        subnets = sb.client().describe_subnets(
            Filters=[
                {"Name": "availability-zone", "Values": [zone]},
                {"Name": "default-for-az", "Values": ["true"]},
            ]
        )["Subnets"]
        subnet = subnets[0]["SubnetId"]
    options = LaunchOptions(
        drive=DRIVE, instance_type=instance_type, size_gib=1, subnet=subnet, gpu=False
    )
    result: LaunchResult = launch(aws, options)
    assert result.instance is not None
    iid = result.instance.id
    plan = result.plan
    price = f", spot ${plan.price:.4f}/h" if plan.price is not None else ""
    tl.step(
        f"xdrive launch {DRIVE} --instance-type {instance_type}: {plan.market} in "
        f"{result.instance.availability_zone}{price}, IMDSv2 required, "
        f"user-data {plan.userdata_bytes} bytes, agent {plan.agent.url}",
        iid,
    )
    config = boot_from_userdata(sb, iid)
    tl.step(
        f"cloud-init stand-in: xdrive-agent started with the user-data's {DRIVE!r} config",
        f"{config.volume.size_gib} GiB {config.volume.filesystem}",
    )
    return sb.instance(iid)


def run_demo() -> bool:
    tl = Timeline()
    checks: list[tuple[str, bool, str]] = []
    with Sandbox(latencies=LATENCIES) as sb:
        tl.step("sandbox up: moto EC2 with EC2's delays and checks, IMDS, loop devices", sb.url)

        a = launch_with_launcher(sb, tl, "t3.micro")
        status = sb.wait_ready(a.instance_id)
        tl.step("A: xdrive-agent ready: " + (status.message or ""), status.volume_id or "")

        import_busybox_image(a.docker_url, IMAGE)
        docker_a = sb.docker(a.instance_id)
        docker_a.containers.run(
            IMAGE,
            ["sh", "-c", "while true; do date +%s >> /data/heartbeat.log; sleep 0.2; done"],
            name="worker",
            detach=True,
            network_mode="none",
            restart_policy={"Name": "unless-stopped"},
            volumes={"worker-data": {"bind": "/data", "mode": "rw"}},
        )
        tl.step("A: container 'worker' (restart unless-stopped) writing to a docker volume")
        project = a.root / "v1/project"
        write_project(project)
        before = manifest(project)
        tl.step(f"A: wrote {len(before)} files to /v1/project")
        heartbeat = a.root / "v1/docker/volumes/worker-data/_data/heartbeat.log"
        wait_for(
            lambda: heartbeat.exists() and len(heartbeat.read_text().splitlines()) > 5,
            "the container's first writes",
        )
        docker_a.close()

        at = sb.notice(a.instance_id, "terminate", in_seconds=120)
        tl.step(f"A: spot interruption notice (instance goes at {at:%H:%M:%S})")
        saved = wait_for(
            lambda: (s := a.status()) is not None and s.phase == "saved" and s, "the save", 150
        )
        record = saved.last_save
        tl.step(
            f"A: saved: docker stopped, unmounted, snapshot requested "
            f"{record.seconds_from_notice:.1f} s after the notice",
            f"{record.snapshot_id} ({record.kind})",
        )
        checks.append(
            (
                "snapshot requested within 10 s of the notice",
                record.seconds_from_notice < 10,
                f"{record.seconds_from_notice:.1f} s",
            )
        )
        sb.terminate(a.instance_id)
        tl.step("A: reclaimed by AWS (terminated)", a.instance_id)

        other = "us-east-1b" if a.availability_zone != "us-east-1b" else "us-east-1c"
        b = launch_with_launcher(sb, tl, "g5.xlarge", zone=other)
        status = sb.wait_ready(b.instance_id)
        tl.step("B: xdrive-agent ready: " + (status.message or ""), status.volume_id or "")

        after = manifest(b.root / "v1/project")
        same = after == before
        checks.append(
            ("files on B identical to A's (sha256 of every file)", same, f"{len(after)} files")
        )
        docker_b = sb.docker(b.instance_id)
        worker = wait_for(lambda: _running(docker_b, "worker"), "the worker container", 60)
        checks.append(
            (
                "container 'worker' running again on B",
                worker is not None,
                worker.short_id if worker else "-",
            )
        )
        beat_b = b.root / "v1/docker/volumes/worker-data/_data/heartbeat.log"
        lines_at_restore = len(beat_b.read_text().splitlines())
        wait_for(
            lambda: len(beat_b.read_text().splitlines()) > lines_at_restore + 3,
            "new heartbeats on B",
            30,
        )
        checks.append(
            (
                "the container's data came along and it keeps writing on B",
                True,
                f"{lines_at_restore} lines from A, more since",
            )
        )
        tl.step("B: verified files, container and its data", b.instance_id)
        docker_b.close()
        sb.stop_agent(b.instance_id)
        tl.step("B: systemctl stop xdrive-agent: saved again")
    tl.step("sandbox down: agents, dockerd, mounts, loop devices all stopped")

    verdict = Table("check", "result", "detail", title="verdict")
    for what, ok, detail in checks:
        verdict.add_row(what, "[green]PASS[/green]" if ok else "[red]FAIL[/red]", detail)
    console.print(verdict)
    return all(ok for _, ok, _ in checks)


def _running(client: Any, name: str) -> Any:
    try:
        container = client.containers.get(name)
    except Exception:
        return None
    return container if container.status == "running" else None


def main() -> None:
    try:
        ok = run_demo()
    except XdriveError as e:
        console.print(f"[red]demo failed:[/red] {e}")
        sys.exit(1)
    console.print(
        "[bold green]xdrive demo: the drive survived the spot interruption[/]"
        if ok
        else "[bold red]xdrive demo: FAILED[/]"
    )
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
