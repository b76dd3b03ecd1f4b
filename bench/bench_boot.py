"""Benchmark: the agent's boot time above the sandbox's injected EC2 latencies.

With fixed latencies (CreateVolume 1 s, AttachVolume 1 s, device 0.5 s, snapshot 2 s) the
real agent boots N times in each case, from process start to READY=1 on its notify socket:

- new:     no state: create an empty volume, attach, find the device, mkfs, mount;
- restore: a completed snapshot: create the volume from it, attach, device, mount;
- pending: a snapshot requested just before the agent starts: wait for it, then restore.

overhead = (start -> READY) - (the injected latencies on that path). The baseline, in the
same run and sandbox, is a plain script doing the same sequence with boto3's default
waiters (volume_available, volume_in_use, snapshot_completed: 15 s between polls), which is
what most boot scripts do. Both are separate Python processes, so both pay interpreter and
import time. Writes bench/results/boot.json.

    .venv/bin/python bench/bench_boot.py            # N=10 agent boots per case, 3 baseline
    BENCH_BOOT_N=20 BENCH_BOOT_BASELINE_N=5 .venv/bin/python bench/bench_boot.py
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal, Optional

Case = Literal["new", "restore", "pending"]
CASES: tuple[Case, ...] = ("new", "restore", "pending")
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class BootTiming:
    runner: Literal["agent", "baseline"]
    case: Case
    wall_s: float  # process start -> READY=1
    injected_s: float  # latencies on the path the boot had to wait through
    steps: tuple[tuple[float, str], ...] = ()  # (seconds since start, STATUS) for profiling

    @property
    def overhead_s(self) -> float:
        return self.wall_s - self.injected_s

    @property
    def first_decision_s(self) -> float:
        """Process start to the first STATUS: interpreter, imports, EC2 client, IMDS, and
        the first look at EC2. Fixed cost, paid before any waiting."""
        return self.steps[0][0] if self.steps else float("nan")


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile (no interpolation: every figure is a measured boot)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# --- the baseline: a boot script with boto3's default waiters --------------------------------


@dataclass(frozen=True)
class BaselineJob:
    endpoint: str
    region: str
    instance_id: str
    availability_zone: str
    root: str
    drive: str
    snapshot_id: Optional[str]
    size_gib: int


def baseline_boot(job: BaselineJob) -> None:
    """What a typical boot script does, waiting the way boto3's waiters do."""
    import boto3

    from xdrive.agent import filesystem
    from xdrive.agent.devices import resolve_device
    from xdrive.agent.notify import Notifier

    ec2 = boto3.client("ec2", endpoint_url=job.endpoint, region_name=job.region)
    if job.snapshot_id:
        ec2.get_waiter("snapshot_completed").wait(SnapshotIds=[job.snapshot_id])
    request: dict[str, Any] = {
        "AvailabilityZone": job.availability_zone,
        "Size": job.size_gib,
        "VolumeType": "gp3",
        "Encrypted": True,
        "TagSpecifications": [
            {"ResourceType": "volume", "Tags": [{"Key": "xdrive:name", "Value": job.drive}]}
        ],
    }
    if job.snapshot_id:
        request["SnapshotId"] = job.snapshot_id
    volume_id = ec2.create_volume(**request)["VolumeId"]
    ec2.get_waiter("volume_available").wait(VolumeIds=[volume_id])
    ec2.attach_volume(VolumeId=volume_id, InstanceId=job.instance_id, Device="/dev/sdf")
    ec2.get_waiter("volume_in_use").wait(VolumeIds=[volume_id])
    root = Path(job.root)
    device = resolve_device(volume_id, root=root, requested_name="/dev/sdf", timeout_s=120)
    if not job.snapshot_id:
        filesystem.make_filesystem(device, "ext4", label=job.drive[:16])
    filesystem.mount(device, root / "v1", "ext4")
    Notifier().ready(f"baseline: mounted {volume_id}")


# --- the benchmark ---------------------------------------------------------------------------


