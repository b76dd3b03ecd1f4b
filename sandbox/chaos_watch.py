"""Background checks that run through a whole chaos cycle, and the end-of-cycle audit.

- ``DeletionWatch``: every ~0.2 s, describe the drive's volumes, then the snapshots.
  A volume that vanished must be held by a *completed* final snapshot taken from it at
  (or above) the last generation seen on it. Snapshots are never deleted during chaos, and
  the snapshots are read after the volumes, so a snapshot still pending then was pending
  when the volume went: a volume deleted before its save completed is caught as long as
  the snapshot stays pending for longer than one sample (latencies make it so).
- ``WriterWatch``: every ~0.05 s, how many of the drive's volumes are mounted (block plane)
  and how many instance roots have /v1 mounted (/proc/self/mounts). Never more than one.
- ``audit_leftovers``: at the end, every volume and snapshot carries ``xdrive:name`` and
  only a few volumes are left.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from xdrive import tags
from xdrive.sandbox.blocks import BlockPlane

Invariant = Literal[
    "data",
    "deletion",
    "writers",
    "leftovers",
    "liveness",
    "race",
    "agent",
    "least privilege",
    "harness",
]
MAX_LEFTOVER_VOLUMES = 2


@dataclass(frozen=True)
class Violation:
    invariant: Invariant
    detail: str

    def __str__(self) -> str:
        return f"[{self.invariant}] {self.detail}"


def _tags(item: dict[str, Any]) -> dict[str, str]:
    return tags.from_tag_list(item.get("Tags"))


def _generation(item: dict[str, Any]) -> int:
    value = _tags(item).get(tags.GENERATION, "0")
    return int(value) if value.isdigit() else 0


class _Sampler:
    """A daemon thread calling ``sample`` every ``interval_s`` until stopped."""

    def __init__(self, name: str, interval_s: float) -> None:
        self.interval_s = interval_s
        self.violations: list[Violation] = []
        self.samples = 0
        self.errors = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
                self.samples += 1
            except Exception:  # a throttled or failed describe: skip this sample
                self.errors += 1
            self._stop.wait(self.interval_s)

    def sample(self) -> None:
        raise NotImplementedError

    def _violate(self, invariant: Invariant, detail: str) -> None:
        with self._lock:
            if len(self.violations) < 20:  # the first ones say enough
                self.violations.append(Violation(invariant, detail))

    def found(self) -> list[Violation]:
        with self._lock:
            return list(self.violations)


class DeletionWatch(_Sampler):
    """No volume disappears unless a completed final snapshot of its generation holds it.

    One exception: a volume never mounted holds nothing new. Its content is its source
    snapshot's (completed: else it could not have been created), or nothing at all; the
    agent removes such volumes when it loses a race. ``was_mounted`` says whether the
    writer watch ever saw a volume mounted.
    """

    def __init__(
        self,
        client: Any,
        drive: str,
        was_mounted: Callable[[str], bool],
        interval_s: float = 0.2,
    ) -> None:
        super().__init__("chaos-deletions", interval_s)
        self.client = client
        self.drive = drive
        self.was_mounted = was_mounted
        self.generations: dict[str, int] = {}  # volume id -> last generation seen
        self.sources: dict[str, str] = {}  # volume id -> snapshot it was created from
        self.gone: dict[str, float] = {}  # volume id -> when first seen missing
        self.unwritten: list[str] = []  # deleted, never mounted

    def sample(self) -> None:
        # Only the drive's: an instance's own root volume goes with it, as it should.
        volumes = [
            v
            for v in self.client.describe_volumes()["Volumes"]
            if v["State"] != "deleted" and _tags(v).get(tags.NAME) == self.drive
        ]
        snapshots = self.client.describe_snapshots(OwnerIds=["self"])["Snapshots"]
        now = time.monotonic()
        present = {v["VolumeId"] for v in volumes}
        for v in volumes:
            self.generations[v["VolumeId"]] = _generation(v)
            self.sources[v["VolumeId"]] = v.get("SnapshotId") or ""
        for vid, generation in self.generations.items():
            if vid in present or vid in self.gone:
                continue
            self.gone[vid] = now
            problem = self._problem(vid, generation, snapshots)
            if problem:
                self._violate("deletion", problem)

    def _problem(self, vid: str, generation: int, snapshots: list[dict[str, Any]]) -> str:
        if not self.was_mounted(vid):
            source = self.sources.get(vid)
            if not source or any(
                s["SnapshotId"] == source and s["State"] == "completed" for s in snapshots
            ):
                self.unwritten.append(vid)
                return ""
        return unsaved_deletion(vid, generation, snapshots)

    def audit(self) -> list[Violation]:
        """At the end: a final check of every volume that went (catches what sampling
        could only see as completed, when no final of its generation exists at all)."""
        self.sample()
        snapshots = self.client.describe_snapshots(OwnerIds=["self"])["Snapshots"]
        return [
            Violation("deletion", problem)
            for vid in sorted(self.gone)
            if (problem := self._problem(vid, self.generations[vid], snapshots))
            and not any(problem == v.detail for v in self.found())
        ]


def unsaved_deletion(volume_id: str, generation: int, snapshots: list[dict[str, Any]]) -> str:
    """Why deleting ``volume_id`` (last seen at ``generation``) lost data, or ''.

    A final of a *higher* generation from the same volume also holds it: the volume was
    retagged (written) after the last sample and then saved.
    """
    own = [s for s in snapshots if _tags(s).get(tags.SOURCE_VOLUME) == volume_id]
    for s in own:
        t = _tags(s)
        if (
            s["State"] == "completed"
            and t.get(tags.KIND) == tags.FINAL
            and _generation(s) >= generation
        ):
            return ""
    seen = ", ".join(
        f"{s['SnapshotId']} ({_tags(s).get(tags.KIND)}, generation {_generation(s)}, {s['State']})"
        for s in own
    )
    return (
        f"{volume_id} (generation {generation}) was deleted without a completed final "
        f"snapshot of its generation; its snapshots then: {seen or 'none'}"
    )


class WriterWatch(_Sampler):
    """At most one of the drive's volumes mounted, at most one instance with /v1 mounted."""

    def __init__(self, blocks: BlockPlane, instances_dir: Path, interval_s: float = 0.05):
        super().__init__("chaos-writers", interval_s)
        self.blocks = blocks
        self.instances_dir = instances_dir
        self.ever_mounted: set[str] = set()

    def was_mounted(self, volume_id: str) -> bool:
        with self._lock:
            return volume_id in self.ever_mounted

    def sample(self) -> None:
        mounted = [v for v in self.blocks.attached_volumes() if self.blocks.is_mounted(v)]
        with self._lock:
            self.ever_mounted.update(mounted)
        roots = v1_mounts(self.instances_dir)
        if len(mounted) > 1 or len(roots) > 1:
            self._violate(
                "writers",
                f"{len(mounted)} volumes mounted at once ({', '.join(sorted(mounted))}); "
                f"/v1 mounted under {', '.join(sorted(roots)) or 'no root'}",
            )


