"""The systemd unit, the docker drop-in and the entry script that user-data installs.

This module is the source of truth for these texts: the agent and the tests render them
from here (the docker drop-in's text is the agent's own, agent/docker_setup.py).

The boot order they set up: the agent (Type=notify) says READY once the drive is mounted at
/v1; docker starts only after that and only if the agent started (After= + Requires= in the
drop-in). At shutdown units stop in reverse order: docker and its containers first, then the
agent saves the drive, then the network goes.
"""

from __future__ import annotations

from xdrive.agent import docker_setup
from xdrive.cloudinit import layout

# A restore may wait for a pending snapshot or for a volume still detaching from a dead
# instance; the agent asks for more time (EXTEND_TIMEOUT_USEC) while it waits.
START_TIMEOUT = "20min"
# Stop docker (containers get up to 60 s), sync, unmount, request the snapshot, detach.
STOP_TIMEOUT_S = 150
EXIT_CONFIG = 78  # the agent's exit status for a config it refuses (agent/main.py)


def render_unit(
    *,
    exec_path: str = layout.ENTRY_SCRIPT,
    config_path: str = layout.CONFIG_FILE,
    installed_marker: str = layout.INSTALLED_MARKER,
) -> str:
    """The text of /etc/systemd/system/xdrive-agent.service."""
    return f"""\
# Installed by xdrive user-data (source: xdrive.cloudinit.units).
[Unit]
Description=xdrive agent: restores the drive at boot, saves it on interruption and at stop
# The agent calls IMDS and EC2 while starting and while stopping: ordered after the
# network, it is also stopped (and saves) before the network goes down at shutdown.
# Not After=cloud-final.service: the first start comes from cloud-final's runcmd, which
# would then wait for itself.
Wants=network-online.target
After=network-online.target
# docker's data-root is on the drive. The docker drop-in says the same from docker's side;
# saying it here keeps the order when the drop-in is missing.
Before=docker.service
# Written by the first-boot bootstrap once the agent and its Python dependencies are
# installed. An Assert, not a Condition: a failed condition counts as success for units that
# Require= this one, and Ubuntu's docker.io starts docker while it is being installed.
AssertPathExists={installed_marker}

[Service]
# READY=1 once the drive is mounted: docker, ordered after this unit, waits for it.
Type=notify
# The entry script execs python, so the agent is the main process.
NotifyAccess=main
ExecStart={exec_path} run --config {config_path}
Environment=PYTHONUNBUFFERED=1
TimeoutStartSec={START_TIMEOUT}
# A spot notice leaves about 120 s and the agent acts on it itself; a stop or a shutdown
# gives the same save this long.
TimeoutStopSec={STOP_TIMEOUT_S}
# SIGTERM to the agent alone: it runs the save and lets its own commands (umount,
# fsfreeze -u, systemctl stop docker) finish. With the default control-group mode they
# would get SIGTERM too, and a killed fsfreeze -u leaves the filesystem frozen. Every
# process gets SIGKILL only when TimeoutStopSec has passed.
KillMode=mixed
# Failures retry (75: another instance holds the drive), except a config the agent
# refuses (78, EX_CONFIG): retrying cannot fix it.
Restart=on-failure
RestartSec=15
RestartPreventExitStatus={EXIT_CONFIG}
# The process that saves the drive must be the last one the OOM killer picks.
OOMScoreAdjust=-900

[Install]
WantedBy=multi-user.target
"""


def render_docker_dropin(*, agent_unit: str = layout.AGENT_UNIT, mountpoint: str = "/v1") -> str:
    """The text of /etc/systemd/system/docker.service.d/xdrive.conf: the agent's own, so
    the agent's rewrite at boot finds the file unchanged (no daemon-reload needed)."""
    return docker_setup.render_docker_dropin(agent_unit, mountpoint)


def render_entry_script(*, lib_dir: str = layout.LIB_DIR, venv_dir: str = layout.VENV_DIR) -> str:
    """The text of /usr/local/bin/xdrive-agent."""
    return f"""\
#!/bin/sh
# Installed by xdrive user-data (source: xdrive.cloudinit.units).
# The agent's code is in {lib_dir}; {venv_dir} is the distribution's python3 with its
# packages, plus what pip added. Ours first: no other xdrive can shadow it. exec:
# NotifyAccess=main needs python as the main process.
PYTHONPATH={lib_dir}${{PYTHONPATH:+:$PYTHONPATH}}
export PYTHONPATH
exec {venv_dir}/bin/python3 -m xdrive.agent.main "$@"
"""
