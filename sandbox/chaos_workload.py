"""The chaos workload: writes files to the drive and logs each one once it is durable.

It runs as its own process, never inside the harness: the agent's save kills whatever
holds /v1 (as it must), and the harness must survive that. Two commands:

    python -m xdrive.sandbox.chaos_workload write  --dir ROOT/v1 --rdev MAJ:MIN --log LOG --tag T
    python -m xdrive.sandbox.chaos_workload verify --dir ROOT/v1 --rdev MAJ:MIN --log LOG

``write`` opens ``work/`` on the drive (after checking the directory really is on the
drive's device), then loops: a new file, fsync it and the directory, append
``name sha256 size`` to LOG (outside the drive). A line in LOG therefore names content the
drive must keep from then on. It also rewrites ``state`` atomically with a counter, logged
as ``state N``. ``verify`` prints a JSON report of what in LOG the drive lacks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

WORK = "work"
STATE = "state"
EXIT_NOT_MOUNTED = 3
EXIT_MISSING = 1


@dataclass(frozen=True)
class Manifest:
    """What LOG says the drive holds: file -> (sha256, size), and the newest state counter."""

    files: dict[str, tuple[str, int]]
    state: int


@dataclass(frozen=True)
class Report:
    checked: int
    missing: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    state_expected: int = 0
    state_found: Optional[int] = None

    @property
    def ok(self) -> bool:
        return not self.missing and not self.mismatched and self._state_ok

    @property
    def _state_ok(self) -> bool:
        return self.state_expected == 0 or (self.state_found or 0) >= self.state_expected


def parse_log(lines: Iterable[str]) -> Manifest:
    """Whole lines only: a line cut by a kill names nothing that was promised."""
    files: dict[str, tuple[str, int]] = {}
    state = 0
    for line in lines:
        parts = line.split()
        if len(parts) == 2 and parts[0] == STATE and parts[1].isdigit():
            state = max(state, int(parts[1]))
        elif len(parts) == 3 and len(parts[1]) == 64 and parts[2].isdigit():
            files[parts[0]] = (parts[1], int(parts[2]))
    return Manifest(files, state)


def read_log(path: Path) -> Manifest:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Manifest({}, 0)
    return parse_log(line for line in text.split("\n") if line)  # last one may be cut


def parse_rdev(text: str) -> int:
    major, _, minor = text.partition(":")
    return os.makedev(int(major), int(minor))


def _on_drive(path: Path, rdev: int) -> bool:
    try:
        return os.stat(path).st_dev == rdev
    except OSError:
        return False


def _append(log_fd: int, line: str) -> None:
    os.write(log_fd, line.encode() + b"\n")  # one write(2) on O_APPEND: never interleaved


def write(drive_dir: Path, rdev: int, log: Path, tag: str, seed: int) -> int:
    if not _on_drive(drive_dir, rdev):
        return EXIT_NOT_MOUNTED
    root_fd = os.open(drive_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.mkdir(WORK, dir_fd=root_fd)
    except FileExistsError:
        pass
    work_fd = os.open(WORK, os.O_RDONLY | os.O_DIRECTORY, dir_fd=root_fd)
    if os.fstat(work_fd).st_dev != rdev:
        return EXIT_NOT_MOUNTED
    os.fchdir(work_fd)  # the cwd holds the mount too, as a shell in /v1 would
    log_fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    rng = random.Random(seed)
    state = read_log(log).state
    for i in range(1_000_000):
        size = rng.choice((0, 1, 100, 4096, 20_000, 70_000, 300_000))
        data = rng.randbytes(size)
        name = f"{tag}-{i:05d}.bin"
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644, dir_fd=work_fd)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.fsync(work_fd)
        _append(log_fd, f"{name} {hashlib.sha256(data).hexdigest()} {size}")
        if i % 5 == 4:
            state += 1
            _write_state(work_fd, state)
            _append(log_fd, f"{STATE} {state}")
        time.sleep(rng.uniform(0.0, 0.03))
    return 0


def _write_state(work_fd: int, value: int) -> None:
    tmp = f".{STATE}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644, dir_fd=work_fd)
    try:
        os.write(fd, f"{value}\n".encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, STATE, src_dir_fd=work_fd, dst_dir_fd=work_fd)
    os.fsync(work_fd)


def verify(drive_dir: Path, rdev: int, log: Path) -> tuple[int, Report]:
    if not _on_drive(drive_dir, rdev):
        return EXIT_NOT_MOUNTED, Report(checked=0)
    expected = read_log(log)
    work = drive_dir / WORK
    missing: list[str] = []
    mismatched: list[str] = []
    for name, (sha, size) in sorted(expected.files.items()):
        try:
            data = (work / name).read_bytes()
        except FileNotFoundError:
            missing.append(name)
            continue
        if len(data) != size or hashlib.sha256(data).hexdigest() != sha:
            mismatched.append(name)
    found: Optional[int] = None
    try:
        found = int((work / STATE).read_text().strip())
    except (FileNotFoundError, ValueError):
        pass
    report = Report(len(expected.files), missing, mismatched, expected.state, found)
    if not _on_drive(drive_dir, rdev):  # unmounted while reading: the answer means nothing
        return EXIT_NOT_MOUNTED, report
    return (0 if report.ok else EXIT_MISSING), report


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="chaos_workload", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("write", "verify"))
    parser.add_argument("--dir", required=True, type=Path, help="the drive's mountpoint")
    parser.add_argument("--rdev", required=True, help="MAJOR:MINOR of the drive's device")
    parser.add_argument("--log", required=True, type=Path, help="the manifest log")
    parser.add_argument("--tag", default="w", help="file name prefix (unique per writer)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rdev = parse_rdev(args.rdev)
    if args.command == "write":
        return write(args.dir, rdev, args.log, args.tag, args.seed)
    code, report = verify(args.dir, rdev, args.log)
    print(json.dumps({**asdict(report), "ok": report.ok}))
    return code


if __name__ == "__main__":
    sys.exit(main())
