"""Spot prices per availability zone, from a source the caller chooses.

The launcher reads EC2's spot price history (``Ec2PriceSource``). Tests and demos pass a
``FixedPrices`` table instead: the sandbox's price history is one constant for every zone,
so it cannot show that the cheapest zone wins.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Optional, Protocol

from xdrive.ec2 import Ec2


@dataclass(frozen=True)
class ZonePrice:
    availability_zone: str
    price: Optional[float]  # USD per hour; None: no spot price known there


class PriceSource(Protocol):
    def spot_prices(self, instance_type: str) -> Mapping[str, float]:
        """Current spot price (USD/hour) of ``instance_type`` by availability zone."""
        ...


class Ec2PriceSource:
    """EC2's spot price history: the price in effect now, per zone."""

    def __init__(self, ec2: Ec2) -> None:
        self._ec2 = ec2

    def spot_prices(self, instance_type: str) -> Mapping[str, float]:
        return {p.availability_zone: p.price for p in self._ec2.spot_prices(instance_type)}


@dataclass(frozen=True)
class FixedPrices:
    """A price table: ``{instance_type: {zone: price}}``; other types have no prices."""

    table: Mapping[str, Mapping[str, float]]

    def spot_prices(self, instance_type: str) -> Mapping[str, float]:
        return dict(self.table.get(instance_type, {}))


def price_table(
    source: PriceSource, instance_type: str, zones: tuple[str, ...]
) -> tuple[ZonePrice, ...]:
    """The price in each of ``zones`` (None where the source has none), by zone."""
    prices = source.spot_prices(instance_type)
    return tuple(ZonePrice(z, prices.get(z)) for z in sorted(zones))