class BootBench:
    def __init__(self, n: int, baseline_n: int) -> None:
        from xdrive.sandbox.core import Sandbox
        from xdrive.sandbox.settings import Latencies

        self.n = n
        self.baseline_n = baseline_n
        self.latencies = Latencies(volume_create=1.0, attach=1.0, device_appear=0.5, snapshot=2.0)
        self.sb = Sandbox().start()
        self._count = 0
        self.template = ""

    def close(self) -> None:
        self.sb.close()

    @property
    def volume_path_s(self) -> float:
        lat = self.latencies
        return lat.volume_create + lat.attach + lat.device_appear

    def _prepare(self, case: Case, drive: str) -> tuple[Optional[str], float]:
        """Give ``drive`` its state before the boot; returns (snapshot, when it completes)."""
        from xdrive import tags
        from xdrive.ec2 import Ec2
        from xdrive.sandbox.settings import Latencies

        if case == "new":
            return None, 0.0
        # A snapshot of the template drive's filesystem, tagged as this drive's final save.
        ec2 = Ec2(self.sb.client())
        self.sb.fidelity.set_latencies(Latencies())
        volume = ec2.create_volume(drive, "us-east-1a", None, 1, snapshot_id=self.template)
        if case == "pending":
            self.sb.fidelity.set_latencies(self.latencies)
        snap = ec2.create_snapshot(volume, tags.FINAL, "bench", None)
        requested = time.monotonic()
        ec2.delete_volume(volume.id)  # the snapshot alone holds the state
        done_at = requested + (self.latencies.snapshot if case == "pending" else 0.0)
        return snap.id, done_at

    def _make_template(self) -> str:
        """One real agent boot + save: a snapshot holding an ext4 filesystem with files."""
        from xdrive.sandbox.settings import Latencies

        self.sb.fidelity.set_latencies(Latencies())
        inst = self.sb.launch("us-east-1a")
        self.sb.start_agent(inst.instance_id, self.sb.agent_config(inst, "template", docker=False))
        self.sb.wait_ready(inst.instance_id)
        (inst.root / "v1" / "hello").write_text("hello\n")
        if self.sb.stop_agent(inst.instance_id) != 0:
            raise RuntimeError(
                "the template save failed:\n" + self.sb.agent_log_tail(inst.instance_id)
            )
        answer = self.sb.client().describe_snapshots(
            OwnerIds=["self"], Filters=[{"Name": "tag:xdrive:name", "Values": ["template"]}]
        )
        (snap,) = answer["Snapshots"]
        return str(snap["SnapshotId"])

    def boot(self, runner: Literal["agent", "baseline"], case: Case) -> BootTiming:
        self._count += 1
        drive = f"bench-{case}-{self._count}"
        snapshot_id, done_at = self._prepare(case, drive)
        self.sb.fidelity.set_latencies(self.latencies)
        inst = self.sb.launch("us-east-1b")
        started = time.monotonic()
        if runner == "agent":
            config = self.sb.agent_config(inst, drive, docker=False)
            self.sb.start_agent(inst.instance_id, config)
            proc = inst.agent
        else:
            job = BaselineJob(
                endpoint=self.sb.url,
                region="us-east-1",
                instance_id=inst.instance_id,
                availability_zone=inst.availability_zone,
                root=str(inst.root),
                drive=drive,
                snapshot_id=snapshot_id,
                size_gib=1,
            )
            proc = _start_baseline(job, inst.notify.path)
        try:
            if not inst.notify.wait_for(lambda m: "READY=1" in m, timeout_s=180):
                raise RuntimeError(f"{runner} {case} boot never sent READY=1")
        finally:
            self.sb.crash(inst.instance_id)  # frees the mount and loop device either way
            if proc is not None and proc.poll() is None:
                proc.kill()
            if proc is not None:
                proc.wait(timeout=30)
        timed = inst.notify.timed_messages()
        ready_at = next(t for t, m in timed if m == "READY=1")
        waiting_for_snapshot = max(0.0, done_at - started)
        return BootTiming(
            runner=runner,
            case=case,
            wall_s=ready_at - started,
            injected_s=waiting_for_snapshot + self.volume_path_s,
            steps=tuple(
                (round(t - started, 3), m[len("STATUS=") :])
                for t, m in timed
                if m.startswith("STATUS=") and t <= ready_at
            ),
        )

    def run(self) -> list[BootTiming]:
        self.template = self._make_template()
        timings: list[BootTiming] = []
        for case in CASES:
            for _ in range(self.n):
                timings.append(self.boot("agent", case))
                _progress(timings[-1])
        for case in CASES:
            for _ in range(self.baseline_n):
                timings.append(self.boot("baseline", case))
                _progress(timings[-1])
        return timings


