"""An IMDSv2 simulator for one sandbox instance, with notices and faults driven from Python.

It answers like the real service (see shared/aws-facts.md): a token from
``PUT /latest/api/token``, every read under ``/latest/meta-data/`` needs that token,
notices are 404 until issued, directories list their children, text/plain bodies and
IMDS-style error pages. It deliberately shares no code with the agent's client
(``xdrive.agent.imds``): a shared parser or constant would hide the bugs this exists to find.

Faults (``ImdsFaults``) reproduce what real agents have tripped on: 5xx answers, slow
answers, IMDS turned off (403 on the token PUT), tokens dying early and runs of 401s with a
valid token (aws-node-termination-handler issues #229 and #668).
"""

from __future__ import annotations

import json
import logging
import random
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable, Literal, Optional

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server
from werkzeug.wrappers import Request, Response

log = logging.getLogger(__name__)

SpotAction = Literal["terminate", "stop", "hibernate"]
LifeCycle = Literal["spot", "on-demand"]

TOKEN_PATH = "/latest/api/token"
META_PREFIX = "/latest/meta-data"
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"
MAX_TTL_S = 21600
# AWS posts the spot notice about two minutes before it acts.
DEFAULT_NOTICE_LEAD = timedelta(seconds=120)
_SPOT_ACTIONS = ("terminate", "stop", "hibernate")


@dataclass(frozen=True)
class ImdsIdentity:
    """What the simulated instance reports about itself."""

    instance_id: str
    availability_zone: str
    region: str
    instance_type: str
    life_cycle: LifeCycle


@dataclass(frozen=True)
class RoleCredentials:
    """The temporary credentials of the instance profile's role, as IMDS hands them out
    under ``iam/security-credentials/ROLE`` (where boto3 on an instance finds them)."""

    role: str
    access_key_id: str
    secret_access_key: str
    token: str
    expiration: datetime

    @classmethod
    def issue(cls, role: str, access_key_id: str, lifetime: timedelta) -> RoleCredentials:
        """Fresh random secret and session token for ``access_key_id``."""
        return cls(
            role=role,
            access_key_id=access_key_id,
            secret_access_key=secrets.token_urlsafe(30),
            token=secrets.token_urlsafe(96),
            expiration=datetime.now(timezone.utc).replace(microsecond=0) + lifetime,
        )

    def secret_values(self) -> tuple[str, str]:
        """What must never be written anywhere: the secret key and the session token."""
        return (self.secret_access_key, self.token)


@dataclass(frozen=True)
class ImdsFaults:
    """Misbehaviour to inject; the default is a healthy service.

    ``error_rate`` and the ``fail_next_reads_*`` counters apply to metadata reads (GET),
    not to the token PUT; ``delay_s`` applies to every request. ``token_ttl_cap_s`` makes
    tokens die sooner than asked while the PUT still echoes the asked TTL, as a client
    cannot tell. ``seed`` reseeds the random source of ``error_rate`` so runs repeat.
    ``fail_next_reads_with_500`` is the deterministic twin of ``error_rate`` for tests.
    """

    error_rate: float = 0.0
    delay_s: float = 0.0
    disabled: bool = False
    token_ttl_cap_s: Optional[float] = None
    fail_next_reads_with_401: int = 0
    fail_next_reads_with_500: int = 0
    seed: int = 0


@dataclass(frozen=True)
class _Answer:
    status: int
    body: str = ""
    content_type: str = "text/plain"
    headers: tuple[tuple[str, str], ...] = ()


class _QuietHandler(WSGIRequestHandler):
    """werkzeug's handler without the per-request lines on stderr."""

    def log(self, type: str, message: str, *args: Any) -> None:
        log.debug("imds %s: " + message, type, *args)


