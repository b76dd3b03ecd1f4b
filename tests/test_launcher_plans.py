"""The launcher's pure decisions: where a drive can go, which zone is cheapest, which
snapshots prune may delete, and the shape of the IAM policies. Tables, no AWS."""

from __future__ import annotations

import inspect
import re
from dataclasses import replace
from pathlib import Path

import pytest

from tests.launcher_fixtures import snapshot, volume
from xdrive.ec2 import Ec2, Ec2ApiError, InstanceDetails, InstanceSpec
from xdrive.errors import AwsError, ConfigError
from xdrive.launcher.drives import agent_activity
from xdrive.launcher.iam import (
    SNAPSHOTS,
    VOLUMES,
    PolicyScope,
    agent_policy,
    launcher_policy,
    policy_actions,
)
from xdrive.launcher.launch import start_instance
from xdrive.launcher.placement import DrivePlacement, choose_zone, drive_placement
from xdrive.launcher.prune import plan_prune

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c", "us-east-1d")
REPO = Path(__file__).resolve().parent.parent

# --- where the drive can go ----------------------------------------------------------------


def test_new_drive_goes_anywhere() -> None:
    placement = drive_placement((), ())
    assert placement.zones is None and placement.preferred is None


def test_newest_state_in_a_snapshot_goes_anywhere() -> None:
    # The old volume of generation 1 is older than the final snapshot of generation 2.
    old = volume("vol-old", "us-east-1b", generation=1)
    snaps = (snapshot("snap-1", "vol-old", 1), snapshot("snap-2", "vol-gone", 2, minute=5))
    assert drive_placement((old,), snaps).zones is None


def test_unsaved_volume_pins_the_drive_to_its_zone() -> None:
    newest = volume("vol-new", "us-east-1c", generation=3, minute=10)
    snaps = (snapshot("snap-2", "vol-gone", 2),)
    placement = drive_placement((newest,), snaps)
    assert placement.zones == ("us-east-1c",)
    assert "vol-new" in placement.reason


def test_volume_still_being_saved_is_not_saved_yet() -> None:
    newest = volume("vol-new", "us-east-1c", generation=3)
    snaps = (snapshot("snap-3", "vol-new", 3, state="pending"),)
    assert drive_placement((newest,), snaps).zones == ("us-east-1c",)


def test_saved_volume_goes_anywhere_but_prefers_its_zone() -> None:
    saved = volume("vol-new", "us-east-1c", generation=3)
    snaps = (snapshot("snap-3", "vol-new", 3),)
    placement = drive_placement((saved,), snaps)
    assert placement.zones is None
    assert placement.preferred == "us-east-1c"


# --- the cheapest zone -----------------------------------------------------------------------

PRICES = {"us-east-1a": 0.30, "us-east-1b": 0.10, "us-east-1c": 0.20, "us-east-1d": 0.25}


def test_cheapest_zone_wins_for_a_drive_that_can_go_anywhere() -> None:
    choice = choose_zone("work", DrivePlacement(None, "new"), ZONES, ZONES, PRICES)
    assert (choice.zone, choice.price) == ("us-east-1b", 0.10)
    assert [z.availability_zone for z in choice.candidates] == list(ZONES)


def test_an_unsaved_volume_zone_beats_a_cheaper_zone() -> None:
    placement = DrivePlacement(("us-east-1d",), "unsaved", preferred="us-east-1d")
    choice = choose_zone("work", placement, ZONES, ZONES, PRICES)
    assert choice.zone == "us-east-1d"


def test_a_saved_volume_zone_wins_only_a_tie() -> None:
    placement = DrivePlacement(None, "saved", preferred="us-east-1c")
    tie = dict(PRICES, **{"us-east-1c": 0.10})
    assert choose_zone("work", placement, ZONES, ZONES, tie).zone == "us-east-1c"
    assert choose_zone("work", placement, ZONES, ZONES, PRICES).zone == "us-east-1b"


