"""Where instances fetch the agent from: an S3 object the launcher uploads once per version.

The embedded agent does not fit in EC2's 16 KB of user-data, so user-data names an
``s3://`` URL and the archive's sha256 (cloudinit/bootstrap.py checks it). An ``s3://`` URL
is fetched with the instance profile and never expires, unlike a presigned https URL, so a
launch template can use it for as long as the Auto Scaling group replaces instances.

The key holds the version and the sha256, so one object never changes once written: an
upload is skipped when the object is there. The default bucket is private to the account
and region (``xdrive-agent-ACCOUNT-REGION``); the launcher creates it with every kind of
public access blocked, and names the expected owner on every object call, so a bucket of
the same name in another account is never written to or read from.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from botocore.exceptions import ClientError

from xdrive.cloudinit.bundle import AgentArchive
from xdrive.ec2 import aws_errors
from xdrive.errors import ConfigError
from xdrive.launcher.iam import AGENT_KEY_PREFIX


@dataclass(frozen=True)
class AgentObject:
    bucket: str
    key: str
    sha256: str
    version: str

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def default_bucket(account_id: str, region: str) -> str:
    return f"xdrive-agent-{account_id}-{region}"


def agent_object(archive: AgentArchive, bucket: str) -> AgentObject:
    key = f"{AGENT_KEY_PREFIX}{archive.version}/{archive.sha256}.tar.gz"
    return AgentObject(bucket, key, archive.sha256, archive.version)


def _code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def is_uploaded(s3: Any, target: AgentObject, owner: Optional[str]) -> bool:
    """Whether the object is there (False also when the bucket is not)."""
    extra = {"ExpectedBucketOwner": owner} if owner else {}
    with aws_errors("s3:GetObject"):
        try:
            s3.head_object(Bucket=target.bucket, Key=target.key, **extra)
        except ClientError as e:
            if _code(e) in ("404", "NoSuchKey", "NoSuchBucket", "NotFound"):
                return False
            if _code(e) in ("403", "AccessDenied"):
                raise _not_yours(target.bucket) from None
            raise
    return True


def _not_yours(bucket: str) -> ConfigError:
    return ConfigError(
        f"S3 bucket {bucket} belongs to another account, or you may not read it",
        "pass --agent-bucket with a bucket of your own, or allow s3:GetObject and "
        "s3:ListBucket on it (`xdrive iam-policy --role launcher`)",
    )


def ensure_bucket(s3: Any, bucket: str, region: str, owner: Optional[str]) -> bool:
    """Create the private bucket if it is not there; True if it was created."""
    extra = {"ExpectedBucketOwner": owner} if owner else {}
    with aws_errors("s3:ListBucket"):
        try:
            s3.head_bucket(Bucket=bucket, **extra)
            return False
        except ClientError as e:
            if _code(e) not in ("404", "NoSuchBucket", "NotFound"):
                if _code(e) in ("403", "AccessDenied"):
                    raise _not_yours(bucket) from None
                raise
    request: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":  # us-east-1 refuses its own name as a LocationConstraint
        request["CreateBucketConfiguration"] = {"LocationConstraint": region}
    with aws_errors("s3:CreateBucket"):
        try:
            s3.create_bucket(**request)
        except ClientError as e:
            if _code(e) == "BucketAlreadyExists":
                raise ConfigError(
                    f"S3 bucket name {bucket} is taken by another account",
                    "pass --agent-bucket with a bucket of your own",
                ) from None
            if _code(e) != "BucketAlreadyOwnedByYou":
                raise
    with aws_errors("s3:PutBucketPublicAccessBlock"):
        s3.put_public_access_block(
            Bucket=bucket,
            PublicAccessBlockConfiguration={
                "BlockPublicAcls": True,
                "IgnorePublicAcls": True,
                "BlockPublicPolicy": True,
                "RestrictPublicBuckets": True,
            },
            **extra,
        )
    return True


def upload_agent(
    s3: Any, archive: AgentArchive, target: AgentObject, region: str, owner: Optional[str]
) -> bool:
    """Put the archive at ``target`` unless it is there; True if it was uploaded."""
    if archive.sha256 != target.sha256:
        raise ValueError("the archive is not the one the target was named for")
    if is_uploaded(s3, target, owner):
        return False
    ensure_bucket(s3, target.bucket, region, owner)
    extra = {"ExpectedBucketOwner": owner} if owner else {}
    with aws_errors("s3:PutObject"):
        s3.put_object(
            Bucket=target.bucket,
            Key=target.key,
            Body=archive.data,
            ContentType="application/gzip",
            Metadata={"xdrive-version": archive.version, "sha256": archive.sha256},
            **extra,
        )
    return True
