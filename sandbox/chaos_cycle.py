"""One chaos cycle: a drive's lives on the sandbox as a ``CyclePlan`` says, with checks.

Each life: launch (or take over the standby racer), start the agent under a supervisor
that restarts it like systemd, inject faults, kill the agent at chosen steps, wait for the
drive, check it holds every file ever synced to it, write more, end the life (notice, stop
or crash, maybe killing the save). Background watches check deletions and writers all
along; the end audits leftovers. The harness itself never touches /v1: the agent's save
kills what holds the drive, so reading and writing happen in child processes.
"""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from xdrive.agent.main import EXIT_CONFIG
from xdrive.sandbox.chaos_agents import (
    AgentSupervisor,
    Workload,
    device_numbers,
    freeze,
    release_frozen_loops,
    thaw,
    verify_drive,
    wait_for_status,
)
from xdrive.sandbox.chaos_faults import FaultScheduler
from xdrive.sandbox.chaos_plan import CyclePlan, Kill, LifePlan
from xdrive.sandbox.chaos_watch import (
    DeletionWatch,
    Invariant,
    Violation,
    WriterWatch,
    audit_leftovers,
    wait_instances_gone,
)
from xdrive.sandbox.core import Sandbox, SimInstance

READY_TIMEOUT_S = 120.0  # a life's drive must be mounted within this (latencies included)
STOP_TIMEOUT_S = 120.0  # a `systemctl stop` save must finish within this
RACE_SETTLE_S = 8.0  # after the winner is ready, how long the loser gets to give up
WRITABLE_WITHIN_S = 5.0  # a drive said ready must take a write within this
MOUNTPOINT = "v1"


class CycleAborted(Exception):
    """A check failed in a way that leaves nothing sensible to do in this cycle."""


@dataclass
class CycleResult:
    seed: int
    plan: CyclePlan
    violations: list[Violation]
    notes: list[str]
    timeline: list[str]
    duration_s: float
    log_dir: Optional[Path] = None

    @property
    def passed(self) -> bool:
        return not self.violations


@dataclass
class _Member:
    """An instance taking part in the drive's life: its agent unit and its writer."""

    inst: SimInstance
    sup: AgentSupervisor
    workload: Workload
    terminated: bool = False

    @property
    def iid(self) -> str:
        return self.inst.instance_id

    @property
    def mountpoint(self) -> Path:
        return self.inst.root / MOUNTPOINT


@dataclass
class _Ending:
    """How a save is going: a kill ended the instance; the save is over for the killers."""

    crash: threading.Event = field(default_factory=threading.Event)
    settled: threading.Event = field(default_factory=threading.Event)


class _EarlyNotice:
    """A spot notice posted while the agent still boots."""

    def __init__(self, runner: CycleRunner, m: _Member, after_s: float, lead_s: float) -> None:
        self.posted = threading.Event()
        self._at = 0.0

        def post() -> None:
            time.sleep(after_s)
            runner.sb.notice(m.iid, "terminate", in_seconds=lead_s)
            self._at = time.monotonic() + lead_s
            self.posted.set()
            runner.event(f"notice to {m.iid} during its boot: goes in {lead_s:.0f} s")

        self._thread = threading.Thread(target=post, name="chaos-notice", daemon=True)
        self._thread.start()

    def deadline(self) -> float:
        self._thread.join()
        return self._at