def test_only_usable_zones_with_a_price_count() -> None:
    usable = ("us-east-1a", "us-east-1c")  # type offered and a subnet there
    prices = {"us-east-1a": 0.3, "us-east-1b": 0.01}
    choice = choose_zone("work", DrivePlacement(None, "new"), ZONES, usable, prices)
    assert choice.zone == "us-east-1a"


def test_pinned_zone_not_usable_says_how_to_free_the_drive() -> None:
    placement = DrivePlacement(("us-east-1d",), "unsaved", preferred="us-east-1d")
    with pytest.raises(ConfigError, match="xdrive save work"):
        choose_zone("work", placement, ZONES, ("us-east-1a",), PRICES)


def test_max_price_below_the_cheapest_is_refused() -> None:
    with pytest.raises(ConfigError, match="max-price"):
        choose_zone("work", DrivePlacement(None, "new"), ZONES, ZONES, PRICES, max_price=0.05)
    choice = choose_zone("work", DrivePlacement(None, "new"), ZONES, ZONES, PRICES, max_price=0.1)
    assert choice.zone == "us-east-1b"


def test_no_spot_price_anywhere_suggests_on_demand() -> None:
    with pytest.raises(ConfigError, match="on-demand"):
        choose_zone("work", DrivePlacement(None, "new"), ZONES, ZONES, {})


def test_on_demand_takes_the_preferred_zone() -> None:
    placement = DrivePlacement(None, "saved", preferred="us-east-1c")
    choice = choose_zone("work", placement, ZONES, ZONES, None)
    assert (choice.zone, choice.price) == ("us-east-1c", None)
    assert choose_zone("work", DrivePlacement(None, "new"), ZONES, ZONES, None).zone == "us-east-1a"


# --- prune ---------------------------------------------------------------------------------------


def _deleted(plan_volumes, plan_snapshots, keep):
    plan = plan_prune("work", plan_volumes, plan_snapshots, keep)
    return {s.id for s in plan.to_delete}


def test_prune_keeps_the_newest_n_completed() -> None:
    snaps = [snapshot(f"snap-{g}", "vol-gone", g, minute=g) for g in range(1, 6)]
    assert _deleted((), snaps, 2) == {"snap-1", "snap-2", "snap-3"}
    assert _deleted((), snaps, 10) == set()


def test_prune_never_deletes_the_newest_completed_nor_a_pending_one() -> None:
    snaps = [
        snapshot("snap-3", "vol-gone", 3, minute=1),
        snapshot("snap-4", "vol-gone", 4, minute=2),
        snapshot("snap-5", "vol-gone", 5, state="pending", minute=3),  # the newest state
    ]
    plan = plan_prune("work", (), snaps, 1)
    assert {s.id for s in plan.to_delete} == {"snap-3"}
    why = {d.snapshot.id: d.why for d in plan.decisions}
    assert "pending" in why["snap-5"]
    assert "newest completed" in why["snap-4"]


def test_prune_keeps_the_final_a_leftover_volume_is_saved_by() -> None:
    # vol-old (generation 2) is still there; snap-2 is the only proof that it is saved, so
    # cleanup may delete the volume. Deleting snap-2 would leave the volume as the only copy.
    leftover = volume("vol-old", "us-east-1b", generation=2)
    snaps = [
        snapshot("snap-1", "vol-x", 1, minute=1),
        snapshot("snap-2", "vol-old", 2, minute=2),
        snapshot("snap-3", "vol-y", 3, minute=3),
        snapshot("snap-4", "vol-y", 4, minute=4),
    ]
    assert _deleted((leftover,), snaps, 1) == {"snap-1", "snap-3"}
    # Once the volume is gone, its final is one more old snapshot.
    assert _deleted((), snaps, 1) == {"snap-1", "snap-2", "snap-3"}


