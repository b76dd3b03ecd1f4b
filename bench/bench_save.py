"""Benchmark: from a spot interruption notice to the snapshot request, and what the agent
costs while it watches.

The real agent runs in the sandbox on one instance per workload, with the production
watch settings (IMDS polled every 2 s, 20 s snapshot reserve). Each trial boots it (the
drive is restored from the previous trial's snapshot and dockerd restarts the containers
by their restart policy), waits a random fraction of a poll interval, posts a 120 s notice
and times, on the agent's notify socket, the STATUS lines "requesting a final snapshot"
(notice_to_snapshot_s) and "detached" (notice_to_detached_s).

Workloads: 1 and 50 busybox containers, `--restart unless-stopped`, each appending to a
docker volume and stopping on SIGTERM (a well-behaved service: docker's 10 s stop timeout
never runs out, so the baseline is not slowed by containers the agent would kill at once).

Baseline, same run, same sandbox and workloads: a plain save script that polls IMDS every
5 s (AWS's recommendation) and on the notice runs `docker stop` on each container in turn
(SDK, default timeout), then stops dockerd, syncs, unmounts and calls CreateSnapshot.

While watching: the agent's VmRSS (after boot, every trial; the maximum is reported) and
its CPU (utime+stime over 30 s, once). Writes bench/results/save.json.

    .venv/bin/python bench/bench_save.py      # 20 agent trials per workload, 10 baseline
    BENCH_SAVE_N=3 BENCH_SAVE_CPU_S=5 .venv/bin/python bench/bench_save.py   # a quick look
"""

from __future__ import annotations

import json
import math
import os
import platform
import random
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Optional

RESULTS = Path(__file__).resolve().parent / "results"
IMAGE = "xdrive/busybox:latest"
# Appends a line a second; exits on SIGTERM (`wait` returns at once when a trap fires).
WORKER = "trap 'exit 0' TERM; while true; do date +%s >> /data/log; sleep 1 & wait $!; done"
# No network namespace per container: starting and stopping 50 of them each trial stays
# affordable (the sandbox's dockerd has no bridge anyway).
NETWORK = "host"
AGENT_POLL_S = 2.0  # the agent's default (agent/config.py WatchSettings)
BASELINE_POLL_S = 5.0
NOTICE_LEAD_S = 120


@dataclass(frozen=True)
class Trial:
    runner: str  # agent | baseline
    containers: int
    notice_to_snapshot_s: float
    notice_to_detached_s: Optional[float] = None
    rss_mb: Optional[float] = None


