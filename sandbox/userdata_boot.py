"""Boot a simulated instance from the user-data it was launched with, as cloud-init would.

The launcher puts the agent's configuration into the user-data (write_files:
/etc/xdrive/agent.json). The sandbox reads it back through the EC2 API, keeps everything
the user chose (drive, volume, watch settings) and replaces only what differs on a laptop:
the root prefix, the endpoints and how docker is started.
"""

from __future__ import annotations

import base64
import gzip
import json
from dataclasses import replace
from typing import Any

import yaml

from xdrive.agent.config import AgentConfig, parse_config
from xdrive.sandbox.core import Sandbox, SandboxError, SimInstance

AGENT_CONFIG_PATH = "/etc/xdrive/agent.json"


def user_data_of(sandbox: Sandbox, instance_id: str) -> str:
    answer = sandbox.client().describe_instance_attribute(
        InstanceId=instance_id, Attribute="userData"
    )
    encoded = answer.get("UserData", {}).get("Value")
    if not encoded:
        raise SandboxError(f"{instance_id} was launched without user-data")
    data = base64.b64decode(encoded)
    if data[:2] == b"\x1f\x8b":  # cloud-init gunzips user-data that starts with gzip's magic
        data = gzip.decompress(data)
    return data.decode()


def agent_config_from_userdata(sandbox: Sandbox, inst: SimInstance) -> AgentConfig:
    document: Any = yaml.safe_load(user_data_of(sandbox, inst.instance_id))
    files = document.get("write_files", []) if isinstance(document, dict) else []
    content = next((f.get("content") for f in files if f.get("path") == AGENT_CONFIG_PATH), None)
    if content is None:
        raise SandboxError(
            f"the user-data of {inst.instance_id} writes no {AGENT_CONFIG_PATH}",
            "launch it with `xdrive launch` or the output of `xdrive userdata`",
        )
    chosen = parse_config(json.loads(content), source=f"user-data {AGENT_CONFIG_PATH}")
    local = sandbox.agent_config(inst, chosen.drive)
    return replace(
        local,
        volume=chosen.volume,
        watch=chosen.watch,
        docker=replace(local.docker, enabled=chosen.docker.enabled),
    )


def boot_from_userdata(sandbox: Sandbox, instance_id: str) -> AgentConfig:
    """Start the agent with the configuration in the instance's user-data."""
    inst = sandbox.instance(instance_id)
    config = agent_config_from_userdata(sandbox, inst)
    sandbox.start_agent(instance_id, config)
    return config
