"""The sandbox: a local AWS in which the real agent runs against simulated instances.

One object owns every part it starts (moto + fidelity server, block plane, an IMDS server
and a dockerd per instance, agent processes) and stops them all in ``close()``, by PID,
even after failures. Only endpoints and a root prefix differ from production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Optional

import boto3
from botocore.config import Config

from xdrive.agent.config import AgentConfig, DockerSettings, VolumeSettings, WatchSettings
from xdrive.agent.state import AgentStatus, read_status
from xdrive.errors import XdriveError
from xdrive.launcher.iam import agent_policy
from xdrive.sandbox import dockerctl
from xdrive.sandbox.blocks import BlockPlane
from xdrive.sandbox.fidelity import Ec2Fidelity
from xdrive.sandbox.imds import ImdsIdentity, ImdsServer, RoleCredentials
from xdrive.sandbox.notify import NotifyListener
from xdrive.sandbox.server import SandboxServer
from xdrive.sandbox.settings import Faults, Latencies

# moto loads ~1,300 public AMI snapshots by default: unfiltered DescribeSnapshots then takes
# most of a second. Set before moto's EC2 backend first starts.
os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")

REGION = "us-east-1"
ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")
AMI = "ami-12c6146b"  # moto does not check AMIs; any id stands for Amazon Linux 2023
# The user's own credentials on the sandbox (the launcher, tests, the harness): moto
# accepts any key.
SANDBOX_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "sandbox",
    "AWS_SECRET_ACCESS_KEY": "sandbox",
    "AWS_DEFAULT_REGION": REGION,
}


# Instances get their role's temporary credentials from their IMDS, as on EC2: this key id
# (the secret and token are random per instance), so recorded calls tell agents' from others'.
AGENT_ACCESS_KEY = "ASIASANDBOXAGENT0001"
AGENT_ROLE = "xdrive-agent"
AGENT_CREDENTIALS_LIFETIME = timedelta(hours=6)
# Not passed to agents: on an instance, nothing but the instance profile gives AWS access.
_HOST_AWS_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_ENDPOINT_URL",
    "AWS_EC2_METADATA_DISABLED",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
)


class SandboxError(XdriveError):
    """Misuse of the sandbox: unknown instance, not started, already closed."""


@dataclass
class SimInstance:
    """A moto instance + its IMDS endpoint + a root prefix + (once started) an agent."""

    instance_id: str
    availability_zone: str
    instance_type: str
    life_cycle: str
    root: Path
    imds: ImdsServer
    notify: NotifyListener
    agent: Optional[subprocess.Popen[bytes]] = None
    config_path: Optional[Path] = None
    history: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def docker_url(self) -> str:
        return dockerctl.docker_url(self.root)

    @property
    def agent_log(self) -> Path:
        return self.root / "var/log/xdrive-agent.log"

    def status(self) -> Optional[AgentStatus]:
        return read_status(self.root / "var/lib/xdrive")


def instance_environment(inst: SimInstance) -> dict[str, str]:
    """What an agent process on ``inst`` sees of AWS: no keys, no profile, no config file;
    boto3 finds the role's credentials on the instance's IMDS (IMDSv2, as on EC2)."""
    env = {k: v for k, v in os.environ.items() if k not in _HOST_AWS_VARIABLES}
    env.update(
        {
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": inst.imds.url + "/",
            "AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE": "IPv4",
            "AWS_CONFIG_FILE": str(inst.root / "root/.aws/config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(inst.root / "root/.aws/credentials"),
        }
    )
    return env


def agent_environment(inst: SimInstance) -> dict[str, str]:
    """The whole environment of an agent process on ``inst``, as systemd would give it:
    ``instance_environment``, NOTIFY_SOCKET, and none of the caller's journal variables."""
    env = {
        **instance_environment(inst),
        "NOTIFY_SOCKET": str(inst.notify.path),
        "PYTHONUNBUFFERED": "1",
    }
    for var in ("INVOCATION_ID", "JOURNAL_STREAM"):
        env.pop(var, None)
    return env


