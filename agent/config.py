"""The agent's configuration: /etc/xdrive/agent.json, validated before anything is touched.

JSON because the agent runs on Python 3.9 (no tomllib) and cloud-init writes it verbatim.
Unknown keys are errors, not warnings: a typo in a safety setting must not be ignored.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

from xdrive.errors import ConfigError
from xdrive.names import validate_drive_name

DEFAULT_CONFIG_PATH = Path("/etc/xdrive/agent.json")
FILESYSTEMS = ("ext4", "xfs")
# gp3 only: the EC2 wrapper creates gp3 (IOPS and throughput set apart from size); a
# type accepted here but not honoured would be a silent lie.
VOLUME_TYPES = ("gp3",)


@dataclass(frozen=True)
class VolumeSettings:
    size_gib: int = 20
    volume_type: str = "gp3"
    encrypted: bool = True
    kms_key_id: Optional[str] = None
    iops: Optional[int] = None
    throughput: Optional[int] = None
    # MiB/s; speeds the first read of a restored volume (CreateVolume VolumeInitializationRate).
    initialization_rate: Optional[int] = None
    filesystem: str = "ext4"
    device_name: str = "/dev/sdf"


@dataclass(frozen=True)
class DockerSettings:
    enabled: bool = True
    url: str = "unix:///var/run/docker.sock"
    daemon_json: str = "/etc/docker/daemon.json"
    # Both units, or socket activation brings dockerd straight back (aws-facts.md).
    start_command: tuple[str, ...] = ("systemctl", "start", "docker.socket", "docker.service")
    stop_command: tuple[str, ...] = ("systemctl", "stop", "docker.socket", "docker.service")
    stop_timeout_s: float = 60.0


@dataclass(frozen=True)
class WatchSettings:
    poll_interval_s: float = 2.0
    checkpoint_on_rebalance: bool = True
    checkpoint_interval_s: float = 0.0  # 0: no periodic checkpoints
    # Seconds reserved at the end of a notice for snapshot request + detach.
    snapshot_reserve_s: float = 20.0


@dataclass(frozen=True)
class AgentConfig:
    drive: str
    mountpoint: str = "/v1"
    root: str = "/"  # prefix for every host path; the sandbox gives each instance its own
    region: Optional[str] = None  # default: from IMDS
    imds_url: str = "http://169.254.169.254"
    ec2_endpoint: Optional[str] = None  # the sandbox's endpoint; None on AWS
    state_dir: str = "/var/lib/xdrive"
    volume: VolumeSettings = field(default_factory=VolumeSettings)
    docker: DockerSettings = field(default_factory=DockerSettings)
    watch: WatchSettings = field(default_factory=WatchSettings)

    def host_path(self, path: str) -> Path:
        """An absolute host path (``/v1``) under the root prefix."""
        return Path(self.root) / path.lstrip("/")

    @property
    def mount_path(self) -> Path:
        return self.host_path(self.mountpoint)

    def to_json(self) -> str:
        return json.dumps(_as_dict(self), indent=2, sort_keys=True) + "\n"


def load_config(path: Path) -> AgentConfig:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(
            f"config file {path} does not exist",
            "write it (xdrive userdata does this at boot) or pass --config PATH",
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(
            f"config file {path} is not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})",
            "fix the syntax; nothing was changed",
        ) from None
    return parse_config(raw, source=str(path))


def parse_config(raw: Any, source: str = "config") -> AgentConfig:
    cfg = _build(AgentConfig, raw, source)
    validate_drive_name(cfg.drive)
    _check(
        cfg.mountpoint.startswith("/") and cfg.mountpoint != "/",
        source,
        "mountpoint",
        f"must be an absolute path other than '/', not {cfg.mountpoint!r}",
    )
    _check(cfg.root.startswith("/"), source, "root", "must be an absolute path")
    v = cfg.volume
    _check(1 <= v.size_gib <= 16384, source, "volume.size_gib", "must be 1..16384 GiB")
    _check(
        v.volume_type in VOLUME_TYPES,
        source,
        "volume.volume_type",
        f"must be {' or '.join(VOLUME_TYPES)} (the only type xdrive creates)",
    )
    _check(
        v.filesystem in FILESYSTEMS,
        source,
        "volume.filesystem",
        f"must be one of {', '.join(FILESYSTEMS)}",
    )
    _check(
        v.device_name.startswith("/dev/"), source, "volume.device_name", "must look like /dev/sdf"
    )
    _check(
        v.initialization_rate is None or 100 <= v.initialization_rate <= 300,
        source,
        "volume.initialization_rate",
        "must be 100..300 MiB/s (EBS limits) or null",
    )
    w = cfg.watch
    _check(
        0.2 <= w.poll_interval_s <= 30,
        source,
        "watch.poll_interval_s",
        "must be 0.2..30 seconds (AWS recommends 5 or less)",
    )
    _check(
        w.checkpoint_interval_s == 0 or w.checkpoint_interval_s >= 60,
        source,
        "watch.checkpoint_interval_s",
        "must be 0 (off) or at least 60 seconds",
    )
    _check(
        0 < w.snapshot_reserve_s < 110,
        source,
        "watch.snapshot_reserve_s",
        "must be between 0 and 110 seconds",
    )
    _check(
        len(cfg.docker.start_command) > 0 and len(cfg.docker.stop_command) > 0,
        source,
        "docker.start_command",
        "start and stop commands must not be empty",
    )
    return cfg


def _check(ok: bool, source: str, key: str, what: str) -> None:
    if not ok:
        raise ConfigError(f"{source}: '{key}' {what}", "fix the value; nothing was changed")


_TYPE_WORDS = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "Optional[str]": "a string or null",
    "Optional[int]": "an integer or null",
    "tuple[str, ...]": "a list of strings",
}
_TYPES: dict[str, tuple[type, ...]] = {
    "str": (str,),
    "int": (int,),
    "float": (int, float),
    "bool": (bool,),
    "Optional[str]": (str, type(None)),
    "Optional[int]": (int, type(None)),
    "tuple[str, ...]": (list, tuple),
}


def _build(cls: Any, raw: Any, source: str, prefix: str = "") -> Any:
    """``cls`` from the JSON object ``raw``; ``prefix`` is its key path (``volume.``)."""
    if not isinstance(raw, dict):
        what = f"'{prefix.rstrip('.')}'" if prefix else "the top level"
        raise ConfigError(
            f"{source}: {what} must be an object, got {_json_type(raw)}",
            "see docs/configuration.md; nothing was changed",
        )
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        hints = [
            f"did you mean '{prefix}{close[0]}'?"
            for close in (difflib.get_close_matches(k, list(known), n=1) for k in unknown)
            if close
        ]
        raise ConfigError(
            f"{source}: unknown key(s) {', '.join(repr(prefix + k) for k in unknown)}",
            " ".join(hints)
            + (" " if hints else "")
            + f"valid keys{' in ' + repr(prefix.rstrip('.')) if prefix else ''}: "
            + ", ".join(sorted(known)),
        )
    values: dict[str, Any] = {}
    for name, value in raw.items():
        ftype = str(known[name].type)
        key = prefix + name
        if ftype in ("VolumeSettings", "DockerSettings", "WatchSettings"):
            values[name] = _build(globals()[ftype], value, source, key + ".")
            continue
        allowed = _TYPES[ftype]
        # bool is an int in Python; a JSON true must not pass as a size.
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(
                f"{source}: '{key}' must be {_TYPE_WORDS[ftype]}, got {json.dumps(value)}",
                "fix the value; nothing was changed",
            )
        if ftype == "tuple[str, ...]":
            assert isinstance(value, (list, tuple))
            if not all(isinstance(a, str) for a in value):
                raise ConfigError(
                    f"{source}: '{key}' must be a list of strings",
                    "fix the value; nothing was changed",
                )
            value = tuple(value)
        values[name] = value
    if "drive" in known and "drive" not in raw:
        raise ConfigError(f"{source}: 'drive' is missing", 'set "drive": "NAME"')
    return cls(**values)


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    return "null" if value is None else type(value).__name__


def _as_dict(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: _as_dict(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, tuple):
        return list(obj)
    return obj
