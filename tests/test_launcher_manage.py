"""Drive management against the sandbox over HTTP: ls, snapshots, status, save, prune, rm,
stop, prices, userdata, iam-policy. Each test checks the EC2 state the command leaves."""

# ruff: noqa: F811 (the fixtures imported from tests.launcher_fixtures are parameters here)
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from tests.launcher_fixtures import (  # noqa: F401 (fixtures)
    ACCOUNT,
    REGION,
    aws_env,
    cloud_init_available,
    cloud_init_says_valid,
    ec2,
    instance,
    inventory,
    make_snapshot,
    make_volume,
    one_line_error,
    run,
)
from xdrive import __version__, tags
from xdrive.ec2 import Ec2
from xdrive.sandbox.core import Sandbox
from xdrive.sandbox.settings import Latencies


def ok_json(*args: str, input: str | None = None):
    result = run(*args, "--json", input=input)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def snapshot_ids(ec2: Ec2, name: str) -> set[str]:
    return {s.id for s in ec2.drive_snapshots(name)}


def launch_instance(name: str = "work") -> str:
    iid: str = ok_json("launch", name)["instance"]["id"]
    return iid


# --- ls, snapshots, status ---------------------------------------------------------------


def test_tag_values_from_aws_are_shown_as_plain_text(aws_env: Sandbox, ec2: Ec2) -> None:
    """Tags can hold anything anyone wrote: no rich markup, no terminal escapes, no crash.
    (XML carries no C0 controls but ESC's 8-bit twin, CSI U+009B, passes.)"""
    weird = "[/]evil[bold]\u009b2J"
    client = aws_env.client("ec2")
    volume = make_volume(ec2, "work", "us-east-1b")
    snapshot = make_snapshot(ec2, volume)
    client.create_tags(Resources=[snapshot.id], Tags=[{"Key": tags.REASON, "Value": weird}])
    stray = client.create_volume(AvailabilityZone="us-east-1a", Size=1)["VolumeId"]
    client.create_tags(Resources=[stray], Tags=[{"Key": tags.NAME, "Value": weird}])
    client.run_instances(
        ImageId="ami-12c6146b",
        InstanceType="t3.micro",
        MinCount=1,
        MaxCount=1,
        TagSpecifications=[
            {"ResourceType": "instance", "Tags": [{"Key": tags.NAME, "Value": weird}]}
        ],
    )
    for args in (("ls",), ("snapshots", "work"), ("status",)):
        shown = run(*args, env={"COLUMNS": "300"})  # one line per row
        assert shown.exit_code == 0, (args, shown.output)
        assert "\u009b" not in shown.stdout, args
        assert "[/]evil[bold]\\x9b2J" in shown.stdout, (args, shown.stdout)  # as text


def test_ls_and_snapshots_show_each_drive_newest_state(aws_env: Sandbox, ec2: Ec2) -> None:
    volume = make_volume(ec2, "work", "us-east-1b", generation=1)
    first = make_snapshot(ec2, volume)
    second = make_snapshot(ec2, volume, generation=2)
    unsaved = make_volume(ec2, "work", "us-east-1c", generation=3)  # newer than both finals
    only_snapshot = make_snapshot(ec2, make_volume(ec2, "scratch", generation=4))
    ec2.delete_volume(only_snapshot.volume_id)

    drives = {d["name"]: d for d in ok_json("ls")}
    assert set(drives) == {"work", "scratch"}
    work = drives["work"]
    assert (work["newest"], work["newest_kind"], work["saved"]) == (unsaved.id, "volume", False)
    assert (work["generation"], work["zone"], work["snapshots"], work["volumes"]) == (
        3,
        "us-east-1c",
        2,
        2,
    )
    scratch = drives["scratch"]
    assert (scratch["newest"], scratch["saved"], scratch["zone"]) == (only_snapshot.id, True, None)

    rows = ok_json("snapshots", "work")
    assert [r["id"] for r in rows] == [first.id, second.id]
    assert [r["generation"] for r in rows] == [1, 2]
    assert not any(r["newest"] for r in rows)  # the newest state is the unsaved volume
    table = run("ls")
    assert table.exit_code == 0 and "scratch" in table.stdout and "work" in table.stdout
    assert "no drive named 'nothing'" in one_line_error(run("snapshots", "nothing"))