def percentile(values: list[float], pct: float) -> float:
    """Nearest-rank percentile: every figure reported is one that was measured."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


# --- /proc ---------------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the baseline save script ---------------------------------------------------------------


class BaselineSaver:
    """A typical hand-written save: 5 s polls, sequential `docker stop`, then the rest."""

    def __init__(self, sb: Any, inst: Any, volume_id: str) -> None:
        self.sb = sb
        self.inst = inst
        self.volume_id = volume_id
        self.requested_at: Optional[float] = None
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, name="baseline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wait(self, timeout_s: float) -> float:
        self._thread.join(timeout_s)
        if self.error is not None:
            raise self.error
        if self.requested_at is None:
            raise RuntimeError("the baseline never requested its snapshot")
        return self.requested_at

    def _run(self) -> None:
        try:
            self._wait_for_notice()
            self._save()
        except BaseException as e:
            self.error = e

    def _wait_for_notice(self) -> None:
        import requests

        url = self.inst.imds.url
        with requests.Session() as http:
            while True:
                token = http.put(
                    f"{url}/latest/api/token",
                    headers={"X-aws-ec2-metadata-token-ttl-seconds": "300"},
                    timeout=2,
                ).text
                answer = http.get(
                    f"{url}/latest/meta-data/spot/instance-action",
                    headers={"X-aws-ec2-metadata-token": token},
                    timeout=2,
                )
                if answer.status_code == 200:
                    return
                time.sleep(BASELINE_POLL_S)

    def _save(self) -> None:
        import docker

        client = docker.DockerClient(base_url=self.inst.docker_url, timeout=60)
        try:
            for container in client.containers.list():
                container.stop()  # default timeout (10 s); marks it stopped by the user
        finally:
            client.close()
        root = str(self.inst.root)
        subprocess.run(
            [sys.executable, "-m", "xdrive.sandbox.dockerctl", "stop", "--root", root],
            check=True,
            capture_output=True,
        )
        os.sync()
        subprocess.run(["umount", str(self.inst.root / "v1")], check=True, capture_output=True)
        self.requested_at = time.monotonic()
        self.sb.client().create_snapshot(VolumeId=self.volume_id, Description="baseline save")


# --- the benchmark ----------------------------------------------------------------------------


class SaveBench:
    def __init__(self, trials: int, baseline_trials: int, cpu_window_s: float) -> None:
        from xdrive.sandbox.core import Sandbox

        self.trials = trials
        self.baseline_trials = baseline_trials
        self.cpu_window_s = cpu_window_s
        self.sb = Sandbox().start()
        self.cpu_pct: Optional[float] = None

    def close(self) -> None:
        self.sb.close()

    def _config(self, inst: Any, drive: str) -> Any:
        return self.sb.agent_config(inst, drive, poll_interval_s=AGENT_POLL_S)

    def _boot(self, inst: Any, drive: str) -> Any:
        inst.imds.clear_notices()
        self.sb.start_agent(inst.instance_id, self._config(inst, drive))
        return self.sb.wait_ready(inst.instance_id, timeout_s=120)

    def _containers_running(self, inst: Any, count: int, start_stopped: bool = False) -> None:
        import docker

        client = docker.DockerClient(base_url=inst.docker_url, timeout=60)
        try:
            existing = client.containers.list(all=True)
            if not existing:
                from xdrive.sandbox import dockerctl

                dockerctl.import_busybox_image(inst.docker_url, IMAGE)
                for i in range(count):
                    client.containers.create(
                        IMAGE,
                        ["sh", "-c", WORKER],
                        name=f"worker-{i}",
                        network_mode=NETWORK,
                        restart_policy={"Name": "unless-stopped"},
                        volumes={f"data-{i}": {"bind": "/data", "mode": "rw"}},
                    )
                existing = client.containers.list(all=True)
                start_stopped = True
            if start_stopped:
                stopped = [c for c in existing if c.status != "running"]
                with ThreadPoolExecutor(8) as pool:
                    list(pool.map(lambda c: c.start(), stopped))
            deadline = time.monotonic() + 120
            while len(client.containers.list()) < count:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{count} containers did not all run within 120 s")
                time.sleep(0.1)
        finally:
            client.close()

    def _prune_snapshots(self, drive: str) -> None:
        """Keep the newest snapshot only: older ones would only slow every describe."""
        from xdrive.ec2 import Ec2

        ec2 = Ec2(self.sb.client())
        snaps = ec2.drive_snapshots(drive)
        for snap in snaps[:-1]:
            ec2.delete_snapshot(snap.id)

    def agent_trial(self, inst: Any, drive: str, containers: int, measure_cpu: bool) -> Trial:
        self._boot(inst, drive)
        self._containers_running(inst, containers)
        pid = inst.agent.pid
        if measure_cpu:
            before, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(self.cpu_window_s)
            used, elapsed = cpu_seconds(pid) - before, time.monotonic() - t0
            self.cpu_pct = 100 * used / elapsed
        time.sleep(random.uniform(0, AGENT_POLL_S))
        rss = rss_mb(pid)  # watching, just before the notice
        seen = len(inst.notify.messages())  # earlier trials' lines stay in the listener
        posted = time.monotonic()
        self.sb.notice(inst.instance_id, "terminate", in_seconds=NOTICE_LEAD_S)
        if not inst.notify.wait_for(
            lambda m: any(x.startswith("STATUS=saved ") for x in m[seen:]), 120
        ):
            raise RuntimeError("no save:\n" + self.sb.agent_log_tail(inst.instance_id))
        times = {}
        for at, message in inst.notify.timed_messages():
            if at < posted:
                continue
            for key, prefix in (
                ("snapshot", "STATUS=requesting a final snapshot"),
                ("detached", "STATUS=detached "),
            ):
                if message.startswith(prefix) and key not in times:
                    times[key] = at - posted
        if self.sb.stop_agent(inst.instance_id, timeout_s=60) != 0:
            raise RuntimeError("agent exit:\n" + self.sb.agent_log_tail(inst.instance_id))
        self._prune_snapshots(drive)
        return Trial("agent", containers, times["snapshot"], times.get("detached"), rss)

    def baseline_trial(self, inst: Any, drive: str, containers: int) -> Trial:
        status = self._boot(inst, drive)
        inst.agent.kill()  # the agent set the drive up; the baseline script saves it
        inst.agent.wait(timeout=30)
        self._containers_running(inst, containers, start_stopped=True)
        saver = BaselineSaver(self.sb, inst, status.volume_id)
        saver.start()
        time.sleep(random.uniform(0, BASELINE_POLL_S))
        posted = time.monotonic()
        self.sb.notice(inst.instance_id, "terminate", in_seconds=NOTICE_LEAD_S)
        requested = saver.wait(timeout_s=600)
        # The volume stays attached and unmounted; the next boot mounts it again.
        return Trial("baseline", containers, requested - posted)

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        trials: list[Trial] = []
        cpu_trial = min(1, self.trials - 1)
        for containers, az in ((1, "us-east-1a"), (50, "us-east-1b")):
            inst, base = self.sb.launch(az), self.sb.launch(az)
            drive, base_drive = f"bench-save-{containers}", f"bench-baseline-{containers}"
            for n in range(self.trials):
                t0 = time.monotonic()
                measure_cpu = containers == 1 and n == cpu_trial  # once is enough
                trial = self.agent_trial(inst, drive, containers, measure_cpu)
                trials.append(_logged(trial, n, t0))
            for n in range(self.baseline_trials):
                t0 = time.monotonic()
                trials.append(_logged(self.baseline_trial(base, base_drive, containers), n, t0))
        return summarize(trials, self, time.monotonic() - started)


def _logged(trial: Trial, n: int, started: float) -> Trial:
    print(
        f"  {trial.runner:<8} {trial.containers:2d} container(s) #{n + 1}: {_show(trial)} "
        f"[trial {time.monotonic() - started:.0f} s]",
        flush=True,
    )
    return trial


def _show(trial: Trial) -> str:
    text = f"notice->snapshot {trial.notice_to_snapshot_s:.2f} s"
    if trial.notice_to_detached_s is not None:
        text += f", ->detached {trial.notice_to_detached_s:.2f} s"
    if trial.rss_mb is not None:
        text += f", RSS {trial.rss_mb:.1f} MB"
    return text


def summarize(trials: list[Trial], bench: SaveBench, elapsed_s: float) -> dict[str, Any]:
    def pick(runner: str, containers: int, field: str) -> list[float]:
        return [
            getattr(t, field)
            for t in trials
            if t.runner == runner and t.containers == containers and getattr(t, field) is not None
        ]

    def p(values: list[float], pct: float) -> float:
        return round(percentile(values, pct), 3)

    ours1 = pick("agent", 1, "notice_to_snapshot_s")
    ours50 = pick("agent", 50, "notice_to_snapshot_s")
    base1 = pick("baseline", 1, "notice_to_snapshot_s")
    base50 = pick("baseline", 50, "notice_to_snapshot_s")
    detached1 = pick("agent", 1, "notice_to_detached_s")
    detached50 = pick("agent", 50, "notice_to_detached_s")
    rss = pick("agent", 1, "rss_mb") + pick("agent", 50, "rss_mb")
    result: dict[str, Any] = {
        "notice_to_snapshot_s_p50": p(ours1, 50),
        "notice_to_snapshot_s_p95": p(ours1, 95),
        "notice_to_snapshot_s_p50_50_containers": p(ours50, 50),
        "notice_to_snapshot_s_p95_50_containers": p(ours50, 95),
        "notice_to_detached_s_p50": p(detached1, 50),
        "notice_to_detached_s_p95": p(detached1, 95),
        "notice_to_detached_s_p95_50_containers": p(detached50, 95),
        "agent_rss_mb": round(max(rss), 1),
        "agent_rss_mb_p50": round(percentile(rss, 50), 1),
        "agent_cpu_pct_watching": round(bench.cpu_pct or 0.0, 3),
        "baseline_notice_to_snapshot_s_p50": p(base1, 50),
        "baseline_notice_to_snapshot_s_p95": p(base1, 95),
        "baseline_notice_to_snapshot_s_p50_50_containers": p(base50, 50),
        "baseline_notice_to_snapshot_s_p95_50_containers": p(base50, 95),
    }
    result["ratio_notice_to_snapshot_p50"] = round(
        result["baseline_notice_to_snapshot_s_p50"] / result["notice_to_snapshot_s_p50"], 2
    )
    result["ratio_notice_to_snapshot_p95"] = round(
        result["baseline_notice_to_snapshot_s_p95"] / result["notice_to_snapshot_s_p95"], 2
    )
    result["ratio_notice_to_snapshot_p95_50_containers"] = round(
        result["baseline_notice_to_snapshot_s_p95_50_containers"]
        / result["notice_to_snapshot_s_p95_50_containers"],
        2,
    )
    goals = {
        "notice_to_snapshot_s_p95": 10.0,
        "notice_to_snapshot_s_p95_50_containers": 20.0,
        "agent_rss_mb": 80.0,
        "agent_cpu_pct_watching": 1.0,
    }
    result["goals"] = {
        key: {"value": result[key], "goal": f"< {limit}", "met": result[key] < limit}
        for key, limit in goals.items()
    }
    result["setup"] = {
        "trials": bench.trials,
        "baseline_trials": bench.baseline_trials,
        "agent_poll_s": AGENT_POLL_S,
        "baseline_poll_s": BASELINE_POLL_S,
        "notice_lead_s": NOTICE_LEAD_S,
        "cpu_window_s": bench.cpu_window_s,
        "workload": "busybox containers, restart unless-stopped, appending to a docker "
        "volume, exiting on SIGTERM",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {platform.release()}",
        "python": platform.python_version(),
        "elapsed_s": round(elapsed_s, 1),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    result["trials"] = [asdict(t) for t in trials]
    return result


def main() -> int:
    if os.geteuid() != 0:
        print("bench_save needs root (loop devices, mounts, dockerd)", file=sys.stderr)
        return 1
    trials = int(os.environ.get("BENCH_SAVE_N", "20"))
    # The baseline is a reference: fewer trials keep the run near 10 minutes (a 50-container
    # trial of either kind takes about 20 s, mostly dockerd starting the containers).
    baseline_trials = int(os.environ.get("BENCH_SAVE_BASELINE_N", str(max(1, trials // 2))))
    cpu_window_s = float(os.environ.get("BENCH_SAVE_CPU_S", "30"))
    bench = SaveBench(trials, baseline_trials, cpu_window_s)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # close() still runs
    try:
        result = bench.run()
    finally:
        bench.close()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "save.json").write_text(json.dumps(result, indent=2) + "\n")
    shown = {k: v for k, v in result.items() if k not in ("trials", "setup", "goals")}
    print(json.dumps(shown, indent=2))
    for key, goal in result["goals"].items():
        print(f"{'ok  ' if goal['met'] else 'MISS'} {key} = {goal['value']} (goal {goal['goal']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
