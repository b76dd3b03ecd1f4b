"""One error type for everything a user can fix: it names the problem and what to do."""

from __future__ import annotations


class XdriveError(Exception):
    """A failure the user can act on. ``str()`` is one line: problem, then fix."""

    def __init__(self, problem: str, fix: str = "") -> None:
        self.problem = problem
        self.fix = fix
        super().__init__(f"{problem}. {fix}".strip() if fix else problem)


class ConfigError(XdriveError):
    """Bad configuration file, flag or name; nothing was changed."""


class PermissionDenied(XdriveError):
    """AWS refused a call for lack of IAM permission."""


class ImdsError(XdriveError):
    """The instance metadata service is unreachable, disabled or answered badly."""


class DriveBusy(XdriveError):
    """Another running instance holds the drive: one writer per drive."""


class AwsError(XdriveError):
    """Any other AWS failure that survived retries."""