def test_status_shows_instances_and_what_ec2_says_of_their_agents(
    aws_env: Sandbox, ec2: Ec2
) -> None:
    iid = launch_instance()
    (row,) = ok_json("status")["instances"]
    assert (row["drive"], row["instance_id"], row["state"], row["lifecycle"]) == (
        "work",
        iid,
        "running",
        "spot",
    )
    assert row["agent"] == "no drive attached yet" and row["volume"] is None
    # The agent restores the drive: a volume of it attached to the instance.
    volume = make_volume(ec2, "work", instance(aws_env, iid)["Placement"]["AvailabilityZone"])
    ec2.attach_volume(volume.id, iid, "/dev/sdf")
    ec2.wait_attached(volume.id, iid)
    (row,) = ok_json("status", "work")["instances"]
    assert row["volume"] == volume.id
    assert row["agent"].startswith(f"drive: {volume.id}")
    # Stopped: terminated instances are listed with --all only.
    assert ok_json("stop", "work")["terminated"] == [iid]
    assert [r["instance_id"] for r in ok_json("status", "--all")["instances"]] == [iid]


# --- save ----------------------------------------------------------------------------------------


def test_save_snapshots_a_volume_left_unsaved(aws_env: Sandbox, ec2: Ec2) -> None:
    left = make_volume(ec2, "work", "us-east-1b", generation=2)
    result = ok_json("save", "work", "--wait")
    (made,) = result["snapshots"]
    snap = ec2.snapshot(made["id"])
    assert snap is not None and snap.state == "completed"
    assert (snap.kind, snap.source_volume, snap.generation) == ("final", left.id, 2)
    assert snap.tags[tags.REASON] == "manual"
    # Saved now: a second save makes nothing.
    again = ok_json("save", "work")
    assert again["snapshots"] == [] and "already saved" in again["notes"][0]
    assert snapshot_ids(ec2, "work") == {made["id"]}


def test_save_refuses_a_volume_a_live_instance_holds(aws_env: Sandbox, ec2: Ec2) -> None:
    iid = launch_instance()
    zone = instance(aws_env, iid)["Placement"]["AvailabilityZone"]
    held = make_volume(ec2, "work", zone)
    ec2.attach_volume(held.id, iid, "/dev/sdf")
    ec2.wait_attached(held.id, iid)
    assert "whose agent saves it" in one_line_error(run("save", "work"))
    assert snapshot_ids(ec2, "work") == set()
    assert "no drive named" in one_line_error(run("save", "other"))


# --- prune ---------------------------------------------------------------------------------------


def test_prune_keeps_newest_and_what_a_leftover_volume_needs(aws_env: Sandbox, ec2: Ec2) -> None:
    gone = make_volume(ec2, "work", generation=1)
    old = [make_snapshot(ec2, gone, generation=g) for g in (1, 2, 3)]
    newest = make_snapshot(ec2, gone, generation=5)
    ec2.delete_volume(gone.id)
    leftover = make_volume(ec2, "work", "us-east-1b", generation=4)
    saves_leftover = make_snapshot(ec2, leftover)  # final of generation 4, from the leftover

    plan = ok_json("prune", "work", "--keep", "1", "--dry-run")
    assert {d["snapshot"]["id"] for d in plan["plan"]["decisions"] if d["delete"]} == {
        s.id for s in old
    }
    assert snapshot_ids(ec2, "work") == {s.id for s in [*old, newest, saves_leftover]}

    result = ok_json("prune", "work", "--keep", "1")
    assert set(result["deleted"]) == {s.id for s in old}
    assert snapshot_ids(ec2, "work") == {newest.id, saves_leftover.id}
    # Nothing more to prune, whatever keep says.
    assert ok_json("prune", "work", "--keep", "1")["deleted"] == []
    assert "keep at least 1" in one_line_error(run("prune", "work", "--keep", "0"))


def test_prune_never_cuts_a_pending_save(aws_env: Sandbox, ec2: Ec2) -> None:
    volume = make_volume(ec2, "work", generation=1)
    first = make_snapshot(ec2, volume)
    completed = make_snapshot(ec2, volume, generation=2)
    aws_env.fidelity.set_latencies(Latencies(snapshot=300.0))  # pending for the whole test
    pending = make_snapshot(ec2, volume, generation=3)
    seen = ec2.snapshot(pending.id)
    assert seen is not None and seen.state == "pending"
    result = ok_json("prune", "work", "--keep", "1")
    assert result["deleted"] == [first.id]
    assert snapshot_ids(ec2, "work") == {completed.id, pending.id}


# --- rm ------------------------------------------------------------------------------------------


def test_rm_asks_first_and_removes_everything_on_yes(aws_env: Sandbox, ec2: Ec2) -> None:
    volume = make_volume(ec2, "work")
    make_snapshot(ec2, volume)
    make_snapshot(ec2, volume, generation=2)
    other = make_snapshot(ec2, make_volume(ec2, "other"))
    before = inventory(aws_env)

    answered_no = run("rm", "work", input="n\n")
    assert answered_no.exit_code == 1
    assert "delete drive work: 1 volume(s), 2 snapshot(s)?" in answered_no.stderr
    assert "nothing was deleted" in answered_no.stderr
    assert inventory(aws_env) == before

    answered_yes = run("rm", "work", input="y\n")
    assert answered_yes.exit_code == 0, answered_yes.output
    assert ec2.drive_volumes("work") == () and ec2.drive_snapshots("work") == ()
    assert snapshot_ids(ec2, "other") == {other.id}  # another drive is untouched
    assert "no drive named 'work'" in one_line_error(run("rm", "work", "--yes"))


