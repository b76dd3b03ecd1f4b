"""The agent's IMDS client against the real simulator over HTTP on 127.0.0.1."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import requests

from xdrive.agent.imds import (
    ImdsClient,
    InstanceIdentity,
    InterruptionNotice,
    MalformedNotice,
    RebalanceNotice,
    parse_instance_action,
    parse_rebalance,
)
from xdrive.errors import ImdsError
from xdrive.sandbox.imds import ImdsFaults, ImdsIdentity, ImdsServer

SPOT = ImdsIdentity(
    instance_id="i-0123456789abcdef0",
    availability_zone="eu-west-1b",
    region="eu-west-1",
    instance_type="g5.xlarge",
    life_cycle="spot",
)
TOKEN = "/latest/api/token"
META = "/latest/meta-data/"
ACTION = META + "spot/instance-action"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Sleeps:
    """Records backoff sleeps instead of sleeping: tests stay fast and can check them."""

    def __init__(self) -> None:
        self.calls: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.calls.append(seconds)


@pytest.fixture
def server_clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def imds(server_clock: FakeClock) -> Iterator[ImdsServer]:
    server = ImdsServer(SPOT, clock=server_clock).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sleeps() -> Sleeps:
    return Sleeps()


@pytest.fixture
def make_client(imds: ImdsServer, sleeps: Sleeps) -> Iterator:
    clients: list[ImdsClient] = []

    def make(**kwargs) -> ImdsClient:
        kwargs.setdefault("base_url", imds.url)
        kwargs.setdefault("timeout_s", 2.0)
        kwargs.setdefault("backoff_s", 0.05)
        kwargs.setdefault("sleep", sleeps)
        client = ImdsClient(**kwargs)
        clients.append(client)
        return client

    try:
        yield make
    finally:
        for client in clients:
            client.close()


def test_identity(make_client) -> None:
    assert make_client().identity() == InstanceIdentity(
        instance_id="i-0123456789abcdef0",
        availability_zone="eu-west-1b",
        region="eu-west-1",
        instance_type="g5.xlarge",
        life_cycle="spot",
    )


def test_identity_of_an_on_demand_instance(sleeps) -> None:
    ident = ImdsIdentity("i-1", "us-east-1a", "us-east-1", "t3.micro", "on-demand")
    with ImdsServer(ident) as server:
        client = ImdsClient(base_url=server.url, sleep=sleeps)
        try:
            assert client.identity().life_cycle == "on-demand"
        finally:
            client.close()


def test_identity_is_cached_but_notices_are_not(make_client, imds) -> None:
    client = make_client()
    first = client.identity()
    assert client.identity() is first
    assert imds.request_count(META + "instance-id") == 1

    assert client.interruption() is None
    assert client.interruption() is None
    issued = imds.issue_interruption("terminate")
    assert client.interruption() == InterruptionNotice("terminate", issued)
    assert imds.request_count(ACTION) == 3
    imds.clear_notices()
    assert client.interruption() is None


def test_never_reads_without_a_token_and_reuses_one_token(make_client, imds) -> None:
    client = make_client()
    client.identity()
    for _ in range(5):
        client.interruption()
        client.rebalance()
    assert imds.request_count(TOKEN) == 1
    assert 401 not in imds.status_counts()


def test_interruption_notice_carries_action_and_aware_utc_time(make_client, imds) -> None:
    client = make_client()
    at = datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc)
    imds.issue_interruption("hibernate", at=at)
    notice = client.interruption()
    assert notice == InterruptionNotice(action="hibernate", time=at)
    assert notice is not None and notice.time.utcoffset() is not None


def test_rebalance(make_client, imds) -> None:
    client = make_client()
    assert client.rebalance() is None
    at = imds.issue_rebalance()
    assert client.rebalance() == RebalanceNotice(notice_time=at)
    assert client.interruption() is None  # a rebalance is not an interruption


def test_token_renewed_before_it_expires(make_client, imds) -> None:
    clock = FakeClock()
    client = make_client(token_ttl_s=100, clock=clock)
    client.interruption()
    clock.now += 40  # still well inside the TTL
    client.interruption()
    assert imds.request_count(TOKEN) == 1
    clock.now += 20  # within the renewal margin of expiry
    client.interruption()
    assert imds.request_count(TOKEN) == 2
    assert 401 not in imds.status_counts()  # renewed before IMDS had to refuse it


def test_token_renewed_when_imds_expires_it_early(make_client, imds, server_clock) -> None:
    imds.set_faults(ImdsFaults(token_ttl_cap_s=1))
    client = make_client()
    assert client.interruption() is None
    server_clock.now += 2  # IMDS has dropped the token; the client still trusts it
    issued = imds.issue_interruption("stop")
    assert client.interruption() == InterruptionNotice("stop", issued)
    assert imds.request_count(TOKEN) == 2
    assert imds.status_counts()[401] == 1


def test_one_401_is_retried_once_with_a_new_token(make_client, imds, sleeps) -> None:
    client = make_client(attempts=1)
    client.interruption()
    issued = imds.issue_interruption()
    imds.set_faults(ImdsFaults(fail_next_reads_with_401=1))
    assert client.interruption() == InterruptionNotice("terminate", issued)
    assert imds.request_count(TOKEN) == 2
    assert sleeps.calls == []  # a 401 is fixed by a new token, not by waiting


def test_notice_caught_through_a_run_of_401s(make_client, imds) -> None:
    client = make_client(attempts=3)
    issued = imds.issue_interruption()
    imds.set_faults(ImdsFaults(fail_next_reads_with_401=5))
    assert client.interruption() == InterruptionNotice("terminate", issued)


def test_poll_loop_catches_notice_after_401s_outlast_one_call(make_client, imds) -> None:
    client = make_client(attempts=2)
    issued = imds.issue_interruption()
    imds.set_faults(ImdsFaults(fail_next_reads_with_401=10))
    outcomes: list[object] = []
    for _ in range(5):  # what the watch loop does every few seconds
        try:
            outcomes.append(client.interruption())
        except ImdsError as e:
            outcomes.append(e)
        if isinstance(outcomes[-1], InterruptionNotice):
            break
    assert outcomes[-1] == InterruptionNotice("terminate", issued)
    assert all(isinstance(o, ImdsError) for o in outcomes[:-1])
    assert len(outcomes) == 3  # each call spends at most 2 attempts x 2 reads


def test_disabled_imds_fails_fast_with_the_fix(make_client, imds, sleeps) -> None:
    imds.set_faults(ImdsFaults(disabled=True))
    client = make_client(attempts=5)
    with pytest.raises(ImdsError) as err:
        client.identity()
    assert "403" in err.value.problem
    assert "modify-instance-metadata-options" in err.value.fix
    assert "--http-endpoint enabled" in err.value.fix
    assert imds.request_counts() == {TOKEN: 1}  # one PUT, no retries, no tokenless reads
    assert sleeps.calls == []


def test_5xx_retried_with_backoff_then_succeeds(make_client, imds, sleeps) -> None:
    client = make_client(attempts=3, backoff_s=0.5)
    imds.set_faults(ImdsFaults(fail_next_reads_with_500=2))
    assert client.identity().instance_id == SPOT.instance_id
    assert sleeps.calls == [0.5, 1.0]


def test_5xx_until_attempts_run_out_is_an_imds_error(make_client, imds) -> None:
    client = make_client(attempts=3)
    imds.set_faults(ImdsFaults(error_rate=1.0))
    with pytest.raises(ImdsError) as err:
        client.interruption()
    assert imds.url + ACTION in err.value.problem
    assert "500" in err.value.problem
    assert "http-endpoint enabled" in err.value.fix
    assert imds.request_count(ACTION) == 3
    imds.clear_faults()
    assert client.interruption() is None  # the client recovers with the service


def test_slow_answers_time_out_are_retried_then_imds_error(make_client, imds) -> None:
    client = make_client(attempts=2, timeout_s=0.2)
    imds.set_faults(ImdsFaults(delay_s=3.0))
    with pytest.raises(ImdsError) as err:
        client.identity()
    assert "Timeout" in err.value.problem
    assert imds.request_count(TOKEN) == 2


def test_unreachable_endpoint_is_an_imds_error_naming_the_url(sleeps) -> None:
    server = ImdsServer(SPOT).start()
    url = server.url
    server.stop()  # nothing listens there any more
    client = ImdsClient(base_url=url, attempts=2, timeout_s=1.0, sleep=sleeps)
    try:
        with pytest.raises(ImdsError) as err:
            client.rebalance()
    finally:
        client.close()
    assert url in err.value.problem
    assert "2 times" in err.value.problem
    assert len(sleeps.calls) == 1


def test_proxy_environment_is_ignored(make_client, imds, monkeypatch) -> None:
    # IMDS refuses proxied token requests; a proxy that is down must not matter either.
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    with pytest.raises(requests.RequestException):  # what a default session would do
        requests.put(imds.url + TOKEN, timeout=2)
    assert make_client().identity().instance_id == SPOT.instance_id


def test_concurrent_callers_share_one_token(make_client, imds) -> None:
    client = make_client()
    errors: list[BaseException] = []

    def poll() -> None:
        try:
            for _ in range(5):
                client.interruption()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=poll) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert imds.request_count(TOKEN) == 1
    assert imds.request_count(ACTION) == 30


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ImdsClient(token_ttl_s=0)
    with pytest.raises(ValueError):
        ImdsClient(token_ttl_s=21601)
    with pytest.raises(ValueError):
        ImdsClient(attempts=0)


# -- malformed notices: an ImdsError, never "no notice" ----------------------------------


@pytest.mark.parametrize(
    "body",
    [
        "",
        "terminate",
        "[]",
        '{"time": "2017-09-18T08:22:00Z"}',
        '{"action": "reboot", "time": "2017-09-18T08:22:00Z"}',
        '{"action": "terminate"}',
        '{"action": "terminate", "time": "soon"}',
    ],
)
def test_malformed_instance_action_raises(body) -> None:
    with pytest.raises(MalformedNotice) as err:
        parse_instance_action(body)
    assert isinstance(err.value, ImdsError)
    assert err.value.path == "spot/instance-action"


def test_instance_action_parsing_is_lenient_where_it_is_safe() -> None:
    utc = datetime(2017, 9, 18, 8, 22, tzinfo=timezone.utc)
    extra = '{"action": "stop", "time": "2017-09-18T08:22:00Z", "new": 1}'
    assert parse_instance_action(extra) == InterruptionNotice("stop", utc)
    naive = '{"action": "stop", "time": "2017-09-18T08:22:00"}'
    assert parse_instance_action(naive).time == utc
    offset = '{"action": "stop", "time": "2017-09-18T10:22:00+02:00"}'
    assert parse_instance_action(offset).time == utc


def test_malformed_rebalance_raises() -> None:
    assert parse_rebalance('{"noticeTime": "2020-10-27T08:22:00Z"}') == RebalanceNotice(
        datetime(2020, 10, 27, 8, 22, tzinfo=timezone.utc)
    )
    with pytest.raises(MalformedNotice):
        parse_rebalance('{"notice": "2020-10-27T08:22:00Z"}')


class _GarbledHandler(BaseHTTPRequestHandler):
    """Answers like IMDS, but with a garbled interruption notice."""

    def do_PUT(self) -> None:
        self._reply(b"token")

    def do_GET(self) -> None:
        self._reply(b'{"action": "terminate", "ti')

    def _reply(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


def test_garbled_notice_over_http_is_an_imds_error_not_none(sleeps) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _GarbledHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    client = ImdsClient(base_url=f"http://127.0.0.1:{server.server_port}", sleep=sleeps)
    try:
        with pytest.raises(MalformedNotice):
            client.interruption()
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
