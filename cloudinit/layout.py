"""Where user-data puts the agent on the instance: one table, shared by the files and units."""

from __future__ import annotations

from xdrive.agent.config import DEFAULT_CONFIG_PATH
from xdrive.cloudinit import bootstrap

PREFIX = "/opt/xdrive"
LIB_DIR = f"{PREFIX}/{bootstrap.LIB_NAME}"  # PYTHONPATH: holds the xdrive/ package tree
VENV_DIR = f"{PREFIX}/{bootstrap.VENV_NAME}"  # distro python3 + --system-site-packages
INSTALLED_MARKER = f"{PREFIX}/{bootstrap.MARKER_NAME}"  # written last by the bootstrap
VERSION_FILE = f"{PREFIX}/VERSION"
BOOTSTRAP_SCRIPT = f"{PREFIX}/bootstrap.py"
BOOTSTRAP_SETTINGS = f"{PREFIX}/bootstrap.json"
SYSTEM_PYTHON = "/usr/bin/python3"  # 3.9 on Amazon Linux 2023, for the life of AL2023

ENTRY_SCRIPT = "/usr/local/bin/xdrive-agent"
CONFIG_FILE = str(DEFAULT_CONFIG_PATH)  # /etc/xdrive/agent.json
AGENT_UNIT = "xdrive-agent.service"
UNIT_FILE = f"/etc/systemd/system/{AGENT_UNIT}"
DOCKER_DROPIN_FILE = "/etc/systemd/system/docker.service.d/xdrive.conf"
