"""The agent's IAM policy allows every EC2 action the agent calls, and nothing more.

The agent runs in the sandbox through every path of its life (new drive, save, restore in
another zone, migration of an unsaved volume, same-zone reattach with a generation retag,
checkpoint); the sandbox records each call with the caller's access key, so the agent's
calls are told from the harness's own. Throughout, the sandbox enforces the policy scoped
to the drive (`xdrive iam-policy --role agent --drive NAME`), conditions included: every
call must be allowed for the life to complete.
"""

from __future__ import annotations

import signal
import time

import pytest

from tests.boot_helpers import DRIVE, drive_snapshots, drive_volumes, wait_status
from xdrive.launcher.iam import PolicyScope, agent_policy, policy_actions
from xdrive.sandbox.core import AGENT_ACCESS_KEY, Sandbox, SimInstance
from xdrive.sandbox.settings import Latencies

pytestmark = pytest.mark.root
# Fetched by the user-data's bootstrap (the agent archive), not by the agent process.
BOOTSTRAP_ACTIONS = {"s3:GetObject"}


def boot(sb: Sandbox, az: str) -> SimInstance:
    inst = sb.launch(az)
    sb.start_agent(inst.instance_id, sb.agent_config(inst, DRIVE, docker=False))
    sb.wait_ready(inst.instance_id)
    return inst


def agent_calls(sandbox: Sandbox) -> set[str]:
    return {
        call.iam_action
        for call in sandbox.fidelity.recorded_actions()
        if call.access_key == AGENT_ACCESS_KEY
    }


def test_agent_policy_is_exactly_what_the_agent_calls(sandbox: Sandbox) -> None:
    sandbox.fidelity.enforce_policy(AGENT_ACCESS_KEY, agent_policy(PolicyScope(drive=DRIVE)))
    a = boot(sandbox, "us-east-1a")  # new drive: CreateVolume, AttachVolume
    sandbox.rebalance(a.instance_id)  # checkpoint: CreateSnapshot while mounted
    wait_status(a, r"^checkpoint snap-")
    assert sandbox.stop_agent(a.instance_id) == 0  # save: DetachVolume, DeleteVolume
    sandbox.terminate(a.instance_id)

    b = boot(sandbox, "us-east-1b")  # restore from the final snapshot in another zone
    sandbox.crash(b.instance_id)  # no save: the volume is the newest state
    c = boot(sandbox, "us-east-1c")  # migration: DescribeInstances (its creator), snapshot

    # A save cut short after the detach: the volume stays, saved once the snapshot completes.
    sandbox.fidelity.set_latencies(Latencies(snapshot=3.0))
    assert c.agent is not None
    c.agent.send_signal(signal.SIGTERM)
    wait_status(c, r"^detached vol-.*; waiting for snap-")
    sandbox.kill_agent(c.instance_id)
    sandbox.crash(c.instance_id)
    sandbox.fidelity.set_latencies(Latencies())
    deadline = time.monotonic() + 30
    while any(s["State"] != "completed" for s in drive_snapshots(sandbox)):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    d = boot(sandbox, "us-east-1c")  # same-zone reattach: CreateTags (generation retag)
    assert sandbox.stop_agent(d.instance_id) == 0

    refused = [c for c in sandbox.fidelity.recorded_actions() if c.status == 403]
    assert refused == [], "the enforced policy refused the agent"
    called = agent_calls(sandbox)
    allowed = policy_actions(agent_policy())
    assert called, "no agent call was recorded"
    assert called <= allowed, f"the agent calls actions its policy denies: {called - allowed}"
    unused = allowed - called - BOOTSTRAP_ACTIONS
    assert not unused, f"the agent policy allows actions the agent never calls: {unused}"
    assert not any("*" in action for action in allowed)


@pytest.mark.policy_denials
def test_a_policy_for_another_drive_stops_the_agent_before_it_creates_anything(
    sandbox: Sandbox,
) -> None:
    """The enforcement is real: scoped to drive "other", the agent may look but not touch."""
    sandbox.fidelity.enforce_policy(AGENT_ACCESS_KEY, agent_policy(PolicyScope(drive="other")))
    inst = sandbox.launch("us-east-1a")
    sandbox.start_agent(inst.instance_id, sandbox.agent_config(inst, DRIVE, docker=False))
    assert sandbox.wait_agent_exit(inst.instance_id) == 1
    log = sandbox.agent_log_tail(inst.instance_id)
    assert "AWS denied ec2:CreateVolume (UnauthorizedOperation)" in log
    assert "xdrive iam-policy" in log
    assert drive_volumes(sandbox) == []
    refused = [c.action for c in sandbox.fidelity.recorded_actions() if c.status == 403]
    assert refused == ["CreateVolume"]
    assert sandbox.fidelity.policy_denials() == (
        "ec2:CreateVolume on arn:aws:ec2:us-east-1:123456789012:volume/*",
    )