class CycleRunner:
    def __init__(self, plan: CyclePlan, sb: Sandbox, work: Path) -> None:
        self.plan = plan
        self.sb = sb
        self.work = work
        self.manifest = work / "manifest.log"
        self.violations: list[Violation] = []
        self.notes: list[str] = []
        self.timeline: list[str] = []
        self.members: list[_Member] = []
        self.standby: Optional[_Member] = None
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    # -- bookkeeping ---------------------------------------------------------------------

    def event(self, text: str) -> None:
        with self._lock:
            self.timeline.append(f"{time.monotonic() - self._t0:7.2f}s  {text}")

    def violate(self, invariant: Invariant, detail: str) -> None:
        self.event(f"VIOLATION [{invariant}] {detail.splitlines()[0]}")
        with self._lock:
            self.violations.append(Violation(invariant, detail))

    def note(self, text: str) -> None:
        self.event(f"note: {text.splitlines()[0]}")
        with self._lock:
            self.notes.append(text)

    def log_tail(self, m: _Member, lines: int = 25) -> str:
        return self.sb.agent_log_tail(m.iid, lines)

    # -- the cycle -----------------------------------------------------------------------

    def run(self) -> None:
        writers = WriterWatch(self.sb.blocks, self.sb.workdir)
        deletions = DeletionWatch(
            self.sb.client(max_attempts=2), self.plan.drive, writers.was_mounted
        )
        deletions.start()
        writers.start()
        try:
            for life in self.plan.lives:
                self.event(life.describe())
                self._life(life, calm=life is self.plan.lives[-1])
        except CycleAborted as e:
            self.event(f"cycle aborted: {e}")
        finally:
            self.teardown_members()
            writers.stop()
            deletions.stop()
            for v in writers.found() + deletions.found():
                self.violate(v.invariant, v.detail)
        try:
            for v in deletions.audit():
                self.violate(v.invariant, v.detail)
            wait_instances_gone(self.sb.client())
            if not any(v.invariant == "liveness" for v in self.violations):
                for problem in audit_leftovers(self.sb.client(), self.plan.drive):
                    self.violate("leftovers", problem)
        except Exception as e:
            self.violate("harness", f"end-of-cycle audit failed: {e!r}")
        self.event(
            f"watches: {deletions.samples} deletion samples ({deletions.errors} failed), "
            f"{writers.samples} writer samples; deleted unwritten: {deletions.unwritten or 'none'}"
        )

    def teardown_members(self) -> None:
        """Stop every unit and writer (no restarts), thaw, and let the instances go."""
        for m in self.members:
            if not m.terminated:
                self._terminate(m, grace_s=0.0, why="teardown")

    # -- one life ------------------------------------------------------------------------

    def _life(self, life: LifePlan, calm: bool) -> None:
        self.sb.fidelity.set_latencies(life.latencies)
        if life.zone is None and self.standby is not None:
            candidates = [self.standby]
            self.standby = None
            self.event(f"the standby {candidates[0].iid} carries on")
        else:
            candidates = [self._launch(life, life.zone or "us-east-1a")]
        if life.racer_zone:
            candidates.append(self._launch(life, life.racer_zone))
        faults = FaultScheduler(
            self.sb.fidelity,
            [m.inst.imds for m in candidates],
            life.throttle,
            life.imds,
            seed=self.plan.seed * 1000 + life.index,
        )
        for m in candidates:
            if m.sup.starts == 0:
                m.sup.start()
        faults.start()
        try:
            self._live(life, candidates, calm)
        finally:
            faults.stop()

    def _launch(self, life: LifePlan, zone: str) -> _Member:
        inst = self.sb.launch(zone)
        config = self.sb.agent_config(
            inst,
            self.plan.drive,
            size_gib=life.size_gib,
            docker=False,
            poll_interval_s=0.2,
        )
        member = _Member(
            inst,
            AgentSupervisor(self.sb, inst, config, life.restart_delay_s),
            Workload(self.manifest, tag=f"l{life.index}-{inst.instance_id[-6:]}", seed=life.index),
        )
        self.members.append(member)
        self.event(f"launched {inst.instance_id} in {zone}")
        return member

    def _live(self, life: LifePlan, candidates: list[_Member], calm: bool) -> None:
        first = candidates[0]
        early: Optional[_EarlyNotice] = None
        if life.notice_during_boot_s is not None:
            early = _EarlyNotice(self, first, life.notice_during_boot_s, life.notice_lead_s)
        for kill in life.boot_kills:
            self._boot_kill(first, kill)
        winner = self._wait_ready(candidates)
        if len(candidates) > 1:
            self._settle_race(life, winner, [m for m in candidates if m is not winner])
        if early is None or not early.posted.is_set():
            self._check_data(winner, calm)
            self._write(life, winner)
        if early is not None:
            self._end_by_notice(life, winner, early.deadline())
        elif life.end == "notice":
            self._end_by_notice(life, winner, None)
        elif life.end == "stop":
            self._end_by_stop(life, winner, calm)
        else:
            self.event(f"{winner.iid} crashes (no notice, no save)")
            self._terminate(winner, grace_s=0.0, why="crash")

    # -- boot ----------------------------------------------------------------------------

    def _boot_kill(self, m: _Member, kill: Kill) -> None:
        starts = m.sup.starts
        if kill.on_status is None:  # the delay counts from this agent process's start
            time.sleep(max(0.0, m.sup.started_at + kill.delay_s - time.monotonic()))
            fired = m.sup.kill()
        else:  # the boot ends at READY: a step not reached by then is not reached
            seen = wait_for_status(m.sup, kill.on_status, m.sup.start_index, m.sup.ready, 60.0)
            fired = seen and m.sup.kill()
        if not fired:
            self.event(f"{m.iid}: {kill.describe()}: not reached")
            return
        self.event(f"{m.iid}: agent killed ({kill.describe()})")
        deadline = time.monotonic() + 30
        while m.sup.starts == starts and time.monotonic() < deadline:
            time.sleep(0.05)

    def _wait_ready(self, candidates: list[_Member]) -> _Member:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            for m in candidates:
                if m.sup.ready():
                    status = m.sup.status()
                    self.event(
                        f"{m.iid} has the drive: {status.volume_id if status else '?'} "
                        f"(agent starts {m.sup.starts}, exits {m.sup.exits})"
                    )
                    return m
            if all(EXIT_CONFIG in m.sup.exits for m in candidates):
                break  # never retried: nothing will change
            time.sleep(0.05)
        tails = "\n".join(f"--- {m.iid} ---\n{self.log_tail(m)}" for m in candidates)
        self.violate(
            "liveness",
            f"no agent had the drive (waited up to {READY_TIMEOUT_S:.0f} s) "
            f"(exits: {[m.sup.exits for m in candidates]})\n{tails}",
        )
        raise CycleAborted("the drive never came up")

    def _settle_race(self, life: LifePlan, winner: _Member, losers: list[_Member]) -> None:
        """The loser must refuse (75) or keep waiting while the winner holds the drive."""
        for loser in losers:
            deadline = time.monotonic() + RACE_SETTLE_S
            while time.monotonic() < deadline and 75 not in loser.sup.exits:
                if loser.sup.ready():
                    if os.path.ismount(winner.mountpoint):
                        self.violate(
                            "race",
                            f"both {winner.iid} and {loser.iid} have the drive mounted\n"
                            f"--- {loser.iid} ---\n{self.log_tail(loser)}",
                        )
                        raise CycleAborted("two agents got the drive")
                    self.event(f"race: {winner.iid} let the drive go; {loser.iid} has it")
                    break
                time.sleep(0.05)
            exits = list(loser.sup.exits)
            self.event(f"race: {loser.iid} lost (exits {exits or 'none yet: still waiting'})")
            odd = [c for c in exits if c != 75]
            if odd:
                self.note(
                    f"racer {loser.iid} exited with {odd} before refusing "
                    f"(expected 75 or waiting); log:\n{self.log_tail(loser, 12)}"
                )
            if life.racer_fate == "standby":
                self.standby = loser  # keeps retrying; gets the drive in the next life
            else:
                self._terminate(loser, grace_s=0.0, why="race lost")

    # -- the drive in use ----------------------------------------------------------------

    def _rdev(self, m: _Member) -> Optional[str]:
        status = m.sup.status()
        if status is None or status.volume_id is None:
            return None
        return device_numbers(self.sb, status.volume_id)

    def _check_data(self, m: _Member, calm: bool) -> None:
        """Invariant 1: the drive restored now holds every file ever synced to it."""
        rdev = self._rdev(m)
        verdict = verify_drive(m.mountpoint, rdev, self.manifest) if rdev is not None else None
        if verdict is not None and verdict.code == 0:
            self.event(f"data ok on {m.iid}: {verdict.report.get('checked')} files")
            return
        if verdict is not None and verdict.code == 1:
            r = verdict.report
            status = m.sup.status()
            self.violate(
                "data",
                f"{m.iid} mounted {status.volume_id if status else '?'} without synced data: "
                f"{len(r.get('missing', []))} files missing (e.g. {r.get('missing', [])[:5]}), "
                f"{len(r.get('mismatched', []))} differ, state counter "
                f"{r.get('state_found')} < {r.get('state_expected')}?\n{self.log_tail(m)}",
            )
            raise CycleAborted("data lost")
        why = "no device" if verdict is None else f"verify said {verdict.code}: {verdict.report}"
        if calm:
            self.violate("liveness", f"could not check the drive on {m.iid}: {why}")
        else:
            self.event(f"data check on {m.iid} inconclusive: {why}")

    def _write(self, life: LifePlan, m: _Member) -> None:
        rdev = self._rdev(m)
        if rdev is None:
            self.event(f"{m.iid}: no device to write to")
            return
        before = self._manifest_lines()
        m.workload.start(m.mountpoint, rdev)
        kill = life.ready_kill
        if kill is not None:
            time.sleep(min(kill.delay_s, life.write_s))
            frozen = kill.frozen and freeze(m.mountpoint)
            if m.sup.kill():
                self.event(f"{m.iid}: agent killed ({kill.describe()}); systemd restarts it")
                self._wait_again_ready(m)
                self._check_writable(m, "after the agent was killed" + " while frozen" * frozen)
            elif frozen:
                thaw(m.mountpoint)
        if life.rebalance:
            time.sleep(life.write_s / 2)
            self.sb.rebalance(m.iid)
            self.event(f"rebalance recommendation to {m.iid}")
        time.sleep(life.write_s)
        self.event(f"workload on {m.iid}: {self._manifest_lines() - before} log lines so far")

    def _wait_again_ready(self, m: _Member) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline and not m.sup.ready():
            time.sleep(0.05)
        if not m.sup.ready():
            self.violate(
                "liveness",
                f"{m.iid}: the restarted agent did not take the drive back within "
                f"{READY_TIMEOUT_S:.0f} s (exits {m.sup.exits})\n{self.log_tail(m)}",
            )
            raise CycleAborted("no restart")

    def _check_writable(self, m: _Member, when: str) -> None:
        """Once the agent says the drive is ready, writes to it must go through."""
        before = self._manifest_lines()
        deadline = time.monotonic() + WRITABLE_WITHIN_S
        while time.monotonic() < deadline:
            if self._manifest_lines() > before or not m.workload.running():
                return
            time.sleep(0.05)
        was_frozen = thaw(m.mountpoint)  # the harness thaws it, or nothing could go on
        self.violate(
            "liveness",
            f"{m.iid}: the agent said the drive was ready {when}, but no write went through "
            f"in {WRITABLE_WITHIN_S:.0f} s"
            + ("; the drive was still frozen (thawed by the harness)" if was_frozen else "")
            + f"\n{self.log_tail(m, 12)}",
        )

    def _manifest_lines(self) -> int:
        try:
            return self.manifest.read_bytes().count(b"\n")
        except FileNotFoundError:
            return 0

    # -- endings -------------------------------------------------------------------------

    def _end_by_notice(self, life: LifePlan, m: _Member, deadline: Optional[float]) -> None:
        if deadline is None:
            self.sb.notice(m.iid, "terminate", in_seconds=life.notice_lead_s)
            deadline = time.monotonic() + life.notice_lead_s
            self.event(f"spot notice to {m.iid}: goes in {life.notice_lead_s:.0f} s")
        ending = _Ending()
        killers = [self._arm_save_kill(m, k, ending) for k in life.save_kills]
        saved = None
        while time.monotonic() < deadline and not ending.crash.is_set():
            status = m.sup.status()
            if status is not None and status.phase == "saved":
                ending.settled.set()  # kills not triggered by now never will be
                for t in killers:
                    t.join(timeout=5)
                status = m.sup.status()
                if status is not None and status.phase == "saved" and m.sup.alive():
                    saved = status.last_save
                    break
                ending.settled.clear()  # a kill restarted the agent: it saves again
            time.sleep(0.05)
        if saved is not None:
            done = " (completed)" if saved.completed else ""
            self.event(f"{m.iid}: saved as {saved.snapshot_id} ({saved.kind}){done}")
        elif ending.crash.is_set():
            self.event(f"{m.iid}: the instance died during its save")
        else:
            self.event(f"{m.iid}: the instance goes before a save finished")
        ending.settled.set()
        grace = 5.0 if life.at_deadline == "graceful" and not ending.crash.is_set() else 0.0
        self._terminate(m, grace_s=grace, why=f"notice deadline ({life.at_deadline})")
        for t in killers:
            t.join(timeout=5)

    def _end_by_stop(self, life: LifePlan, m: _Member, calm: bool) -> None:
        ending = _Ending()
        self.event(f"systemctl stop on {m.iid}")
        killers = [self._arm_save_kill(m, k, ending) for k in life.save_kills]
        m.sup.begin_stop()
        code = m.sup.wait_exit(STOP_TIMEOUT_S)
        ending.settled.set()
        for t in killers:
            t.join(timeout=5)
        if code is None:
            self.violate(
                "liveness",
                f"{m.iid}: the stop's save did not finish in {STOP_TIMEOUT_S:.0f} s\n"
                f"{self.log_tail(m)}",
            )
        elif code != 0 and not ending.crash.is_set():
            text = f"{m.iid}: the stop's save exited {code}\n{self.log_tail(m, 12)}"
            if calm:
                self.violate("agent", text)
            else:
                self.note(text)
        elif code == 0:
            status = m.inst.status()
            record = status.last_save if status else None
            said = "none"
            if record is not None:
                said = record.snapshot_id + (" completed" if record.completed else " pending")
            self.event(f"{m.iid}: stopped; last save {said}")
            if calm and (record is None or record.kind != "final"):
                self.violate("agent", f"{m.iid}: a calm stop did not save a final snapshot")
        self._terminate(m, grace_s=0.0, why="shutdown")

    def _arm_save_kill(self, m: _Member, kill: Kill, ending: _Ending) -> threading.Thread:
        since = len(m.inst.notify.messages())

        def over() -> bool:
            return m.terminated or ending.settled.is_set()

        def saving() -> bool:
            return over() or "STOPPING=1" in m.inst.notify.messages()[since:]

        def run() -> None:
            if kill.on_status is None:
                if not _until(saving, 60.0) or over():
                    return
                time.sleep(kill.delay_s)
            elif not wait_for_status(m.sup, kill.on_status, since, over, 60.0):
                return
            if m.terminated:
                return
            if kill.then == "crash":
                ending.crash.set()
                m.sup.finish()
                self.event(f"{m.iid}: agent killed ({kill.describe()}): the instance dies")
            elif m.sup.kill():
                self.event(f"{m.iid}: agent killed ({kill.describe()})")

        thread = threading.Thread(target=run, name="chaos-save-kill", daemon=True)
        thread.start()
        return thread

    def _terminate(self, m: _Member, grace_s: float, why: str) -> None:
        """The instance goes: a graceful OS shutdown gets ``grace_s``, then it just dies."""
        if m.terminated:
            return
        m.terminated = True
        if grace_s > 0 and m.sup.alive():
            m.sup.begin_stop()
            m.sup.wait_exit(grace_s)
        m.sup.finish()
        if thaw(m.mountpoint):  # first: a writer blocked on a frozen drive cannot die
            self.note(f"{m.iid}: the drive was frozen when the instance went ({why})")
        m.workload.kill()
        for attempt in range(5):
            try:
                self.sb.crash(m.iid)
                break
            except Exception as e:  # throttled: the instance must still go
                if attempt == 4:
                    self.violate("harness", f"could not terminate {m.iid}: {e!r}")
                time.sleep(0.5)
        self.event(f"{m.iid} terminated ({why})")