class ImdsServer:
    """One instance's metadata service on ``host:port`` (port 0: a free one).

    Use ``start()``/``stop()`` or ``with ImdsServer(...) as imds:``. Control methods are
    thread-safe and take effect on the next request. ``clock`` (monotonic seconds) decides
    token expiry, so tests can expire tokens without sleeping.
    """

    def __init__(
        self,
        identity: ImdsIdentity,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.identity = identity
        self._host = host
        self._port = port
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._tokens: dict[str, float] = {}  # token -> expiry on self._clock
        self._issued: list[str] = []  # every token ever handed out (tests look for leaks)
        self._instance_action: Optional[tuple[SpotAction, datetime]] = None
        self._rebalance_at: Optional[datetime] = None
        self._role: Optional[RoleCredentials] = None
        self._faults = ImdsFaults()
        self._rng = random.Random(0)
        self._left_401 = 0
        self._left_500 = 0
        self._counts: Counter[str] = Counter()
        self._statuses: Counter[int] = Counter()
        self._server: Optional[BaseWSGIServer] = None
        self._thread: Optional[threading.Thread] = None

    # -- lifecycle -------------------------------------------------------------------

    def start(self) -> ImdsServer:
        if self._server is not None:
            raise RuntimeError("IMDS simulator already started")
        self._stopping.clear()
        server = make_server(
            self._host, self._port, self._wsgi, threaded=True, request_handler=_QuietHandler
        )
        thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"imds-{self.identity.instance_id}",
            daemon=True,
        )
        thread.start()
        self._server, self._thread = server, thread
        return self

    def stop(self) -> None:
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()  # wakes handlers sleeping in an injected delay
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        self._server = self._thread = None

    def __enter__(self) -> ImdsServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("IMDS simulator is not running: call start() first")
        return f"http://{self._host}:{self._server.server_port}"

    # -- control from Python ---------------------------------------------------------

    def issue_interruption(
        self, action: SpotAction = "terminate", at: Optional[datetime] = None
    ) -> datetime:
        """Post a spot interruption notice; return its time (UTC, whole seconds).

        The time is fixed now, like AWS does: later reads return the same notice.
        ``at`` defaults to now + 120 s. Only spot instances get notices.
        """
        if action not in _SPOT_ACTIONS:
            raise ValueError(f"spot action must be one of {_SPOT_ACTIONS}, not {action!r}")
        self._require_spot("a spot interruption notice")
        when = _notice_time(at, default_lead=DEFAULT_NOTICE_LEAD)
        with self._lock:
            self._instance_action = (action, when)
        return when

    def issue_rebalance(self, at: Optional[datetime] = None) -> datetime:
        """Post a rebalance recommendation (noticeTime defaults to now); return its time."""
        self._require_spot("a rebalance recommendation")
        when = _notice_time(at, default_lead=timedelta(0))
        with self._lock:
            self._rebalance_at = when
        return when

    def set_role(self, credentials: Optional[RoleCredentials]) -> None:
        """Attach an instance profile (its role's credentials), or detach it (None)."""
        with self._lock:
            self._role = credentials

    def clear_notices(self) -> None:
        with self._lock:
            self._instance_action = None
            self._rebalance_at = None

    def set_faults(self, faults: ImdsFaults) -> None:
        """Replace the injected faults; the 401/500 counters start over from ``faults``."""
        if not 0.0 <= faults.error_rate <= 1.0:
            raise ValueError(f"error_rate must be within 0..1, not {faults.error_rate}")
        with self._lock:
            self._faults = faults
            self._rng = random.Random(faults.seed)
            self._left_401 = faults.fail_next_reads_with_401
            self._left_500 = faults.fail_next_reads_with_500

    def clear_faults(self) -> None:
        self.set_faults(ImdsFaults())

    def issued_tokens(self) -> tuple[str, ...]:
        """Every session token handed out so far, expired ones included."""
        with self._lock:
            return tuple(self._issued)

    def role(self) -> Optional[RoleCredentials]:
        with self._lock:
            return self._role

    def request_counts(self) -> dict[str, int]:
        """Requests received so far by path (all methods, refused ones included)."""
        with self._lock:
            return dict(self._counts)

    def request_count(self, path: str) -> int:
        with self._lock:
            return self._counts[path]

    def status_counts(self) -> dict[int, int]:
        """Responses sent so far by HTTP status."""
        with self._lock:
            return dict(self._statuses)

    def reset_counts(self) -> None:
        with self._lock:
            self._counts.clear()
            self._statuses.clear()

    def _require_spot(self, what: str) -> None:
        if self.identity.life_cycle != "spot":
            raise ValueError(
                f"instance {self.identity.instance_id} is on-demand: AWS never sends it {what}"
            )

    # -- HTTP ------------------------------------------------------------------------

    def _wsgi(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        request = Request(environ)
        answer = self._answer(request)
        with self._lock:
            self._statuses[answer.status] += 1
        response = Response(answer.body, status=answer.status, content_type=answer.content_type)
        response.headers["Server"] = "EC2ws"
        for name, value in answer.headers:
            response.headers[name] = value
        return response(environ, start_response)

    def _answer(self, request: Request) -> _Answer:
        path = request.path
        with self._lock:
            self._counts[path] += 1
            delay = self._faults.delay_s
        if delay > 0:
            self._stopping.wait(delay)
        if path == TOKEN_PATH:
            if request.method != "PUT":
                return _error(405, headers=(("Allow", "PUT"),))
            return self._put_token(request)
        if path == META_PREFIX or path.startswith(META_PREFIX + "/"):
            if request.method != "GET":
                return _error(405, headers=(("Allow", "GET"),))
            return self._get_metadata(request, path[len(META_PREFIX) :].lstrip("/"))
        return _error(404)

    def _put_token(self, request: Request) -> _Answer:
        with self._lock:
            faults = self._faults
        if faults.disabled:
            return _error(403)
        # IMDS refuses token requests that went through a proxy.
        if "X-Forwarded-For" in request.headers:
            return _error(403)
        raw_ttl = request.headers.get(TTL_HEADER)
        if raw_ttl is None or not raw_ttl.strip().isdigit():
            return _error(400)
        ttl = int(raw_ttl)
        if not 1 <= ttl <= MAX_TTL_S:
            return _error(400)
        lifetime = float(ttl)
        if faults.token_ttl_cap_s is not None:
            lifetime = min(lifetime, faults.token_ttl_cap_s)
        token = secrets.token_urlsafe(42)
        now = self._clock()
        with self._lock:
            self._tokens = {t: exp for t, exp in self._tokens.items() if exp > now}
            self._tokens[token] = now + lifetime
            self._issued.append(token)
        return _Answer(200, token, headers=((TTL_HEADER, str(ttl)),))

    def _get_metadata(self, request: Request, rel: str) -> _Answer:
        token = request.headers.get(TOKEN_HEADER)
        now = self._clock()
        with self._lock:
            expiry = self._tokens.get(token) if token else None
            if expiry is None or expiry <= now:
                return _error(401)
            if self._left_401 > 0:
                self._left_401 -= 1
                return _error(401)
            if self._left_500 > 0:
                self._left_500 -= 1
                return _error(500)
            if self._faults.error_rate > 0 and self._rng.random() < self._faults.error_rate:
                return _error(500)
            leaves = self._leaves()
        return _lookup(leaves, rel)

    def _leaves(self) -> dict[str, str]:
        """Every metadata leaf that exists right now, by path below /latest/meta-data/."""
        ident = self.identity
        leaves = {
            "instance-id": ident.instance_id,
            "instance-type": ident.instance_type,
            "instance-life-cycle": ident.life_cycle,
            "placement/availability-zone": ident.availability_zone,
            "placement/region": ident.region,
        }
        if self._instance_action is not None:
            action, when = self._instance_action
            leaves["spot/instance-action"] = json.dumps({"action": action, "time": _iso(when)})
            leaves["spot/termination-time"] = _iso(when)
        if self._rebalance_at is not None:
            leaves["events/recommendations/rebalance"] = json.dumps(
                {"noticeTime": _iso(self._rebalance_at)}
            )
        if self._role is not None:
            leaves.update(_role_leaves(self._role))
        return leaves


def _lookup(leaves: dict[str, str], rel: str) -> _Answer:
    """A leaf's value, or a directory's listing (subdirectories end in '/'), or 404."""
    if rel in leaves:
        return _Answer(200, leaves[rel])
    prefix = rel.rstrip("/") + "/" if rel else ""
    children = set()
    for key in leaves:
        if key.startswith(prefix):
            head, sep, _ = key[len(prefix) :].partition("/")
            children.add(head + sep)
    if not children:
        return _error(404)
    return _Answer(200, "\n".join(sorted(children)))


def _role_leaves(role: RoleCredentials) -> dict[str, str]:
    updated = _iso(datetime.now(timezone.utc))
    info = {
        "Code": "Success",
        "LastUpdated": updated,
        "InstanceProfileArn": f"arn:aws:iam::123456789012:instance-profile/{role.role}",
        "InstanceProfileId": "AIPASANDBOXPROFILE01",
    }
    credentials = {
        "Code": "Success",
        "LastUpdated": updated,
        "Type": "AWS-HMAC",
        "AccessKeyId": role.access_key_id,
        "SecretAccessKey": role.secret_access_key,
        "Token": role.token,
        "Expiration": _iso(role.expiration),
    }
    return {
        "iam/info": json.dumps(info, indent=2),
        f"iam/security-credentials/{role.role}": json.dumps(credentials, indent=2),
    }


def _notice_time(at: Optional[datetime], default_lead: timedelta) -> datetime:
    if at is None:
        at = datetime.now(timezone.utc) + default_lead
    elif at.tzinfo is None:
        raise ValueError("notice time must be timezone-aware (UTC)")
    return at.astimezone(timezone.utc).replace(microsecond=0)


def _iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


_REASONS = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    500: "Internal Server Error",
}


def _error(status: int, headers: tuple[tuple[str, str], ...] = ()) -> _Answer:
    """An error page shaped like the ones IMDS sends (HTML, not the plain-text value)."""
    title = f"{status} - {_REASONS.get(status, 'Error')}"
    body = (
        '<?xml version="1.0" encoding="iso-8859-1"?>\n'
        '<!DOCTYPE html PUBLIC "-//W3C//DTD XHTML 1.0 Transitional//EN"\n'
        '\t"http://www.w3.org/TR/xhtml1/DTD/xhtml1-transitional.dtd">\n'
        '<html xmlns="http://www.w3.org/1999/xhtml" xml:lang="en" lang="en">\n'
        f" <head>\n  <title>{title}</title>\n </head>\n"
        f" <body>\n  <h1>{title}</h1>\n </body>\n</html>\n"
    )
    return _Answer(status, body, content_type="text/html", headers=headers)
