"""Stop docker by a deadline without marking any container stopped.

Docker's daemon is stopped, never its containers one by one: `docker stop` (or `docker
kill`) marks a container stopped by the user, and a `--restart unless-stopped` container
would then not come back on the next instance. dockerd stops every container in parallel,
each with its own stop timeout; whatever still runs at the deadline is SIGKILLed (a
signal from outside the daemon is not a user stop). A container whose main process cannot
receive its stop signal (PID 1 of its namespace without a handler: the kernel drops the
signal) is killed as soon as dockerd has signalled it, since waiting out its stop timeout
could not change how it ends.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from xdrive.agent.docker_setup import DockerControl
from xdrive.agent.notify import Notifier
from xdrive.agent.processes import (
    catches_signal,
    parse_signal,
    process_running,
    process_start_time,
    send_signal,
    wait_gone,
)

log = logging.getLogger("xdrive.agent.save")

AFTER_KILL_S = 5.0  # for dockerd to notice its killed containers and exit
DEFAULT_STOP_TIMEOUT_S = 10.0  # docker's, for a container that sets none
# dockerd's default pidfile (/var/run is /run). The sandbox's dockerd uses ROOT/run/docker.pid.
DOCKERD_PIDFILE = "/run/docker.pid"


@dataclass(frozen=True)
class ContainerProcess:
    """A running container's main process, as seen before the daemon stops."""

    id: str
    name: str
    pid: int
    started: Optional[str]
    stop_signal: int
    stop_timeout_s: float
    deaf: bool  # PID 1 without a handler for its stop signal: the signal would be dropped

    def running(self) -> bool:
        return process_running(self.pid, self.started)


class _Background:
    """A call run in a thread, waited for with a timeout (the caller decides what next)."""

    def __init__(self, name: str, call: Callable[[], None]) -> None:
        self.error: Optional[BaseException] = None
        self._thread = threading.Thread(target=self._run, args=(call,), name=name, daemon=True)
        self._thread.start()

    def _run(self, call: Callable[[], None]) -> None:
        try:
            call()
        except BaseException as e:
            self.error = e

    def wait(self, timeout_s: float) -> bool:
        self._thread.join(max(0.0, timeout_s))
        return not self._thread.is_alive()


