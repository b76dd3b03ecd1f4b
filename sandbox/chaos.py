"""`make chaos N=...`: seeded, randomized lifecycles of a drive on the sandbox, each checked.

    python -m xdrive.sandbox.chaos --cycles 30             # seeds 1..30
    python -m xdrive.sandbox.chaos --cycles 10 --seed 100  # seeds 100..109
    python -m xdrive.sandbox.chaos --seeds 7,42            # replay those seeds

Each cycle (``chaos_plan``) lives a drive through a few instances with notices at random
moments, the agent SIGKILLed at steps of its boot and save, throttling bursts, IMDS 500s,
401s and slow answers, slow attaches and pending snapshots, instances that die without a
notice, zones at random, and two instances racing for the drive. After and during every
cycle (``chaos_cycle``, ``chaos_watch``) it checks that the drive restored next holds every
file ever synced to it, that no volume went before a completed final snapshot held it, that
there was never more than one writer, that the leftovers are few and tagged, and that the
agents never needed more than the generated least-privilege policy (which the sandbox
enforces).

A failure prints its seed (and the command to replay it). The last line is exactly
``N passed, M failed``; the exit status is 1 if any cycle failed. Needs root.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Optional

from xdrive.sandbox.chaos_cycle import CycleResult, run_cycle
from xdrive.sandbox.chaos_plan import plan_cycle

DEFAULT_LOGS = Path("/tmp/xdrive-chaos")


def parse_seeds(args: argparse.Namespace) -> list[int]:
    if args.seeds:
        try:
            return [int(s) for s in args.seeds.split(",") if s.strip()]
        except ValueError:
            raise SystemExit(
                f"--seeds takes integers separated by commas, not {args.seeds!r}"
            ) from None
    return list(range(args.seed, args.seed + args.cycles))


def report(result: CycleResult, index: int, total: int, verbose: bool) -> None:
    verdict = "passed" if result.passed else "FAILED"
    print(
        f"cycle {index}/{total} seed {result.seed}: {verdict} in {result.duration_s:.1f} s "
        f"({len(result.plan.lives)} lives)",
        flush=True,
    )
    if result.passed and not verbose:
        for note in result.notes:  # not a failure, but worth a look
            print("  note: " + note.replace("\n", "\n        "))
        return
    print(result.plan.describe())
    for line in result.timeline:
        print(f"    {line}")
    for v in result.violations:
        print(f"  {v}")
    for note in result.notes:
        print(f"  note: {note}")
    if not result.passed:
        print(f"  replay: python -m xdrive.sandbox.chaos --seeds {result.seed}")
        if result.log_dir is not None:
            print(f"  agent logs, manifest and timeline: {result.log_dir}")
    sys.stdout.flush()


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xdrive.sandbox.chaos",
        description="Seeded chaos cycles of a drive on the sandbox, with invariants.",
    )
    parser.add_argument("--cycles", type=int, default=20, help="how many cycles (default 20)")
    parser.add_argument("--seed", type=int, default=1, help="first seed (default 1)")
    parser.add_argument("--seeds", help="comma-separated seeds to run instead (a replay)")
    parser.add_argument("--lives", type=int, help="chaotic lives per cycle (default: 2-4)")
    parser.add_argument(
        "--logs", type=Path, default=DEFAULT_LOGS, help="where failing cycles keep their logs"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="timelines of every cycle")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("chaos needs root (loop devices and mounts)", file=sys.stderr)
        return 2
    seeds = parse_seeds(args)
    passed = failed = 0
    failures: list[int] = []
    started = time.monotonic()
    for n, seed in enumerate(seeds, 1):
        result = run_cycle(plan_cycle(seed, args.lives), keep_logs=args.logs)
        report(result, n, len(seeds), args.verbose)
        if result.passed:
            passed += 1
        else:
            failed += 1
            failures.append(seed)
    print(f"total {time.monotonic() - started:.0f} s", flush=True)
    if failures:
        print(f"failing seeds: {','.join(map(str, failures))}")
    print(f"{passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