def _until(check: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def run_cycle(plan: CyclePlan, keep_logs: Optional[Path] = None) -> CycleResult:
    """Run one cycle in a sandbox of its own; the sandbox is closed whatever happens."""
    started = time.monotonic()
    sb = Sandbox().start()
    work = sb.workdir / "chaos"
    work.mkdir(parents=True, exist_ok=True)
    runner = CycleRunner(plan, sb, work)
    log_dir: Optional[Path] = None
    try:
        try:
            runner.run()
        except Exception as e:  # a harness bug must not leave the machine dirty
            runner.violate("harness", f"{type(e).__name__}: {e}")
            runner.teardown_members()
        for denial in sb.fidelity.policy_denials():
            runner.violate("least privilege", f"the generated agent policy refused {denial}")
        if runner.violations and keep_logs is not None:
            log_dir = keep_logs / f"seed-{plan.seed}"
            _save_logs(sb, runner, log_dir)
    finally:
        try:
            sb.close()
        except Exception as e:
            runner.violate("harness", f"sandbox teardown: {e}")
        stuck = release_frozen_loops(sb.workdir)
        if stuck:
            runner.violate(
                "leftovers",
                "a save unmounted the drive while it was frozen: its device stayed busy "
                f"after the instance went (on EC2 the detach would hang): {', '.join(stuck)}",
            )
    return CycleResult(
        seed=plan.seed,
        plan=plan,
        violations=runner.violations,
        notes=runner.notes,
        timeline=runner.timeline,
        duration_s=time.monotonic() - started,
        log_dir=log_dir,
    )


def _save_logs(sb: Sandbox, runner: CycleRunner, to: Path) -> None:
    shutil.rmtree(to, ignore_errors=True)
    to.mkdir(parents=True, exist_ok=True)
    for m in runner.members:
        if m.inst.agent_log.exists():
            shutil.copy(m.inst.agent_log, to / f"{m.iid}.log")
    if runner.manifest.exists():
        shutil.copy(runner.manifest, to / "manifest.log")
    (to / "timeline.txt").write_text("\n".join(runner.timeline) + "\n")