def test_prune_orders_states_not_times() -> None:
    # The checkpoint of generation 3 was taken after the final of generation 3, but a final
    # is the newer state of a generation: keep=1 keeps the final.
    snaps = [
        snapshot("snap-final", "vol-gone", 3, minute=1),
        snapshot("snap-check", "vol-other", 3, kind="checkpoint", minute=9),
    ]
    assert _deleted((), snaps, 1) == {"snap-check"}


def test_prune_deletes_failed_and_keeps_recycle_bin() -> None:
    snaps = [
        snapshot("snap-err", "vol-gone", 5, state="error", minute=5),
        snapshot("snap-bin", "vol-gone", 1, state="recoverable", minute=1),
        snapshot("snap-2", "vol-gone", 2, minute=2),
    ]
    assert _deleted((), snaps, 1) == {"snap-err"}


def test_prune_keep_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        plan_prune("work", (), (), 0)


# --- IAM policies ----------------------------------------------------------------------------

_MUTATING_EC2 = {
    "ec2:AttachVolume",
    "ec2:CreateSnapshot",
    "ec2:CreateVolume",
    "ec2:DeleteSnapshot",
    "ec2:DeleteVolume",
    "ec2:DetachVolume",
    "ec2:CreateTags",
}


@pytest.mark.parametrize("make", [agent_policy, launcher_policy], ids=["agent", "launcher"])
def test_policies_have_no_wildcard_actions(make) -> None:
    for statement in make()["Statement"]:
        actions = statement["Action"]
        for action in [actions] if isinstance(actions, str) else actions:
            assert "*" not in action, statement
            assert re.fullmatch(r"[a-z0-9-]+:[A-Za-z]+", action), action


@pytest.mark.parametrize("make", [agent_policy, launcher_policy], ids=["agent", "launcher"])
def test_mutating_volume_and_snapshot_actions_are_conditioned_on_the_drive_tag(make) -> None:
    for statement in make(PolicyScope(drive="work"))["Statement"]:
        resources = statement["Resource"]
        resources = [resources] if isinstance(resources, str) else resources
        touches = set(resources) & {VOLUMES, SNAPSHOTS}
        mutating = set(statement["Action"]) & _MUTATING_EC2
        if not touches or not mutating:
            continue
        condition = statement.get("Condition", {})
        if mutating == {"ec2:CreateTags"} and "ec2:CreateAction" in str(condition):
            continue  # tags only in the call that creates the resource
        assert condition == {"StringEquals": {condition_key(statement): "work"}}, statement


def condition_key(statement) -> str:
    (key,) = statement["Condition"]["StringEquals"]
    assert key in ("aws:ResourceTag/xdrive:name", "aws:RequestTag/xdrive:name"), key
    return key


def test_any_drive_scope_requires_the_tag_to_exist() -> None:
    statement = next(s for s in agent_policy()["Statement"] if s["Sid"] == "XdriveUseVolume")
    assert statement["Condition"] == {"StringLike": {"aws:ResourceTag/xdrive:name": "*"}}


def test_agent_may_not_delete_snapshots_or_run_instances() -> None:
    actions = policy_actions(agent_policy())
    assert "ec2:DeleteSnapshot" not in actions
    assert "ec2:RunInstances" not in actions
    assert "ec2:TerminateInstances" not in actions


def _actions_of(method_name: str, seen: set[str]) -> set[str]:
    """The aws_errors actions an Ec2 method names, following its calls to other methods."""
    if method_name in seen:
        return set()
    seen.add(method_name)
    source = inspect.getsource(getattr(Ec2, method_name))
    found = set(re.findall(r'aws_errors\("([a-z0-9]+:[A-Za-z]+)"\)', source))
    for called in re.findall(r"self\.(\w+)\(", source):
        if hasattr(Ec2, called) and callable(getattr(Ec2, called)):
            found |= _actions_of(called, seen)
    return found