def test_rm_refuses_while_an_instance_holds_the_drive(aws_env: Sandbox, ec2: Ec2) -> None:
    make_snapshot(ec2, make_volume(ec2, "work"))
    launch_instance()
    before = inventory(aws_env)
    assert "in use by" in one_line_error(run("rm", "work", "--yes"))
    assert inventory(aws_env) == before
    ok_json("stop", "work")
    assert ok_json("rm", "work", "--yes")["deleted_snapshots"]
    assert ec2.drive_snapshots("work") == () and ec2.drive_volumes("work") == ()


# --- prices, userdata, iam-policy ---------------------------------------------------------


def test_prices_per_offered_zone(aws_env: Sandbox) -> None:
    report = ok_json("prices", "m5.large")
    zones = [z["availability_zone"] for z in report["zones"]]
    assert zones == sorted(zones) and len(zones) >= 3
    assert all(z["price"] is not None for z in report["zones"])
    assert report["cheapest"] in zones
    assert "unknown instance type" in one_line_error(run("prices", "m5.huge"))


def test_userdata_for_both_distros_installs_the_same_agent(
    aws_env: Sandbox, tmp_path: Path
) -> None:
    agents = {}
    texts = {}
    for distro in ("al2023", "ubuntu"):
        result = run("userdata", "work", "--distro", distro)
        assert result.exit_code == 0, result.output
        text = result.stdout
        assert text.startswith("#cloud-config\n") and '"drive": "work"' in text
        assert len(text.encode()) < 16384
        assert f"xdrive {__version__}:" in text
        if cloud_init_available():
            cloud_init_says_valid(text, tmp_path)
        texts[distro] = text
        agents[distro] = agent_in(text)
    assert "dnf install" in texts["al2023"] and "apt-get install" in texts["ubuntu"]
    # The same archive (URL and sha256) for both, uploaded where the user-data says.
    assert agents["al2023"] == agents["ubuntu"]
    bucket, key, sha256 = agents["al2023"]
    assert bucket == f"xdrive-agent-{ACCOUNT}-{REGION}"
    assert key == f"xdrive/agent/{__version__}/{sha256}.tar.gz"
    body = aws_env.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()
    assert hashlib.sha256(body).hexdigest() == sha256
    gz = tmp_path / "user-data.gz"
    assert run("userdata", "work", "--gzip", "-o", str(gz)).exit_code == 0
    assert gz.read_bytes()[:2] == b"\x1f\x8b"


def agent_in(text: str) -> tuple[str, str, str]:
    """(bucket, key, sha256) of the agent archive the user-data installs."""
    match = re.search(r"s3://([a-z0-9.-]+)/(xdrive/agent/[^\s\"']+\.tar\.gz)", text)
    assert match, "no s3:// agent URL in the user-data"
    sha256 = re.search(r"[0-9a-f]{64}", match.group(2))
    assert sha256 and f'"agent_sha256": "{sha256.group(0)}"' in text
    return match.group(1), match.group(2), sha256.group(0)


def test_userdata_with_a_given_url_needs_no_aws(tmp_path: Path) -> None:
    env = {
        "AWS_ACCESS_KEY_ID": None,
        "AWS_SECRET_ACCESS_KEY": None,
        "AWS_REGION": None,
        "AWS_DEFAULT_REGION": None,
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",  # nothing listens: no call may be made
    }
    url = "https://downloads.example.com/xdrive-agent.tar.gz"
    result = run("userdata", "work", "--agent-url", url, "--agent-sha256", "ab" * 32, env=env)
    assert result.exit_code == 0, result.output
    assert url in result.stdout
    assert "go together" in one_line_error(run("userdata", "work", "--agent-url", url, env=env))


def test_iam_policy_prints_both_roles_or_one_scoped_to_a_drive() -> None:
    """(That each policy is exactly what its caller uses: tests/test_iam_*_policy.py.)"""
    printed = run("iam-policy")
    assert printed.exit_code == 0
    documents = json.loads(printed.stdout)
    assert set(documents) == {"agent", "launcher"}
    agent_only = json.loads(run("iam-policy", "--role", "agent", "--drive", "work").stdout)
    assert agent_only["Version"] == "2012-10-17" and "work" in json.dumps(agent_only)


@pytest.mark.parametrize("command", ["ls", "status", "save", "prune", "rm", "stop", "snapshots"])
def test_every_command_has_help_with_an_example(command: str) -> None:
    result = run(command, "--help")
    assert result.exit_code == 0 and "Example" in result.stdout