class DockerStop:
    """Stop docker (daemon and containers) by ``until``, keeping restart policies intact."""

    def __init__(
        self,
        control: DockerControl,
        docker_url: str,
        pidfile: Path,
        notifier: Notifier,
        *,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.control = control
        self.docker_url = docker_url
        self.pidfile = pidfile
        self.notifier = notifier
        self.monotonic = monotonic

    def run(self, until: float) -> None:
        api = self._connect()
        containers = self._running_containers(api) if api is not None else []
        deaf = {c.id: c for c in containers if c.deaf}
        stop_watching = self._kill_when_signalled(api, deaf) if api is not None and deaf else None
        left = until - self.monotonic()
        self.notifier.status(
            f"stopping docker: {len(containers)} running container(s), at most {left:.0f} s"
        )
        daemon = self._dockerd()
        stopper = _Background("docker-stop", lambda: self.control.stop(timeout_s=left + 30))
        done = self._wait_stopped(stopper, daemon, until)
        if done and stopper.error is not None and daemon is not None and process_running(*daemon):
            # The stop command failed (no systemctl, a unit error): do what it would have
            # done, so that the daemon, not the agent, stops the containers.
            log.warning("docker stop failed (%s): SIGTERM to dockerd %d", stopper.error, daemon[0])
            send_signal(daemon[0], signal.SIGTERM)
            wait_gone({daemon[0]: daemon[1]}, until - self.monotonic())
        survivors = [c for c in containers if c.running()]
        if done and survivors:
            # The daemon is gone but its containers run on (live-restore): stop them as
            # dockerd would, within the budget.
            log.warning("dockerd stopped, %d container(s) still run: stopping them", len(survivors))
            for c in survivors:
                send_signal(c.pid, c.stop_signal)
            longest = max(c.stop_timeout_s for c in survivors)
            wait_gone({c.pid: c.started for c in survivors}, min(until - self.monotonic(), longest))
            survivors = [c for c in survivors if c.running()]
        if survivors:
            names = ", ".join(c.name for c in survivors)
            log.warning("containers still running at the end of their time: SIGKILL to %s", names)
            self.notifier.status(f"killing containers that did not stop in time: {names}")
            for c in survivors:
                send_signal(c.pid, signal.SIGKILL)
            wait_gone({c.pid: c.started for c in survivors}, AFTER_KILL_S)
        if not done:
            done = stopper.wait(AFTER_KILL_S)
        if stop_watching is not None:
            stop_watching()
        if api is not None:
            api.close()
        if not done:
            log.warning("the docker stop command is still running; going on with the save")
        elif stopper.error is not None:
            # The data matters more than a clean daemon stop: unmount ends what is left.
            log.warning("docker did not stop cleanly: %s", stopper.error)

    def _wait_stopped(
        self, stopper: _Background, daemon: Optional[tuple[int, Optional[str]]], until: float
    ) -> bool:
        """Until the stop command returns, or dockerd is gone, or ``until``.

        At shutdown systemd has stopped docker.service before the agent (the drop-in's
        After=), but docker.socket's stop job waits for the agent: a blocking `systemctl stop
        docker.socket` would hold the save until its timeout. What matters is dockerd being
        gone, so that ends the wait too (found by the e2e boot under systemd).
        """
        while True:
            if stopper.wait(min(0.1, max(0.0, until - self.monotonic()))):
                return True
            if daemon is None or not process_running(*daemon):
                return True
            if self.monotonic() >= until:
                return False

    def _dockerd(self) -> Optional[tuple[int, Optional[str]]]:
        """The running dockerd (pid, start time) from its pidfile, or None."""
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        started = process_start_time(pid)
        return (pid, started) if process_running(pid, started) else None

    def _connect(self) -> Any:
        # Only a running dockerd is asked anything: at shutdown systemd has stopped it
        # already, and a request to docker.socket could start it again.
        if self._dockerd() is None:
            return None
        import docker  # the agent imports the SDK only where it talks to dockerd

        try:
            return docker.APIClient(base_url=self.docker_url, timeout=5)
        except Exception as e:
            log.warning("cannot reach dockerd at %s: %s", self.docker_url, e)
            return None

    def _running_containers(self, api: Any) -> list[ContainerProcess]:
        found = []
        try:
            for summary in api.containers():
                info = api.inspect_container(summary["Id"])
                pid = int(info.get("State", {}).get("Pid") or 0)
                if pid <= 0:
                    continue
                config = info.get("Config") or {}
                stop_signal = parse_signal(config.get("StopSignal"))
                timeout = config.get("StopTimeout")
                found.append(
                    ContainerProcess(
                        id=info["Id"],
                        name=str(info.get("Name", "")).lstrip("/") or info["Id"][:12],
                        pid=pid,
                        started=process_start_time(pid),
                        stop_signal=stop_signal,
                        stop_timeout_s=DEFAULT_STOP_TIMEOUT_S if timeout is None else timeout,
                        deaf=catches_signal(pid, stop_signal) is False,
                    )
                )
        except Exception as e:
            log.warning("cannot list containers (%s): they get the stop command's time", e)
        return found

    def _kill_when_signalled(
        self, api: Any, deaf: dict[str, ContainerProcess]
    ) -> Optional[Callable[[], None]]:
        """SIGKILL each deaf container once dockerd's shutdown has sent it its stop signal.

        Not before: dockerd restarts a container that dies while it is not shutting down.
        Its "kill" event comes after it cancelled the container's restart, and the event
        stream stays open while the daemon shuts down (only its listeners close).
        """
        try:
            stream = api.events(filters={"type": ["container"], "event": ["kill"]}, decode=True)
        except Exception as e:
            log.warning("cannot follow docker events (%s): deaf containers wait their time", e)
            return None
        waiting = dict(deaf)

        def follow() -> None:
            try:
                for event in stream:
                    actor = event.get("Actor") or {}
                    c = waiting.pop(str(event.get("id") or actor.get("ID") or ""), None)
                    if c is not None and c.running():
                        log.info("container %s cannot receive its stop signal: SIGKILL", c.name)
                        send_signal(c.pid, signal.SIGKILL)
                    if not waiting:
                        return
            except Exception:
                pass  # the stream ends when dockerd exits or when it is closed

        threading.Thread(target=follow, name="docker-events", daemon=True).start()

        def close() -> None:
            try:
                stream.close()
            except Exception:
                pass

        return close