class Sandbox:
    def __init__(
        self,
        workdir: Optional[Path] = None,
        *,
        latencies: Optional[Latencies] = None,
        faults: Optional[Faults] = None,
    ) -> None:
        self._own_workdir = workdir is None
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="xds-", dir="/tmp"))
        self.blocks = BlockPlane(self.workdir / "blocks")
        self.fidelity = Ec2Fidelity(
            self.blocks, latencies=latencies, faults=faults, on_run_instances=self._booted
        )
        # Agents act under the policy `xdrive iam-policy --role agent` prints, as a
        # least-privilege instance profile would hold it: every agent test tests it too.
        self.fidelity.enforce_policy(AGENT_ACCESS_KEY, agent_policy())
        self.server = SandboxServer(self.fidelity)
        self.instances: dict[str, SimInstance] = {}
        self._lock = threading.Lock()
        self._started = False
        self._closed = False

    # --- lifecycle ----------------------------------------------------------------------

    def start(self) -> Sandbox:
        if self._closed:
            raise SandboxError("this sandbox was closed", "create a new Sandbox")
        if not self._started:
            self.server.start()
            self._started = True
        return self

    def __enter__(self) -> Sandbox:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def url(self) -> str:
        self._check_started()
        return self.server.url

    def close(self) -> None:
        """Stop everything this sandbox started; safe to call twice, and after failures."""
        if self._closed:
            return
        self._closed = True
        errors: list[str] = []
        for inst in list(self.instances.values()):
            for step in (self._kill_agent, self._stop_docker, self._unmount_all):
                try:
                    step(inst)
                except Exception as e:  # teardown goes on: the next part must still stop
                    errors.append(f"{inst.instance_id}: {step.__name__}: {e}")
            inst.imds.stop()
            inst.notify.close()
        self.fidelity.close()
        self.blocks.teardown()
        self.server.stop()
        self.fidelity.reset()
        if self._own_workdir:
            subprocess.run(["rm", "-rf", "--one-file-system", str(self.workdir)], check=False)
        if errors:
            raise SandboxError("sandbox teardown had errors: " + "; ".join(errors))

    def _check_started(self) -> None:
        if not self._started or self._closed:
            raise SandboxError(
                "the sandbox is not running", "call start() (or `xdrive sandbox up`)"
            )

    # --- AWS clients ----------------------------------------------------------------------

    def client(self, service: str = "ec2", max_attempts: int = 10) -> Any:
        self._check_started()
        return boto3.client(
            service,  # type: ignore[call-overload]
            endpoint_url=self.server.url,
            region_name=REGION,
            aws_access_key_id=SANDBOX_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=SANDBOX_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            config=Config(retries={"mode": "standard", "max_attempts": max_attempts}),
        )

    # --- instances ------------------------------------------------------------------------

    def launch(
        self, availability_zone: str = ZONES[0], instance_type: str = "t3.micro", spot: bool = True
    ) -> SimInstance:
        """RunInstances like the launcher does; the instance is set up by the RunInstances
        hook, as for any client's launch."""
        request: dict[str, Any] = {
            "ImageId": AMI,
            "InstanceType": instance_type,
            "MinCount": 1,
            "MaxCount": 1,
            "Placement": {"AvailabilityZone": availability_zone},
            "MetadataOptions": {"HttpTokens": "required", "HttpEndpoint": "enabled"},
        }
        if spot:
            request["InstanceMarketOptions"] = {
                "MarketType": "spot",
                "SpotOptions": {"SpotInstanceType": "one-time"},
            }
        answer = self.client().run_instances(**request)
        return self.instance(answer["Instances"][0]["InstanceId"])

    def _booted(self, instance_ids: list[str]) -> None:
        """RunInstances hook: give each new instance a root, an IMDS and a notify socket."""
        described = self.client().describe_instances(InstanceIds=instance_ids)
        for reservation in described["Reservations"]:
            for item in reservation["Instances"]:
                self._set_up(item)

    def _set_up(self, item: dict[str, Any]) -> SimInstance:
        iid = item["InstanceId"]
        root = self.workdir / iid
        for sub in ("etc/xdrive", "etc/docker", "run", "var/log", "var/lib/xdrive", "dev"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        life_cycle = "spot" if item.get("InstanceLifecycle") == "spot" else "on-demand"
        identity = ImdsIdentity(
            instance_id=iid,
            availability_zone=item["Placement"]["AvailabilityZone"],
            region=REGION,
            instance_type=item["InstanceType"],
            life_cycle=life_cycle,  # type: ignore[arg-type]
        )
        imds = ImdsServer(identity).start()
        imds.set_role(
            RoleCredentials.issue(AGENT_ROLE, AGENT_ACCESS_KEY, AGENT_CREDENTIALS_LIFETIME)
        )
        inst = SimInstance(
            instance_id=iid,
            availability_zone=identity.availability_zone,
            instance_type=identity.instance_type,
            life_cycle=life_cycle,
            root=root,
            imds=imds,
            notify=NotifyListener(root / "run/notify.sock"),
        )
        self.fidelity.register_instance(iid, root)
        with self._lock:
            self.instances[iid] = inst
        return inst

    def instance(self, instance_id: str) -> SimInstance:
        with self._lock:
            inst = self.instances.get(instance_id)
        if inst is None:
            known = ", ".join(sorted(self.instances)) or "none"
            raise SandboxError(
                f"unknown instance {instance_id!r}", f"instances in this sandbox: {known}"
            )
        return inst

    # --- the agent --------------------------------------------------------------------------

    def agent_config(
        self,
        inst: SimInstance,
        drive: str,
        *,
        size_gib: int = 1,
        filesystem: str = "ext4",
        docker: bool = True,
        poll_interval_s: float = 0.5,
        checkpoint_interval_s: float = 0.0,
    ) -> AgentConfig:
        """The agent's production config with the sandbox's endpoints and root prefix."""
        dockerctl_cmd = (sys.executable, "-m", "xdrive.sandbox.dockerctl")
        return AgentConfig(
            drive=drive,
            root=str(inst.root),
            region=REGION,
            imds_url=inst.imds.url,
            ec2_endpoint=self.url,
            volume=VolumeSettings(size_gib=size_gib, filesystem=filesystem),
            docker=DockerSettings(
                enabled=docker,
                url=inst.docker_url,
                start_command=(*dockerctl_cmd, "start", "--root", str(inst.root)),
                stop_command=(*dockerctl_cmd, "stop", "--root", str(inst.root)),
                stop_timeout_s=30.0,
            ),
            watch=WatchSettings(
                poll_interval_s=poll_interval_s, checkpoint_interval_s=checkpoint_interval_s
            ),
        )

    def start_agent(
        self, instance_id: str, config: AgentConfig, *, verbose: bool = False
    ) -> SimInstance:
        """Start ``xdrive-agent run`` as systemd would: its own process, NOTIFY_SOCKET set."""
        inst = self.instance(instance_id)
        if inst.agent is not None and inst.agent.poll() is None:
            raise SandboxError(f"the agent on {instance_id} is already running")
        inst.config_path = inst.root / "etc/xdrive/agent.json"
        inst.config_path.write_text(config.to_json())
        env = agent_environment(inst)
        with open(inst.agent_log, "ab") as log:
            inst.agent = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "xdrive.agent.main",
                    "run",
                    "--config",
                    str(inst.config_path),
                    *(["--verbose"] if verbose else []),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        inst.history.append(inst.agent)
        return inst

    def wait_ready(self, instance_id: str, timeout_s: float = 120.0) -> AgentStatus:
        """Until the agent watches (drive mounted, docker on it), or fail with its log."""
        inst = self.instance(instance_id)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = inst.status()
            # The pid: a status file left by an earlier agent on this instance says "ready" too.
            pid = inst.agent.pid if inst.agent is not None else None
            if status is not None and status.phase == "ready" and status.pid == pid:
                return status
            if inst.agent is not None and inst.agent.poll() is not None:
                raise SandboxError(
                    f"the agent on {instance_id} exited with {inst.agent.returncode}",
                    "its log:\n" + self.agent_log_tail(instance_id),
                )
            time.sleep(0.1)
        raise SandboxError(
            f"the agent on {instance_id} was not ready within {timeout_s:.0f} s",
            "its log:\n" + self.agent_log_tail(instance_id),
        )

    def wait_agent_exit(self, instance_id: str, timeout_s: float = 180.0) -> int:
        inst = self.instance(instance_id)
        if inst.agent is None:
            raise SandboxError(f"no agent was started on {instance_id}")
        try:
            return inst.agent.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise SandboxError(
                f"the agent on {instance_id} did not exit within {timeout_s:.0f} s",
                "its log:\n" + self.agent_log_tail(instance_id),
            ) from None

    def agent_log_tail(self, instance_id: str, lines: int = 40) -> str:
        try:
            text = self.instance(instance_id).agent_log.read_text(errors="replace")
        except FileNotFoundError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def stop_agent(self, instance_id: str, timeout_s: float = 180.0) -> int:
        """`systemctl stop xdrive-agent`: SIGTERM, then wait for the save to finish."""
        inst = self.instance(instance_id)
        if inst.agent is None or inst.agent.poll() is not None:
            raise SandboxError(f"no agent is running on {instance_id}")
        inst.agent.send_signal(signal.SIGTERM)
        return self.wait_agent_exit(instance_id, timeout_s)

    def kill_agent(self, instance_id: str) -> None:
        """SIGKILL the agent (a crash at whatever step it was in)."""
        self._kill_agent(self.instance(instance_id))

    def _kill_agent(self, inst: SimInstance) -> None:
        """SIGKILL the agent and its process group (its session, by its PID): a child it
        was running (a docker stop, an fsfreeze) must not outlive it and touch the drive."""
        if inst.agent is None:
            return
        try:
            os.killpg(inst.agent.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if inst.agent.poll() is None:
            inst.agent.wait(timeout=30)

    def _stop_docker(self, inst: SimInstance) -> None:
        dockerctl.stop_dockerd(inst.root, timeout_s=20)

    def _unmount_all(self, inst: SimInstance) -> None:
        """Lazily unmount whatever is still mounted under the instance root (deepest first)."""
        prefix = str(inst.root) + "/"
        mounts = [
            line.split()[1]
            for line in Path("/proc/self/mounts").read_text().splitlines()
            if line.split()[1].startswith(prefix)
        ]
        for mountpoint in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", mountpoint], check=False, capture_output=True)

    # --- what AWS does to instances ---------------------------------------------------------

    def notice(
        self, instance_id: str, action: str = "terminate", in_seconds: float = 120.0
    ) -> datetime:
        """Post the spot interruption notice (the instance goes at the returned time)."""
        inst = self.instance(instance_id)
        at = datetime.now(timezone.utc) + timedelta(seconds=in_seconds)
        return inst.imds.issue_interruption(action, at)  # type: ignore[arg-type]

    def rebalance(self, instance_id: str) -> datetime:
        return self.instance(instance_id).imds.issue_rebalance()

    def terminate(self, instance_id: str, graceful: bool = True) -> None:
        """TerminateInstances. Graceful: the OS shuts down first, so systemd stops the agent
        (its save runs) and docker; otherwise the instance just dies."""
        inst = self.instance(instance_id)
        if graceful and inst.agent is not None and inst.agent.poll() is None:
            inst.agent.send_signal(signal.SIGTERM)
            self.wait_agent_exit(instance_id)
        else:
            self._kill_agent(inst)
        self._stop_docker(inst)
        if not graceful:
            self._unmount_all(inst)
        self.client().terminate_instances(InstanceIds=[instance_id])

    def crash(self, instance_id: str) -> None:
        """The instance dies with no notice and no shutdown: nothing is saved."""
        self.terminate(instance_id, graceful=False)

    # --- docker on an instance ------------------------------------------------------------

    def docker(self, instance_id: str) -> Any:
        import docker

        return docker.DockerClient(base_url=self.instance(instance_id).docker_url, timeout=30)

    def describe(self) -> dict[str, Any]:
        return {
            "url": self.server.url if self._started else None,
            "workdir": str(self.workdir),
            "instances": {
                iid: {
                    "availability_zone": inst.availability_zone,
                    "instance_type": inst.instance_type,
                    "life_cycle": inst.life_cycle,
                    "imds": inst.imds.url,
                    "root": str(inst.root),
                    "agent_pid": inst.agent.pid if inst.agent else None,
                    "agent_running": bool(inst.agent and inst.agent.poll() is None),
                }
                for iid, inst in self.instances.items()
            },
        }


__all__ = ["REGION", "ZONES", "Faults", "Latencies", "Sandbox", "SandboxError", "SimInstance"]
