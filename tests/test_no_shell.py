"""Nothing a user or AWS supplies reaches a shell.

The product's code runs programs only as argument vectors (no ``shell=True``, no
``os.system``/``os.popen``, no command strings), and the user-data's shell lines are the
same text whatever the drive, config or agent URL: every value that varies is passed as
an argv item (cloud-init runs a list without a shell) or as file content.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from xdrive.agent.config import AgentConfig, VolumeSettings
from xdrive.cloudinit.render import Distro, UserDataSettings, render_document

ROOT = Path(__file__).resolve().parent.parent
PRODUCT = ("agent", "core", "cloudinit", "launcher")
RUNNERS = {"run", "Popen", "call", "check_call", "check_output", "getoutput", "getstatusoutput"}
SHELLS = {("os", "system"), ("os", "popen"), ("os", "execl"), ("os", "spawnl")}


def product_sources() -> list[Path]:
    found = [p for package in PRODUCT for p in sorted((ROOT / package).rglob("*.py"))]
    assert len(found) > 30
    return found


def shell_uses(source: Path) -> list[str]:
    """Lines of ``source`` that could hand a string to a shell."""
    tree = ast.parse(source.read_text(), str(source))
    bad: list[str] = []
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and (node.value.id, node.attr) in SHELLS
        ):
            bad.append(f"{source.name}:{node.lineno} {node.value.id}.{node.attr}")
        if not isinstance(node, ast.Call):
            continue
        name = node.func.attr if isinstance(node.func, ast.Attribute) else ""
        for keyword in node.keywords:
            if keyword.arg == "shell" and not (
                isinstance(keyword.value, ast.Constant) and keyword.value.value is False
            ):
                bad.append(f"{source.name}:{node.lineno} shell=...")
        if name in RUNNERS and node.args and isinstance(node.args[0], (ast.JoinedStr, ast.BinOp)):
            bad.append(f"{source.name}:{node.lineno} {name}(<command string>)")
        if name in {"getoutput", "getstatusoutput"}:
            bad.append(f"{source.name}:{node.lineno} subprocess.{name}")
    return sorted(bad, key=lambda line: int(line.split(":")[1].split()[0]))


def test_the_product_never_runs_a_shell_command_string() -> None:
    bad = [line for source in product_sources() for line in shell_uses(source)]
    assert bad == []


def test_the_checker_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os, subprocess\n"
        "subprocess.run(f'mkfs {dev}', shell=True)\n"
        "os.system('ls')\n"
        "subprocess.check_output('a' + b)\n"
        "subprocess.run(['ls', name], shell=False)\n"
    )
    assert shell_uses(sample) == [
        "sample.py:2 shell=...",
        "sample.py:2 run(<command string>)",
        "sample.py:3 os.system",
        "sample.py:4 check_output(<command string>)",
    ]


def shell_lines(userdata: str) -> list[str]:
    """The user-data's runcmd entries that cloud-init hands to a shell (the strings)."""
    runcmd = yaml.safe_load(userdata)["runcmd"]
    assert any(isinstance(c, list) for c in runcmd)  # argv entries exist beside them
    return [c for c in runcmd if isinstance(c, str)]


@pytest.mark.parametrize("distro", ["al2023", "ubuntu"])
def test_userdata_shell_lines_do_not_depend_on_any_setting(distro: Distro) -> None:
    def render(drive: str, url: str, mountpoint: str) -> str:
        agent = AgentConfig(drive=drive, mountpoint=mountpoint, volume=VolumeSettings(size_gib=7))
        settings = UserDataSettings(
            drive=drive,
            agent=agent,
            distro=distro,
            agent_source="url",
            agent_url=url,
            agent_sha256="ab" * 32,
        )
        return render_document(settings)

    one = render("work", "s3://xdrive-agent-1/xdrive/agent/a.tar.gz", "/v1")
    other = render("x-9", "https://example.com/p?a=1&b=$(id)", "/data/x")
    assert shell_lines(one) == shell_lines(other)
    for value in ("x-9", "example.com", "/data/x"):
        assert not any(value in line for line in shell_lines(other))
