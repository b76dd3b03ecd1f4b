"""The agent's instance metadata client: IMDSv2 only, identity cached, notices never cached.

Rules (shared/aws-facts.md, and what ec2-metadata, cloud-init and
aws-node-termination-handler learned the hard way):
- every read carries a session token; there is never a tokenless (IMDSv1) GET;
- the token is cached, renewed shortly before its TTL runs out, and on a 401 it is dropped,
  a new one is fetched and the read is retried (missed notices after 401s: NTH #229, #668);
- 403 on the token PUT means IMDS is turned off (or a proxy was in the way): fail at once,
  retrying cannot help;
- connection errors, timeouts and 5xx are retried a bounded number of times with backoff;
- a 404 on a notice path means "no notice".
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable, Literal, Optional

import requests

from xdrive.errors import ImdsError

log = logging.getLogger(__name__)

SpotAction = Literal["terminate", "stop", "hibernate"]
LifeCycle = Literal["spot", "on-demand"]

DEFAULT_BASE_URL = "http://169.254.169.254"
TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data/"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TOKEN_TTL_S = 21600
# Renew this long before expiry, so a token never dies between our check and IMDS's.
MAX_RENEW_MARGIN_S = 60.0

_SPOT_ACTIONS: tuple[SpotAction, ...] = ("terminate", "stop", "hibernate")
_ENABLE_FIX = (
    "enable the instance metadata service: aws ec2 modify-instance-metadata-options "
    "--instance-id INSTANCE_ID --http-endpoint enabled --http-tokens required "
    "--http-put-response-hop-limit 2; and make sure no HTTP proxy sits between the agent "
    "and the metadata address (IMDS refuses proxied token requests)"
)


@dataclass(frozen=True)
class InstanceIdentity:
    instance_id: str
    availability_zone: str
    region: str
    instance_type: str
    life_cycle: LifeCycle


@dataclass(frozen=True)
class InterruptionNotice:
    """AWS will ``action`` this spot instance at ``time`` (aware, UTC)."""

    action: SpotAction
    time: datetime


@dataclass(frozen=True)
class RebalanceNotice:
    """AWS says this spot instance is at elevated risk of interruption since ``notice_time``."""

    notice_time: datetime


class MalformedNotice(ImdsError):
    """A notice path answered 200 with a body that is not the documented JSON.

    It is an ``ImdsError`` rather than "no notice": a 200 means AWS posted something, and
    reading it as None could let an interruption pass unnoticed. A watch loop that cannot
    tell may treat it on ``spot/instance-action`` as an interruption of unknown deadline.
    """

    def __init__(self, path: str, body: str, why: str) -> None:
        self.path = path
        self.body = body
        super().__init__(
            f"instance metadata {path} answered with an unreadable notice ({why}): {body[:200]!r}",
            "treat it as a notice of unknown deadline; report it if it persists",
        )


class _Retryable(Exception):
    """One attempt failed in a way that another attempt may fix."""


class ImdsClient:
    """Reads this instance's metadata over IMDSv2.

    ``attempts`` bounds tries per read for connection errors, timeouts and 5xx, with
    ``backoff_s`` doubling between them; within each attempt a 401 gets one token
    renewal and one re-read. ``clock`` (monotonic seconds) times the token, ``sleep`` the
    backoff: both are injectable for tests. Safe to share between threads.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        session: Optional[requests.Session] = None,
        token_ttl_s: int = MAX_TOKEN_TTL_S,
        timeout_s: float = 2.0,
        attempts: int = 3,
        backoff_s: float = 0.2,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not 1 <= token_ttl_s <= MAX_TOKEN_TTL_S:
            raise ValueError(f"token_ttl_s must be within 1..{MAX_TOKEN_TTL_S}, not {token_ttl_s}")
        if attempts < 1:
            raise ValueError(f"attempts must be at least 1, not {attempts}")
        self.base_url = base_url.rstrip("/")
        if session is None:
            session = requests.Session()
            # Like botocore: never send metadata requests through an HTTP(S)_PROXY.
            session.trust_env = False
        self._session = session
        self._token_ttl_s = token_ttl_s
        self._timeout_s = timeout_s
        self._attempts = attempts
        self._backoff_s = backoff_s
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._token: Optional[str] = None
        self._token_renew_at = 0.0
        self._identity: Optional[InstanceIdentity] = None

    def close(self) -> None:
        self._session.close()

    # -- what the agent asks -----------------------------------------------------------

    def identity(self) -> InstanceIdentity:
        """This instance's id, zone, region, type and life cycle; read once, then cached."""
        cached = self._identity
        if cached is not None:
            return cached
        raw_life_cycle = self._require("instance-life-cycle")
        life_cycle: LifeCycle = "spot" if raw_life_cycle == "spot" else "on-demand"
        if raw_life_cycle not in ("spot", "on-demand"):
            # e.g. "scheduled": not spot, so no spot notices; say so rather than fail the boot.
            log.warning("instance life cycle %r taken as on-demand", raw_life_cycle)
        ident = InstanceIdentity(
            instance_id=self._require("instance-id"),
            availability_zone=self._require("placement/availability-zone"),
            region=self._require("placement/region"),
            instance_type=self._require("instance-type"),
            life_cycle=life_cycle,
        )
        self._identity = ident
        return ident

    def interruption(self) -> Optional[InterruptionNotice]:
        """The spot interruption notice, or None if there is none (404). Never cached.

        Raises ``MalformedNotice`` (an ``ImdsError``) if the notice is there but unreadable.
        """
        path = "spot/instance-action"
        body = self.read(path)
        return None if body is None else parse_instance_action(body, path)

    def rebalance(self) -> Optional[RebalanceNotice]:
        """The rebalance recommendation, or None if there is none (404). Never cached.

        Raises ``MalformedNotice`` (an ``ImdsError``) if it is there but unreadable.
        """
        path = "events/recommendations/rebalance"
        body = self.read(path)
        return None if body is None else parse_rebalance(body, path)

    def read(self, path: str) -> Optional[str]:
        """The text at ``/latest/meta-data/<path>``, or None on 404. Raises ImdsError."""
        url = self.base_url + META_PREFIX + path.lstrip("/")
        last = ""
        for attempt in range(self._attempts):
            if attempt:
                self._sleep(self._backoff_s * 2 ** (attempt - 1))
            try:
                return self._read_once(url)
            except _Retryable as e:
                last = str(e)
                log.debug("IMDS %s attempt %d/%d failed: %s", url, attempt + 1, self._attempts, e)
        raise ImdsError(
            f"instance metadata at {url} failed {self._attempts} times (last: {last})",
            "check that this runs on an EC2 instance with the metadata service enabled "
            "(aws ec2 modify-instance-metadata-options --http-endpoint enabled), that the "
            "hop limit reaches this process (--http-put-response-hop-limit 2 in containers) "
            f"and that nothing firewalls {self.base_url}",
        )

    # -- HTTP ----------------------------------------------------------------------------

    def _require(self, path: str) -> str:
        value = self.read(path)
        if value is None:
            raise ImdsError(
                f"instance metadata has no {path} (404 at {self.base_url}{META_PREFIX}{path})",
                "check that the agent runs on an EC2 instance and talks to its metadata service",
            )
        return value.strip()

    def _read_once(self, url: str) -> Optional[str]:
        """One read; a 401 drops the token, gets a new one and reads once more."""
        for renewed in (False, True):
            token = self._current_token()
            response = self._send("GET", url, headers={TOKEN_HEADER: token})
            if response.status_code == 401:
                self._drop_token(token)
                if not renewed:
                    log.info("IMDS refused the session token (401): renewing it")
                continue
            if response.status_code == 404:
                return None
            if response.status_code == 200:
                return response.content.decode("utf-8", errors="replace")
            if response.status_code >= 500:
                raise _Retryable(f"HTTP {response.status_code} from {url}")
            raise ImdsError(
                f"instance metadata at {url} answered HTTP {response.status_code}",
                "this agent speaks IMDSv2; check the metadata options of the instance",
            )
        raise _Retryable(f"HTTP 401 from {url} even with a new session token")

    def _current_token(self) -> str:
        with self._lock:
            if self._token is not None and self._clock() < self._token_renew_at:
                return self._token
            self._token = None
            token, ttl = self._fetch_token()
            margin = min(MAX_RENEW_MARGIN_S, ttl / 2)
            self._token, self._token_renew_at = token, self._clock() + ttl - margin
            return token

    def _drop_token(self, token: str) -> None:
        with self._lock:
            if self._token == token:
                self._token = None

    def _fetch_token(self) -> tuple[str, float]:
        url = self.base_url + TOKEN_PATH
        response = self._send("PUT", url, headers={TTL_HEADER: str(self._token_ttl_s)})
        status = response.status_code
        if status == 403:
            raise ImdsError(
                f"instance metadata at {url} refused a session token (403)", _ENABLE_FIX
            )
        if status >= 500:
            raise _Retryable(f"HTTP {status} from {url}")
        token = response.content.decode("utf-8", errors="replace").strip()
        if status != 200 or not token:
            raise ImdsError(
                f"instance metadata at {url} answered HTTP {status} to a token request",
                "the agent needs IMDSv2 (session tokens); check the metadata options of the "
                "instance (aws ec2 describe-instances ... MetadataOptions)",
            )
        # IMDS echoes the TTL it granted; believe the shorter of asked and granted.
        granted = response.headers.get(TTL_HEADER, "")
        ttl = float(self._token_ttl_s)
        if granted.strip().isdigit():
            ttl = min(ttl, float(int(granted)))
        return token, ttl

    def _send(self, method: str, url: str, headers: dict[str, str]) -> requests.Response:
        try:
            return self._session.request(
                method, url, headers=headers, timeout=self._timeout_s, allow_redirects=False
            )
        except requests.RequestException as e:
            raise _Retryable(f"{type(e).__name__} talking to {url}: {e}") from e


