"""Tell systemd (and humans) what the agent is doing: sd_notify and journal logging.

systemd-python is used when installed; otherwise the datagram protocol is spoken directly
(it is one sendto), so the agent behaves the same on images without the package.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from typing import Optional

log = logging.getLogger("xdrive.agent")


def _send(message: str) -> bool:
    try:
        from systemd import daemon  # type: ignore[import-not-found,unused-ignore]

        return bool(daemon.notify(message))
    except ImportError:
        pass
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(address)
        sock.sendall(message.encode())
    return True


class Notifier:
    """READY/STATUS/STOPPING for a Type=notify unit; also logs every status line."""

    def __init__(self) -> None:
        self.last_status: Optional[str] = None

    def status(self, text: str) -> None:
        self.last_status = text
        log.info(text)
        _send(f"STATUS={text}")

    def ready(self, text: str) -> None:
        self.last_status = text
        log.info(text)
        _send(f"READY=1\nSTATUS={text}")

    def stopping(self, text: str) -> None:
        self.last_status = text
        log.info(text)
        _send(f"STOPPING=1\nSTATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        """Ask systemd for more time for the current start/stop step."""
        _send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def setup_logging(verbose: bool = False) -> None:
    """Journal when available (structured fields), stderr otherwise (systemd journals it too)."""
    level = logging.DEBUG if verbose else logging.INFO
    root = logging.getLogger()
    root.setLevel(level)
    handler: logging.Handler
    try:
        from systemd.journal import JournalHandler  # type: ignore[import-not-found,unused-ignore]

        if os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"):
            handler = JournalHandler(SYSLOG_IDENTIFIER="xdrive-agent")
        else:
            raise ImportError
    except ImportError:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    root.handlers[:] = [handler]
    for noisy in ("botocore", "urllib3", "docker"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
