"""The one place the agent runs external commands: argv lists only, never a shell."""

from __future__ import annotations

import os
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from xdrive.errors import XdriveError

# Commands whose output the agent parses (blkid, fsfreeze, umount) must speak one language.
_ENV_OVERRIDES = {"LC_ALL": "C", "LANG": "C"}
_STDERR_TAIL = 600  # characters of stderr kept in an error message


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


class CommandFailed(XdriveError):
    """A command exited non-zero, timed out or could not be started.

    ``returncode`` is None when there was no exit status (timeout, missing program).
    """

    def __init__(
        self,
        argv: Sequence[str],
        returncode: Optional[int],
        stdout: str,
        stderr: str,
        problem: str,
        fix: str = "",
    ) -> None:
        self.argv = tuple(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        super().__init__(problem, fix)


def _describe(argv: Sequence[str]) -> str:
    return shlex.join(argv)


def _tail(text: str) -> str:
    """Head and tail of long output: tools put the reason first (mkfs.xfs, then usage) or
    last (a log), so both ends are kept."""
    text = text.strip()
    if len(text) <= _STDERR_TAIL:
        return text
    half = _STDERR_TAIL // 2
    return text[:half] + " ... " + text[-half:]


def run(
    argv: Sequence[str],
    *,
    timeout_s: Optional[float] = None,
    check: bool = True,
    input: Optional[str] = None,
) -> CommandResult:
    """Run ``argv`` and return its result; raise CommandFailed on failure when ``check``.

    A timeout or a missing program always raises: there is no exit status to return.
    stdin is /dev/null unless ``input`` is given, so no command can stop to ask a question.
    """
    argv = tuple(str(a) for a in argv)
    if not argv:
        raise ValueError("empty argv")
    env = dict(os.environ)
    env.update(_ENV_OVERRIDES)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            text=True,
            shell=False,
        )
    except FileNotFoundError as e:
        raise CommandFailed(
            argv,
            None,
            "",
            str(e),
            f"cannot run `{_describe(argv)}`: {argv[0]} not found",
            f"install the package that provides {argv[0]} or check PATH",
        ) from e
    except PermissionError as e:
        raise CommandFailed(
            argv,
            None,
            "",
            str(e),
            f"cannot run `{_describe(argv)}`: permission denied",
            "run the agent as root",
        ) from e
    try:
        stdout, stderr = proc.communicate(input=input, timeout=timeout_s)
    except subprocess.TimeoutExpired as e:
        proc.kill()
        stdout, stderr = proc.communicate()
        raise CommandFailed(
            argv,
            None,
            stdout,
            stderr,
            f"`{_describe(argv)}` did not finish within {timeout_s:g} s",
            "see the system journal for what it was waiting on",
        ) from e
    result = CommandResult(argv, proc.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        detail = _tail(stderr) or _tail(stdout) or "no output"
        raise CommandFailed(
            argv,
            proc.returncode,
            stdout,
            stderr,
            f"`{_describe(argv)}` failed with exit status {proc.returncode}: {detail}",
        )
    return result
