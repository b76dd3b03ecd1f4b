"""How the CLI shows results: rich tables for people, ``--json`` for scripts, progress on
stderr (a spinner on a terminal, one line per step otherwise)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Optional

from rich.console import Console
from rich.table import Table

from xdrive.launcher.drives import DriveSummary, SnapshotRow
from xdrive.launcher.launch import LaunchResult
from xdrive.launcher.manage import (
    PriceReport,
    PruneResult,
    RemovalPlan,
    RemovalResult,
    SaveResult,
    StatusReport,
    StopResult,
)


def jsonable(value: Any) -> Any:
    """Dataclasses, tuples, mappings and times as plain JSON values; bytes as their size."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        result = {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
        for name in ("userdata_bytes",):
            if hasattr(value, name):
                result[name] = getattr(value, name)
        return result
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    return value


def dumps(value: Any) -> str:
    return json.dumps(jsonable(value), indent=2, sort_keys=True)


class Output:
    """Where a command writes: ``console`` (stdout) and ``errors`` (stderr)."""

    def __init__(self, json_mode: bool = False, console: Optional[Console] = None) -> None:
        self.json_mode = json_mode
        # No markup: names, reasons and ids come from AWS tags, which anyone can write.
        self.console = console or Console(soft_wrap=True, markup=False)
        self.errors = Console(stderr=True, markup=False)

    def json(self, value: Any) -> None:
        # Plain print: rich would wrap and colour the text.
        print(dumps(value))

    def line(self, text: str) -> None:
        self.console.print(plain(text), highlight=False)

    @contextmanager
    def progress(self) -> Iterator[Callable[[str], None]]:
        """A callback for progress text: a spinner on a terminal, else one line per step."""
        if self.errors.is_terminal:
            with self.errors.status("working...") as status:
                yield status.update
            return
        last: list[str] = []

        def say(text: str) -> None:
            if not last or last[-1] != text:
                last.append(text)
                self.errors.print(f"... {plain(text)}", highlight=False)

        yield say


def _money(price: Optional[float]) -> str:
    return "-" if price is None else f"{price:.5f}"


def _when(value: Optional[datetime]) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else "-"


def _text(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


def plain(value: str) -> str:
    """``value`` with control characters shown escaped: a tag value must not drive the
    terminal (escape sequences) any more than the markup (see Output)."""
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value
    )


def add_row(table: Table, *cells: str) -> None:
    table.add_row(*(plain(cell) for cell in cells))


