"""Where a drive can go, and the cheapest zone there. Pure.

A snapshot can be restored in any zone of the region; a volume cannot move. So when the
drive's newest state is only on a volume (not saved by a completed final snapshot), the
instance goes to that volume's zone: elsewhere the agent would first have to snapshot and
restore it. When the newest state is in a snapshot (or the drive is new), any zone will do;
a saved volume's zone is preferred on a tie, since the agent reattaches it there instead of
restoring a lazily loaded copy.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Optional

from xdrive.agent.plan import is_saved, newest_state
from xdrive.ec2 import Snapshot, Volume
from xdrive.errors import ConfigError
from xdrive.launcher.prices import ZonePrice


@dataclass(frozen=True)
class DrivePlacement:
    zones: Optional[tuple[str, ...]]  # None: any zone of the region
    reason: str
    preferred: Optional[str] = None  # a saved volume's zone: reattached, no lazy loading


@dataclass(frozen=True)
class ZoneChoice:
    zone: str
    price: Optional[float]  # the spot price there; None on demand
    candidates: tuple[ZonePrice, ...]  # every zone considered, with its price
    reason: str


def drive_placement(volumes: Iterable[Volume], snapshots: Iterable[Snapshot]) -> DrivePlacement:
    """The zones drive state allows (see the module's docstring)."""
    snaps = tuple(snapshots)
    newest = newest_state(volumes, snaps)
    if newest is None:
        return DrivePlacement(None, "new drive: any zone")
    volume = newest.volume
    if volume is None:
        assert newest.snapshot is not None
        return DrivePlacement(
            None, f"newest state is snapshot {newest.snapshot.id}: it restores in any zone"
        )
    if not is_saved(volume, snaps):
        zone = volume.availability_zone
        return DrivePlacement(
            (zone,),
            f"newest state is unsaved volume {volume.id} in {zone}: the instance goes there",
            preferred=zone,
        )
    return DrivePlacement(
        None,
        f"newest state is volume {volume.id}, saved: any zone "
        f"({volume.availability_zone} reattaches it)",
        preferred=volume.availability_zone,
    )


def choose_zone(
    name: str,
    placement: DrivePlacement,
    region_zones: Iterable[str],
    usable_zones: Iterable[str],
    spot_prices: Optional[Mapping[str, float]],
    max_price: Optional[float] = None,
) -> ZoneChoice:
    """The zone to launch in: the cheapest spot price among the zones the drive can go to
    that are also ``usable`` (instance type offered, a subnet there). ``spot_prices`` None
    means on demand: the preferred zone, else the first.
    """
    allowed = set(placement.zones) if placement.zones is not None else set(region_zones)
    candidates = sorted(allowed & set(usable_zones))
    if not candidates:
        where = ", ".join(sorted(allowed)) or "none"
        fix = "choose another instance type or subnet"
        if placement.zones is not None:
            fix = f"run `xdrive save {name}` so the drive can go to any zone, or " + fix
        raise ConfigError(
            f"no usable zone for drive {name}: it can go to {where}, but the instance type "
            "is not offered or there is no subnet there",
            fix,
        )
    if spot_prices is None:
        zone = placement.preferred if placement.preferred in candidates else candidates[0]
        table = tuple(ZonePrice(z, None) for z in candidates)
        return ZoneChoice(zone, None, table, f"on demand; {placement.reason}")
    table = tuple(ZonePrice(z, spot_prices.get(z)) for z in candidates)
    priced = [p for p in table if p.price is not None]
    if not priced:
        raise ConfigError(
            f"no spot price is known in {', '.join(candidates)}",
            "try another instance type, or launch with --on-demand",
        )
    best = min(
        priced,
        key=lambda p: (p.price, p.availability_zone != placement.preferred, p.availability_zone),
    )
    assert best.price is not None
    if max_price is not None and best.price > max_price:
        raise ConfigError(
            f"the cheapest spot price is {best.price:.4f} USD/h in {best.availability_zone}, "
            f"above --max-price {max_price:.4f}",
            "raise --max-price, choose another instance type, or launch with --on-demand",
        )
    return ZoneChoice(
        best.availability_zone,
        best.price,
        table,
        f"cheapest spot price of {len(priced)} zone(s); {placement.reason}",
    )