def _start_baseline(job: BaselineJob, notify_socket: Path) -> subprocess.Popen[bytes]:
    from xdrive.sandbox.core import SANDBOX_CREDENTIALS

    env = {**os.environ, **SANDBOX_CREDENTIALS, "NOTIFY_SOCKET": str(notify_socket)}
    for var in ("AWS_PROFILE", "AWS_ENDPOINT_URL"):
        env.pop(var, None)
    return subprocess.Popen(
        [sys.executable, __file__, "--baseline", json.dumps(asdict(job))],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )


def _progress(t: BootTiming) -> None:
    print(
        f"  {t.runner:8} {t.case:8} {t.wall_s:6.2f} s to READY, "
        f"{t.injected_s:5.2f} s injected, overhead {t.overhead_s:5.2f} s",
        flush=True,
    )


def _machine() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()),
    }


def summarize(timings: list[BootTiming], bench: BootBench) -> dict[str, Any]:
    agent = [t.overhead_s for t in timings if t.runner == "agent"]
    baseline = [t.overhead_s for t in timings if t.runner == "baseline"]
    per_case: dict[str, Any] = {}
    for runner in ("agent", "baseline"):
        for case in CASES:
            mine = [t for t in timings if t.runner == runner and t.case == case]
            if not mine:
                continue
            over = [t.overhead_s for t in mine]
            per_case[f"{runner}:{case}"] = {
                "n": len(mine),
                "overhead_s_p50": round(percentile(over, 50), 3),
                "overhead_s_p95": round(percentile(over, 95), 3),
                "wall_s_p50": round(percentile([t.wall_s for t in mine], 50), 3),
                "injected_s_p50": round(percentile([t.injected_s for t in mine], 50), 3),
            }
            if runner == "agent":
                first = [t.first_decision_s for t in mine]
                per_case[f"{runner}:{case}"]["first_decision_s_p50"] = round(
                    percentile(first, 50), 3
                )
    p50 = percentile(agent, 50)
    base_p50 = percentile(baseline, 50) if baseline else float("nan")
    slowest = max((t for t in timings if t.runner == "agent"), key=lambda t: t.overhead_s)
    return {
        "boot_overhead_s_p50": round(p50, 3),
        "boot_overhead_s_p95": round(percentile(agent, 95), 3),
        "baseline_boot_overhead_s_p50": round(base_p50, 3) if baseline else None,
        "ratio": round(base_p50 / p50, 1) if baseline and p50 > 0 else None,
        "n": len(agent),
        "baseline_n": len(baseline),
        "latencies": asdict(bench.latencies),
        "cases": per_case,
        "slowest_agent_boot": {
            "case": slowest.case,
            "overhead_s": round(slowest.overhead_s, 3),
            "steps": [list(s) for s in slowest.steps],
        },
        "machine": _machine(),
        "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def print_table(summary: dict[str, Any]) -> None:
    header = ("runner:case", "n", "wall p50", "injected", "overhead p50", "p95", "1st step")
    print("{:18} {:>3} {:>9} {:>9} {:>13} {:>7} {:>9}".format(*header))
    for name, row in summary["cases"].items():
        first = row.get("first_decision_s_p50")
        print(
            f"{name:18} {row['n']:>3} {row['wall_s_p50']:>8.2f}s {row['injected_s_p50']:>8.2f}s"
            f" {row['overhead_s_p50']:>12.2f}s {row['overhead_s_p95']:>6.2f}s"
            + (f" {first:>8.2f}s" if first is not None else "")
        )
    baseline = summary["baseline_boot_overhead_s_p50"]
    print(
        f"agent boot overhead p50 {summary['boot_overhead_s_p50']:.2f} s "
        f"(p95 {summary['boot_overhead_s_p95']:.2f} s, n={summary['n']}); "
        + (
            f"boto3-waiter baseline p50 {baseline:.2f} s (n={summary['baseline_n']}): "
            f"ratio {summary['ratio']}"
            if baseline is not None
            else "no baseline run"
        )
    )
    print("1st step: process start to the agent's first decision (Python, boto3, IMDS, EC2)")


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--baseline":
        baseline_boot(BaselineJob(**json.loads(argv[1])))
        return 0
    n = int(os.environ.get("BENCH_BOOT_N", "10"))
    baseline_n = int(os.environ.get("BENCH_BOOT_BASELINE_N", "3"))
    bench = BootBench(n, baseline_n)
    try:
        timings = bench.run()
    finally:
        bench.close()
    summary = summarize(timings, bench)
    print_table(summary)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "boot.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