def launch_table(result: LaunchResult) -> Table:
    plan = result.plan
    title = "launch plan (dry run: nothing was created)" if result.dry_run else "launched"
    profile = "created" if result.created_profile else plan.profile.status
    agent = "uploaded" if result.uploaded_agent else ("in S3" if plan.agent_in_s3 else "to upload")
    table = Table(title=title, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    rows: list[tuple[str, str]] = [
        ("drive", plan.drive),
        ("region", plan.region),
        ("mode", plan.mode),
        ("instance type", f"{plan.instance_type} ({plan.market})"),
        ("image", f"{plan.image.image_id} ({plan.image.source})"),
        ("placement", plan.placement.reason),
        ("zone", plan.zone or ", ".join(s.availability_zone for s in plan.subnets)),
        ("spot price", _money(plan.price) + (" USD/h" if plan.price is not None else "")),
        ("max price", _money(plan.max_price)),
        ("subnets", ", ".join(s.id for s in plan.subnets)),
        ("instance profile", f"{plan.profile.name} ({profile})"),
        ("agent", f"{plan.agent.url} ({agent})"),
        ("user-data", f"{plan.userdata_bytes} bytes (gzip)"),
    ]
    if plan.group:
        rows.append(("auto scaling group", plan.group))
    if result.instance is not None:
        rows.append(("instance", f"{result.instance.id} ({result.instance.state})"))
    if result.group is not None:
        rows.append(("group instances", ", ".join(result.group.instances) or "starting"))
    for key, value in rows:
        add_row(table, key, value)
    return table


def zone_table(zones: tuple[Any, ...], chosen: Optional[str], title: str = "zones") -> Table:
    table = Table(title=title)
    table.add_column("zone")
    table.add_column("spot USD/h", justify="right")
    table.add_column("")
    for zone in zones:
        add_row(
            table,
            zone.availability_zone,
            _money(zone.price),
            "<- cheapest" if zone.availability_zone == chosen else "",
        )
    return table


def drives_table(drives: tuple[DriveSummary, ...]) -> Table:
    table = Table(title="drives")
    for column in (
        "drive",
        "newest state",
        "gen",
        "size GiB",
        "zone",
        "snapshots",
        "volumes",
        "instances",
    ):
        table.add_column(column)
    for d in drives:
        add_row(
            table,
            d.name,
            d.newest_description,
            _text(d.generation),
            _text(d.size_gib),
            d.zone or "any",
            str(d.snapshots),
            str(d.volumes),
            ", ".join(d.instances) or "-",
        )
    return table


def snapshots_table(name: str, rows: tuple[SnapshotRow, ...]) -> Table:
    table = Table(title=f"snapshots of {name} (oldest first; * newest state)")
    for column in (
        "",
        "snapshot",
        "gen",
        "kind",
        "state",
        "reason",
        "from volume",
        "instance",
        "started",
        "GiB",
    ):
        table.add_column(column)
    for r in rows:
        state = r.state if r.state == "completed" else f"{r.state} {r.progress}%"
        add_row(
            table,
            "*" if r.newest else "",
            r.id,
            str(r.generation),
            r.kind,
            state,
            _text(r.reason),
            r.source_volume,
            _text(r.instance),
            _when(r.started),
            str(r.size_gib),
        )
    return table


def save_lines(result: SaveResult) -> list[str]:
    lines = [
        f"saving {s.source_volume} as {s.id} ({s.state}): "
        f"`xdrive snapshots {result.drive}` shows it"
        for s in result.snapshots
    ]
    lines += list(result.notes)
    if not result.snapshots:
        lines.append("nothing to save")
    return lines


def prune_table(result: PruneResult) -> Table:
    plan = result.plan
    verb = "would delete" if result.dry_run else "deleted"
    table = Table(
        title=f"prune {plan.drive} --keep {plan.keep}" + (" (dry run)" if result.dry_run else "")
    )
    for column in ("snapshot", "gen", "kind", "state", "action", "why"):
        table.add_column(column)
    for d in plan.decisions:
        s = d.snapshot
        add_row(
            table, s.id, str(s.generation), s.kind, s.state, verb if d.delete else "keep", d.why
        )
    return table


def removal_summary(plan: RemovalPlan) -> str:
    parts = [f"{len(plan.volumes)} volume(s)", f"{len(plan.snapshots)} snapshot(s)"]
    if plan.template:
        parts.append(f"launch template {plan.template}")
    return f"drive {plan.drive}: " + ", ".join(parts)


def removal_lines(result: RemovalResult) -> list[str]:
    return [f"removed {removal_summary(result.plan)}"]


def prices_table(report: PriceReport) -> Table:
    return zone_table(
        report.zones, report.cheapest, f"spot prices of {report.instance_type} in {report.region}"
    )


def status_tables(report: StatusReport) -> list[Table]:
    table = Table(title="instances")
    for column in (
        "drive",
        "instance",
        "state",
        "type",
        "market",
        "zone",
        "launched",
        "agent (from EC2)",
        "auto-resume",
    ):
        table.add_column(column)
    for r in report.instances:
        add_row(
            table,
            r.drive,
            r.instance_id,
            r.state,
            _text(r.instance_type),
            _text(r.lifecycle),
            _text(r.zone),
            _when(r.launched),
            r.agent,
            _text(r.auto_resume),
        )
    tables = [table]
    if report.groups:
        groups = Table(title="auto-resume groups")
        for column in ("group", "drive", "desired", "instances", "zones", "status"):
            groups.add_column(column)
        for g in report.groups:
            add_row(
                groups,
                g.name,
                _text(g.drive),
                f"{g.desired} ({g.min_size}..{g.max_size})",
                ", ".join(g.instances) or "-",
                ", ".join(g.zones),
                _text(g.status),
            )
        tables.append(groups)
    return tables


def stop_lines(result: StopResult) -> list[str]:
    lines = []
    if result.group_deleted:
        lines.append(f"auto-resume of {result.drive} ended (group and launch template deleted)")
    if result.terminated:
        lines.append(f"terminating {', '.join(result.terminated)}: the agent saves the drive")
    else:
        lines.append(f"no instance holds drive {result.drive}")
    lines.append(f"newest state: {result.newest}")
    return lines