def v1_mounts(instances_dir: Path) -> list[str]:
    """Instance roots (under the sandbox's workdir) that have /v1 mounted."""
    prefix = str(instances_dir).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1]
        if point.startswith(prefix) and point.endswith("/v1"):
            rest = point[len(prefix) : -len("/v1")]
            if "/" not in rest:  # ROOT/v1 itself, not something deeper
                found.append(rest)
    return found


def wait_instances_gone(client: Any, timeout_s: float = 30.0) -> None:
    """Until every instance is terminated (EC2 frees volumes a while after the request)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [
            i["State"]["Name"]
            for r in client.describe_instances()["Reservations"]
            for i in r["Instances"]
        ]
        if all(state == "terminated" for state in states):
            return
        time.sleep(0.2)


def audit_leftovers(client: Any, drive: str, max_volumes: int = MAX_LEFTOVER_VOLUMES) -> list[str]:
    """What is wrong with the resources left at the end of a cycle (empty: nothing).

    Every instance has gone by then (their root volumes with them), so every volume and
    snapshot left in the sandbox must be the drive's, tagged as such.
    """
    problems: list[str] = []
    volumes = [v for v in client.describe_volumes()["Volumes"] if v["State"] != "deleted"]
    snapshots = client.describe_snapshots(OwnerIds=["self"])["Snapshots"]
    both = (("volume", volumes, "VolumeId"), ("snapshot", snapshots, "SnapshotId"))
    for kind, items, key in both:
        for item in items:
            name = _tags(item).get(tags.NAME)
            if name != drive:
                problems.append(f"{kind} {item[key]} has {tags.NAME}={name!r}, not {drive!r}")
    if len(volumes) > max_volumes:
        listed = ", ".join(
            f"{v['VolumeId']} ({v['State']}, generation {_generation(v)}, {v['AvailabilityZone']})"
            for v in volumes
        )
        problems.append(f"{len(volumes)} volumes left (at most {max_volumes}): {listed}")
    attached = [v["VolumeId"] for v in volumes if v.get("Attachments")]
    if attached:
        problems.append(f"volumes still attached after every instance went: {attached}")
    return problems
