"""How slow and how unreliable the sandbox's EC2 is: latencies and injected faults.

Both are frozen values; the middleware holds the current ones and tests swap them between
calls (``Ec2Fidelity.set_latencies`` / ``set_faults``). A change applies to requests made
after it: a snapshot already pending keeps the completion time it was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Latencies:
    """Seconds each EC2 state change takes. All 0 by default so tests stay fast."""

    volume_create: float = 0.0  # CreateVolume: `creating` until this passes
    attach: float = 0.0  # AttachVolume: `attaching` until this passes
    device_appear: float = 0.0  # after `attached`: until the block device shows up
    detach: float = 0.0  # DetachVolume: `detaching` at least this long (and until unmounted)
    snapshot: float = 0.0  # CreateSnapshot: `pending`, progress growing linearly to 100%
    terminate_detach: float = 0.0  # TerminateInstances: until EC2 frees the attached volumes

    def __post_init__(self) -> None:
        for name, value in self.__dict__.items():
            if value < 0:
                raise ValueError(f"latency {name} must be >= 0, got {value}")


@dataclass(frozen=True)
class Faults:
    """Injected failures, answered the way EC2 answers them."""

    throttle_rate: float = 0.0  # probability of RequestLimitExceeded (HTTP 503) per EC2 request
    deny_actions: frozenset[str] = field(default_factory=frozenset)  # -> UnauthorizedOperation
    seed: int = 0  # the throttling dice are seeded so a failing run can be replayed

    def __post_init__(self) -> None:
        if not 0.0 <= self.throttle_rate <= 1.0:
            raise ValueError(f"throttle_rate must be within 0..1, got {self.throttle_rate}")
        # Accept any iterable of names (a set, a list) but keep the value hashable and frozen.
        object.__setattr__(self, "deny_actions", frozenset(self.deny_actions))