def test_agent_policy_covers_every_ec2_call_the_agent_makes() -> None:
    # Read off the agent's sources: which Ec2 wrapper methods it calls.
    called: set[str] = set()
    for path in sorted((REPO / "agent").glob("*.py")):
        called |= set(re.findall(r"\bec2\.(\w+)\(", path.read_text()))
    called = {name for name in called if hasattr(Ec2, name)}
    assert {"create_volume", "attach_volume", "create_snapshot"} <= called
    needed: set[str] = set()
    for name in called:
        needed |= _actions_of(name, set())
    missing = needed - policy_actions(agent_policy())
    assert not missing, f"the agent calls {sorted(missing)}, which its policy does not allow"
    # The bootstrap fetches the agent from S3 with the instance profile.
    assert "s3:GetObject" in policy_actions(agent_policy())


# --- RunInstances errors (botocore's Stubber: the sandbox cannot run out of capacity) -----------


def _stubbed_ec2():
    import boto3
    from botocore.stub import Stubber

    client = boto3.client(
        "ec2", region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
    )
    return client, Stubber(client)


_SPEC = InstanceSpec(image_id="ami-1", instance_type="t3.micro", user_data=b"#cloud-config\n")
_LAUNCHED = {
    "Instances": [
        {"InstanceId": "i-1", "State": {"Name": "pending", "Code": 0}, "InstanceType": "t3.micro"}
    ]
}


def test_a_new_instance_profile_is_retried_until_ec2_knows_it() -> None:
    client, stub = _stubbed_ec2()
    message = "Value (xdrive-agent) for parameter iamInstanceProfile.name is invalid."
    stub.add_client_error("run_instances", "InvalidParameterValue", message)
    stub.add_client_error("run_instances", "InvalidParameterValue", message)
    stub.add_response("run_instances", _LAUNCHED)
    naps: list[float] = []
    with stub:
        found = start_instance(Ec2(client), _SPEC, True, naps.append)
    assert found.id == "i-1" and len(naps) == 2
    # An old profile that EC2 does not know is a real error, not a delay.
    stub.add_client_error("run_instances", "InvalidParameterValue", message)
    with stub, pytest.raises(Ec2ApiError):
        start_instance(Ec2(client), _SPEC, False, naps.append)


def test_no_capacity_says_what_to_do() -> None:
    client, stub = _stubbed_ec2()
    stub.add_client_error("run_instances", "InsufficientInstanceCapacity", "none left")
    with stub, pytest.raises(AwsError, match="--on-demand"):
        start_instance(Ec2(client), _SPEC, False, lambda _: None)


# --- what EC2 shows of an agent ------------------------------------------------------------------


def _instance(state: str) -> InstanceDetails:
    return InstanceDetails(
        "i-1", state, "us-east-1a", "t3.micro", "spot", tags={"xdrive:name": "work"}
    )


def _mine(s):
    return replace(s, tags={**s.tags, "xdrive:instance": "i-1"})


def test_agent_activity_read_off_ec2() -> None:
    held = volume("vol-1", generation=3, attached_to="i-1")
    assert agent_activity(_instance("pending"), (), ()) == "booting"
    assert agent_activity(_instance("running"), (), ()) == "no drive attached yet"
    assert agent_activity(_instance("running"), (held,), ()) == "drive: vol-1 (generation 3)"
    saving = _mine(snapshot("snap-3", "vol-1", 3, state="pending"))
    assert agent_activity(_instance("shutting-down"), (held,), (saving,)).endswith(
        "saving snap-3 (final 40%)"
    )
    assert agent_activity(
        _instance("terminated"), (), (_mine(snapshot("snap-3", "vol-1", 3)),)
    ) == ("saved: snap-3 (completed)")
    left = replace(volume("vol-1", generation=3), tags={**held.tags, "xdrive:instance": "i-1"})
    assert "left vol-1 unsaved: `xdrive save work`" in agent_activity(
        _instance("terminated"), (left,), ()
    )
    assert agent_activity(_instance("stopped"), (held,), ()).startswith("stopped, holding vol-1")
