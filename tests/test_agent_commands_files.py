"""The agent's one place to run commands and one place to write files."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from xdrive.agent import files
from xdrive.agent.commands import CommandFailed, CommandResult, run
from xdrive.errors import ConfigError, XdriveError


def test_run_returns_output_and_passes_argv_literally() -> None:
    result = run(["echo", "$(id) ; rm -rf /"])
    assert result == CommandResult(("echo", "$(id) ; rm -rf /"), 0, "$(id) ; rm -rf /\n", "")


def test_run_feeds_input_and_gives_commands_no_terminal() -> None:
    assert run(["cat"], input="hello").stdout == "hello"
    assert run(["cat"]).stdout == ""  # stdin is /dev/null: nothing can wait for a user


def test_failure_names_the_command_and_its_stderr() -> None:
    with pytest.raises(CommandFailed) as err:
        run(["sh", "-c", "echo the reason >&2; exit 3"])
    assert isinstance(err.value, XdriveError)
    assert err.value.returncode == 3
    assert err.value.argv == ("sh", "-c", "echo the reason >&2; exit 3")
    assert "exit status 3" in str(err.value) and "the reason" in str(err.value)
    assert "sh -c" in str(err.value)


def test_check_false_returns_the_failure() -> None:
    result = run(["sh", "-c", "exit 2"], check=False)
    assert result.returncode == 2


def test_missing_program() -> None:
    with pytest.raises(CommandFailed, match="not found") as err:
        run(["xdrive-no-such-program"], check=False)
    assert err.value.returncode is None


def test_timeout_kills_the_command(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    with pytest.raises(CommandFailed, match="did not finish") as err:
        run(["sh", "-c", f"echo $$ > {pidfile}; exec sleep 30"], timeout_s=0.5)
    assert err.value.returncode is None
    pid = int(pidfile.read_text())
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{pid}").exists()


def test_commands_run_in_the_c_locale() -> None:
    assert run(["sh", "-c", "echo $LC_ALL"]).stdout == "C\n"


def test_write_atomic_replaces_and_sets_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "f.conf"
    files.write_atomic(path, "one")
    assert path.read_text() == "one"
    assert path.stat().st_mode & 0o777 == 0o644
    files.write_atomic(path, b"\x00two", mode=0o600)
    assert path.read_bytes() == b"\x00two"
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.conf"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_text("old")
    with pytest.raises(TypeError):
        files.write_atomic(path, 42)
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["f"]


def test_read_json(tmp_path: Path) -> None:
    assert files.read_json(tmp_path / "missing.json") == {}
    (tmp_path / "empty.json").write_text(" \n")
    assert files.read_json(tmp_path / "empty.json") == {}
    files.write_json(tmp_path / "x.json", {"b": 1, "a": [1]})
    assert files.read_json(tmp_path / "x.json") == {"a": [1], "b": 1}
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        files.read_json(tmp_path / "bad.json")
