"""The launcher's connection to AWS: one boto3 session, the clients built from it.

Built once per command in the CLI and passed in (no module-level clients). The usual AWS
conventions hold: ``--region``/``AWS_REGION``/``AWS_DEFAULT_REGION``/the profile's region,
``--profile``/``AWS_PROFILE``, credentials from the standard chain, and an endpoint override
(``--endpoint-url``/``AWS_ENDPOINT_URL``) that points every service at the sandbox.
"""

from __future__ import annotations

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
        self.region: str = region
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
