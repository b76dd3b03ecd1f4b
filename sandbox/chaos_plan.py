"""What one chaos cycle does, decided up front from its seed. Pure: seed -> CyclePlan.

Every random choice of a cycle lives here, so a seed names a scenario that can be printed,
read and replayed. Timing still varies between runs (processes, threads), so a replay
reproduces the scenario, not every interleaving; a failing seed usually fails again.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal, Optional

from xdrive.sandbox.settings import Latencies

ZONES = ("us-east-1a", "us-east-1b", "us-east-1c")

KillPhase = Literal["boot", "ready", "save"]
AfterKill = Literal["restart", "crash"]
EndKind = Literal["notice", "stop", "crash"]
AtDeadline = Literal["graceful", "hard"]
ImdsTroubleKind = Literal["500s", "401s", "slow"]
RacerFate = Literal["terminate", "standby"]

# STATUS lines the agent sends at each step (agent/boot.py, agent/save.py): a kill right
# after one lands the SIGKILL at that step.
BOOT_STEPS = (
    r"^newest state is",
    r"^creating vol-",
    r"^attaching vol-",
    r"^waiting for snap-",
    r"^saving vol-\S+ from ",  # migration: the unsaved volume from another zone
    r"^formatting new empty",
    r"^growing the filesystem",
    r"^mounted ",  # READY: the drive is mounted, watch not yet started
)
SAVE_STEPS = (
    r"^saving vol-\S+ \(",  # STOPPING: the save begins
    r"^requested snap-",
    r"^detached vol-",
    r"^saved vol-",
)


@dataclass(frozen=True)
class Kill:
    """SIGKILL the agent (and its children, as systemd kills the unit's cgroup).

    ``on_status``: a regex of the STATUS line after which to kill; None: ``delay_s`` after
    the phase began. ``then``: systemd restarts the agent, or the instance dies right there.
    """

    phase: KillPhase
    on_status: Optional[str]
    delay_s: float
    then: AfterKill = "restart"
    # Killed inside a checkpoint, between `fsfreeze -f` and `-u`: the harness freezes the
    # drive itself right before the kill, since no STATUS line marks that window.
    frozen: bool = False

    def describe(self) -> str:
        when = f"on STATUS /{self.on_status}/" if self.on_status else f"{self.delay_s:.2f} s in"
        inside = " inside a checkpoint (drive frozen)" if self.frozen else ""
        return f"kill during {self.phase}{inside} {when}, then {self.then}"


@dataclass(frozen=True)
class ThrottleBurst:
    """RequestLimitExceeded on ``rate`` of EC2 requests for a while."""

    start_s: float
    duration_s: float
    rate: float


@dataclass(frozen=True)
class ImdsTrouble:
    """IMDS misbehaving for a while: 500s (rate), 401s with a valid token, slow answers."""

    start_s: float
    duration_s: float
    kind: ImdsTroubleKind
    amount: float  # error rate; number of 401s; seconds of delay


@dataclass(frozen=True)
class LifePlan:
    """One instance's life with the drive: boot, work, end."""

    index: int
    zone: Optional[str]  # None: the standby racer of the previous life carries on
    size_gib: int
    latencies: Latencies
    racer_zone: Optional[str]  # a second instance started at the same moment
    racer_fate: RacerFate
    boot_kills: tuple[Kill, ...]
    notice_during_boot_s: Optional[float]
    throttle: tuple[ThrottleBurst, ...]
    imds: tuple[ImdsTrouble, ...]
    write_s: float
    rebalance: bool
    ready_kill: Optional[Kill]
    end: EndKind
    notice_lead_s: float
    save_kills: tuple[Kill, ...]
    at_deadline: AtDeadline
    restart_delay_s: float

    def describe(self) -> str:
        parts = [f"life {self.index}: " + (f"in {self.zone}" if self.zone else "the standby")]
        parts.append(f"{self.size_gib} GiB")
        if self.latencies != Latencies():
            parts.append(f"latencies {_short(self.latencies)}")
        if self.racer_zone:
            parts.append(f"racer in {self.racer_zone} ({self.racer_fate})")
        parts += [k.describe() for k in self.boot_kills]
        if self.notice_during_boot_s is not None:
            parts.append(f"notice {self.notice_during_boot_s:.2f} s into the boot")
        parts += [
            f"throttle {b.rate:.0%} at {b.start_s:.1f}+{b.duration_s:.1f} s" for b in self.throttle
        ]
        parts += [
            f"IMDS {t.kind} ({t.amount:g}) at {t.start_s:.1f}+{t.duration_s:.1f} s"
            for t in self.imds
        ]
        parts.append(f"write {self.write_s:.1f} s")
        if self.rebalance:
            parts.append("rebalance")
        if self.ready_kill:
            parts.append(self.ready_kill.describe())
        end: str = self.end
        if end == "notice":
            end += f" ({self.notice_lead_s:.0f} s, then {self.at_deadline})"
        parts.append(f"end: {end}")
        parts += [k.describe() for k in self.save_kills]
        return "; ".join(parts)


@dataclass(frozen=True)
class CyclePlan:
    seed: int
    drive: str
    lives: tuple[LifePlan, ...]  # the last one is calm: it checks and saves cleanly

    def describe(self) -> str:
        return "\n".join(f"  {life.describe()}" for life in self.lives)


def _short(lat: Latencies) -> str:
    return ",".join(f"{k}={v:g}" for k, v in lat.__dict__.items() if v)


def plan_cycle(seed: int, lives: Optional[int] = None) -> CyclePlan:
    """The scenario of cycle ``seed``: 2-4 chaotic lives, then a calm one that checks."""
    rng = random.Random(seed)
    count = lives if lives is not None else rng.randint(2, 4)
    plans: list[LifePlan] = []
    size = 1
    standby = False
    for i in range(count):
        life = _chaotic_life(rng, i, size, standby)
        plans.append(life)
        size = life.size_gib
        standby = life.racer_zone is not None and life.racer_fate == "standby"
    plans.append(_calm_life(rng, count, size, standby))
    return CyclePlan(seed=seed, drive=f"chaos-{seed}", lives=tuple(plans))


def _latencies(rng: random.Random) -> Latencies:
    if rng.random() < 0.3:
        return Latencies()
    return Latencies(
        volume_create=round(rng.uniform(0, 1.5), 2),
        attach=round(rng.uniform(0, 1.0), 2),
        device_appear=round(rng.uniform(0, 0.8), 2),
        detach=round(rng.uniform(0, 1.0), 2),
        snapshot=round(rng.uniform(0.2, 4.0), 2),
        terminate_detach=round(rng.uniform(0, 2.0), 2),
    )


def _chaotic_life(rng: random.Random, index: int, size: int, standby: bool) -> LifePlan:
    zone = None if standby else rng.choice(ZONES)
    racer = not standby and rng.random() < 0.25
    boot_kills: list[Kill] = []
    if not racer and not standby:  # a racer's winner is known only at run time
        for _ in range(rng.choice((0, 0, 1, 1, 2))):
            if rng.random() < 0.6:
                boot_kills.append(Kill("boot", rng.choice(BOOT_STEPS), 0.0))
            else:
                boot_kills.append(Kill("boot", None, round(rng.uniform(0.0, 2.0), 2)))
    early_notice = round(rng.uniform(0, 2.0), 2) if rng.random() < 0.15 else None
    end: EndKind = rng.choices(("notice", "stop", "crash"), weights=(5, 2, 3))[0]
    save_kills: list[Kill] = []
    if end != "crash" and rng.random() < 0.5:
        # After a stop (shutdown) systemd does not restart a killed agent: the machine goes.
        then: AfterKill = "crash" if end == "stop" else rng.choice(("restart", "crash"))
        if rng.random() < 0.6:
            save_kills.append(Kill("save", rng.choice(SAVE_STEPS), 0.0, then))
        else:
            save_kills.append(Kill("save", None, round(rng.uniform(0.0, 1.5), 2), then))
    ready_kill = None
    if rng.random() < 0.2:
        delay = round(rng.uniform(0.0, 1.5), 2)
        ready_kill = Kill("ready", None, delay, frozen=rng.random() < 0.35)
    return LifePlan(
        index=index,
        zone=zone,
        size_gib=size + (1 if rng.random() < 0.2 else 0),  # the restore grows the filesystem
        latencies=_latencies(rng),
        racer_zone=rng.choice(ZONES) if racer else None,
        racer_fate=rng.choice(("terminate", "standby")),
        boot_kills=tuple(boot_kills),
        notice_during_boot_s=early_notice if not racer else None,
        throttle=tuple(
            ThrottleBurst(
                round(rng.uniform(0, 4), 2),
                round(rng.uniform(0.3, 2.5), 2),
                rng.choice((0.2, 0.4, 0.6)),
            )
            for _ in range(rng.choice((0, 0, 1, 2)))
        ),
        imds=tuple(_imds_trouble(rng) for _ in range(rng.choice((0, 0, 1, 2)))),
        write_s=round(rng.uniform(0.5, 2.5), 2),
        rebalance=rng.random() < 0.3,
        ready_kill=ready_kill,
        end=end,
        notice_lead_s=rng.choice((3.0, 6.0, 12.0, 30.0)),
        save_kills=tuple(save_kills),
        at_deadline=rng.choice(("graceful", "hard")),
        restart_delay_s=round(rng.uniform(0.2, 1.5), 2),
    )


def _imds_trouble(rng: random.Random) -> ImdsTrouble:
    kind: ImdsTroubleKind = rng.choice(("500s", "401s", "slow"))
    amount = {"500s": rng.choice((0.3, 0.6, 1.0)), "401s": float(rng.randint(1, 6))}.get(
        kind, rng.choice((0.3, 1.0, 2.5))
    )
    return ImdsTrouble(round(rng.uniform(0, 3), 2), round(rng.uniform(0.5, 4), 2), kind, amount)


def _calm_life(rng: random.Random, index: int, size: int, standby: bool) -> LifePlan:
    """No faults: restore, check every file ever synced, stop cleanly, count leftovers."""
    return LifePlan(
        index=index,
        zone=None if standby else rng.choice(ZONES),
        size_gib=size,
        latencies=Latencies(),
        racer_zone=None,
        racer_fate="terminate",
        boot_kills=(),
        notice_during_boot_s=None,
        throttle=(),
        imds=(),
        write_s=0.3,
        rebalance=False,
        ready_kill=None,
        end="stop",
        notice_lead_s=0.0,
        save_kills=(),
        at_deadline="graceful",
        restart_delay_s=0.5,
    )
