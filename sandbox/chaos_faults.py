"""Timed fault windows for one life of a chaos cycle: EC2 throttling and IMDS trouble.

Windows start relative to ``start()`` (when the life's agents start). At each window edge
the scheduler recomputes what is active and sets it on the fidelity middleware and on the
life's IMDS servers; ``stop()`` clears everything.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

from xdrive.sandbox.chaos_plan import ImdsTrouble, ThrottleBurst
from xdrive.sandbox.fidelity import Ec2Fidelity
from xdrive.sandbox.imds import ImdsFaults, ImdsServer
from xdrive.sandbox.settings import Faults


def throttle_at(bursts: Sequence[ThrottleBurst], t: float, seed: int) -> Faults:
    rates = [b.rate for b in bursts if b.start_s <= t < b.start_s + b.duration_s]
    return Faults(throttle_rate=max(rates), seed=seed) if rates else Faults()


def imds_at(troubles: Sequence[ImdsTrouble], t: float, seed: int) -> ImdsFaults:
    active = [x for x in troubles if x.start_s <= t < x.start_s + x.duration_s]
    return ImdsFaults(
        error_rate=max([x.amount for x in active if x.kind == "500s"], default=0.0),
        delay_s=max([x.amount for x in active if x.kind == "slow"], default=0.0),
        fail_next_reads_with_401=int(sum(x.amount for x in active if x.kind == "401s")),
        seed=seed,
    )


class FaultScheduler:
    def __init__(
        self,
        fidelity: Ec2Fidelity,
        imds: Sequence[ImdsServer],
        throttle: Sequence[ThrottleBurst],
        troubles: Sequence[ImdsTrouble],
        seed: int,
    ) -> None:
        self.fidelity = fidelity
        self.imds = list(imds)
        self.throttle = tuple(throttle)
        self.troubles = tuple(troubles)
        self.seed = seed
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="chaos-faults", daemon=True)
        edges = {0.0}
        for start, length in [(w.start_s, w.duration_s) for w in self.throttle] + [
            (w.start_s, w.duration_s) for w in self.troubles
        ]:
            edges.update((start, start + length))
        self._edges = sorted(edges)

    def start(self) -> None:
        if self.throttle or self.troubles:
            self._thread.start()

    def _run(self) -> None:
        t0 = time.monotonic()
        for n, edge in enumerate(self._edges):
            if self._stop.wait(max(0.0, t0 + edge - time.monotonic())):
                return
            self.fidelity.set_faults(throttle_at(self.throttle, edge, self.seed + n))
            faults = imds_at(self.troubles, edge, self.seed + n)
            for server in self.imds:
                server.set_faults(faults)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.fidelity.set_faults(Faults())
        for server in self.imds:
            server.clear_faults()
