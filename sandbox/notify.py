"""A stand-in for systemd's notify socket: records READY/STATUS/STOPPING from an agent."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional


class NotifyListener:
    """A unix datagram socket like the one systemd passes in ``NOTIFY_SOCKET``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.2)
        self._messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._read, name=f"notify-{path}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._closed:
            try:
                data = self._sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            with self._cond:
                for line in data.decode(errors="replace").splitlines():
                    self._messages.append((time.monotonic(), line))
                self._cond.notify_all()

    def messages(self) -> list[str]:
        with self._cond:
            return [m for _, m in self._messages]

    def timed_messages(self) -> list[tuple[float, str]]:
        with self._cond:
            return list(self._messages)

    @property
    def ready(self) -> bool:
        return "READY=1" in self.messages()

    def last_status(self) -> Optional[str]:
        statuses = [m for m in self.messages() if m.startswith("STATUS=")]
        return statuses[-1][len("STATUS=") :] if statuses else None

    def wait_for(self, predicate: Callable[[list[str]], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not predicate([m for _, m in self._messages]):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.5))
            return True

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        self._thread.join(timeout=2)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