# -- parsing (pure) ----------------------------------------------------------------------


def parse_instance_action(body: str, path: str = "spot/instance-action") -> InterruptionNotice:
    """``{"action": "terminate", "time": "2017-09-18T08:22:00Z"}`` -> InterruptionNotice.

    Unknown extra fields are ignored; a missing or unknown action or time raises
    ``MalformedNotice``.
    """
    doc = _json_object(body, path)
    action = doc.get("action")
    for known in _SPOT_ACTIONS:
        if action == known:
            return InterruptionNotice(action=known, time=_parse_time(doc.get("time"), body, path))
    raise MalformedNotice(path, body, f"unknown action {action!r}")


def parse_rebalance(body: str, path: str = "events/recommendations/rebalance") -> RebalanceNotice:
    """``{"noticeTime": "2020-10-27T08:22:00Z"}`` -> RebalanceNotice (or MalformedNotice)."""
    doc = _json_object(body, path)
    return RebalanceNotice(notice_time=_parse_time(doc.get("noticeTime"), body, path))


def _json_object(body: str, path: str) -> dict[str, object]:
    try:
        doc = json.loads(body)
    except ValueError as e:
        raise MalformedNotice(path, body, f"not JSON: {e}") from e
    if not isinstance(doc, dict):
        raise MalformedNotice(path, body, "not a JSON object")
    return doc


def _parse_time(value: object, body: str, path: str) -> datetime:
    """IMDS writes ``2017-09-18T08:22:00Z``; accept any ISO 8601 form, naive taken as UTC."""
    if not isinstance(value, str):
        raise MalformedNotice(path, body, f"time is {value!r}")
    text = value.strip()
    # Python 3.9's fromisoformat does not know the "Z" suffix.
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError as e:
        raise MalformedNotice(path, body, f"unreadable time {value!r}") from e
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=timezone.utc)
    return parsed.astimezone(timezone.utc)
