"""No credential ever goes into user-data: the instance gets its AWS access from its profile.

User-data is readable by every process on the instance (through IMDS) and by anyone allowed
``ec2:DescribeInstanceAttribute``, and it lives on in launch templates. The check looks for
AWS access key ids, the names of secret settings, private keys, and the values of the AWS
credential variables of the launcher's own environment. Findings name the kind and the
place, never the value.

A presigned URL carries the signer's access key id, a signature and, for temporary
credentials, the session token. That is by design: it grants one GET of one object until
it expires, and the secret key never leaves the signer. Those query parameters are left out
of the check; anywhere else in the URL the same strings are refused.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from xdrive.errors import XdriveError

_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("an AWS access key id", re.compile(r"(?<![A-Z0-9])(?:AKIA|ASIA)[A-Z0-9]{16}(?![A-Z0-9])")),
    (
        "an AWS secret setting",
        re.compile(
            r"aws_secret_access_key|aws_session_token|aws_security_token|secretaccesskey"
            r"|x-amz-security-token",
            re.IGNORECASE,
        ),
    ),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
)
CREDENTIAL_VARIABLES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)
_MIN_SECRET_LENGTH = 16  # shorter variable values would match by chance
# Query parameters of SigV4 and SigV2 presigned URLs.
PRESIGNED_PARAMETERS = frozenset(
    {"x-amz-credential", "x-amz-signature", "x-amz-security-token", "awsaccesskeyid", "signature"}
)


class CredentialsInUserData(XdriveError):
    """Rendering refused: something that looks like a credential would be in user-data."""

    def __init__(self, where: str, what: str) -> None:
        self.where = where
        self.what = what
        super().__init__(
            f"refusing to render user-data: {where} contains {what}",
            "remove it; the instance gets AWS access from its instance profile, never from "
            "user-data (anyone who can read user-data could use it)",
        )


def find_credentials(text: str, environ: Mapping[str, str]) -> Optional[str]:
    """What kind of credential ``text`` contains, or None."""
    for what, pattern in _PATTERNS:
        if pattern.search(text):
            return what
    for name in CREDENTIAL_VARIABLES:
        value = environ.get(name, "")
        if len(value) >= _MIN_SECRET_LENGTH and value in text:
            return f"the value of ${name}"
    return None


def without_presigned_parameters(url: str) -> str:
    """``url`` without the parameters that sign a presigned URL."""
    parts = urllib.parse.urlsplit(url)
    query = [
        (k, v)
        for k, v in urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        if k.lower() not in PRESIGNED_PARAMETERS
    ]
    return urllib.parse.urlunsplit(parts._replace(query=urllib.parse.urlencode(query)))


def check_config(config: Mapping[str, Any], environ: Mapping[str, str]) -> None:
    """Refuse credentials in any value of the agent config (as its JSON object)."""
    for key, value in _leaves(config, ""):
        what = find_credentials(value, environ)
        if what:
            raise CredentialsInUserData(f"the agent config field '{key}'", what)


def check_url(url: str, environ: Mapping[str, str]) -> None:
    what = find_credentials(without_presigned_parameters(url), environ)
    if what:
        raise CredentialsInUserData("the agent URL", what)


def check_document(text: str, url: Optional[str], environ: Mapping[str, str]) -> None:
    """The last net, over all of user-data (the checked URL's signature left out)."""
    if url:
        text = text.replace(url, without_presigned_parameters(url))
    what = find_credentials(text, environ)
    if what:
        raise CredentialsInUserData("the user-data", what)


def _leaves(node: Any, key: str) -> Iterator[tuple[str, str]]:
    """(dotted key, string value) of every string in a JSON-like tree."""
    if isinstance(node, Mapping):
        for name, value in node.items():
            yield from _leaves(value, f"{key}.{name}" if key else str(name))
    elif isinstance(node, (list, tuple)):
        for value in node:
            yield from _leaves(value, key)
    elif isinstance(node, str):
        yield key, node
