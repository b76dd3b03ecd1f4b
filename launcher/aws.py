"""The launcher's connection to AWS: one boto3 session, the clients built from it.

Built once per command in the CLI and passed in (no module-level clients). The usual AWS
conventions hold: ``--region``/``AWS_REGION``/``AWS_DEFAULT_REGION``/the profile's region,
``--profile``/``AWS_PROFILE``, credentials from the standard chain, and an endpoint override
(``--endpoint-url``/``AWS_ENDPOINT_URL``) that points every service at the sandbox.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Optional

from botocore.config import Config
from botocore.exceptions import ProfileNotFound

from xdrive.ec2 import Ec2, aws_errors
from xdrive.errors import ConfigError


@dataclass(frozen=True)
class AwsTarget:
    """Where to talk to AWS. None everywhere: whatever the environment and config say."""

    region: Optional[str] = None
    profile: Optional[str] = None
    endpoint_url: Optional[str] = None


class Aws:
    """A boto3 session for one region and the clients the launcher uses."""

    def __init__(self, target: AwsTarget) -> None:
        import boto3  # here: `xdrive iam-policy` and `--help` never pay for it

        try:
            self.session = boto3.session.Session(
                profile_name=target.profile,
                region_name=target.region or os.environ.get("AWS_REGION") or None,
            )
        except ProfileNotFound:
            raise ConfigError(
                f"AWS profile {target.profile!r} is not configured",
                "check --profile / AWS_PROFILE, or run `aws configure --profile NAME`",
            ) from None
        region = self.session.region_name
        if not region:
            raise ConfigError(
                "no AWS region is set",
                "pass --region (for example --region us-east-1) or set AWS_REGION",
            )
        self.region: str = _known_region(self.session, region)
        self.endpoint_url = target.endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or None
        self._config = Config(
            retries={"mode": "adaptive", "max_attempts": 10}, connect_timeout=5, read_timeout=60
        )
        self._clients: dict[str, Any] = {}

    def client(self, service: str) -> Any:
        """One client per service for the life of this object."""
        if service not in self._clients:
            with aws_errors(f"{service} client"):
                self._clients[service] = self.session.client(
                    service,  # type: ignore[call-overload]
                    region_name=self.region,
                    endpoint_url=self.endpoint_url,
                    config=self._config,
                )
        return self._clients[service]

    @cached_property
    def ec2(self) -> Ec2:
        return Ec2(self.client("ec2"))

    @cached_property
    def account_id(self) -> str:
        with aws_errors("sts:GetCallerIdentity"):
            return str(self.client("sts").get_caller_identity()["Account"])


def _known_region(session: Any, region: str) -> str:
    """``region`` if botocore knows it in any partition, else a ConfigError naming the
    nearest (a typo would otherwise surface as a DNS failure, or as an empty drive list)."""
    known = {
        name
        for partition in session.get_available_partitions()
        for name in session.get_available_regions("ec2", partition_name=partition)
    }
    if region in known:
        return region
    near = sorted(difflib.get_close_matches(region, sorted(known), n=3, cutoff=0.8))
    hint = f"did you mean {' or '.join(near)}? " if near else ""
    raise ConfigError(
        f"unknown AWS region {region!r}",
        f"{hint}check --region / AWS_REGION / the profile's region (if it is a region newer "
        "than this botocore, upgrade boto3)",
    )
