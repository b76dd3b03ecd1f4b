"""The IMDS simulator, driven with raw HTTP: it must behave like IMDSv2 for the agent's
client tests to mean anything."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone

import pytest
import requests

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


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def imds(clock: FakeClock) -> Iterator[ImdsServer]:
    server = ImdsServer(SPOT, clock=clock).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False
    try:
        yield session
    finally:
        session.close()


def put_token(
    http: requests.Session, imds: ImdsServer, ttl: str | None = "60"
) -> requests.Response:
    headers = {} if ttl is None else {"X-aws-ec2-metadata-token-ttl-seconds": ttl}
    return http.put(imds.url + TOKEN, headers=headers, timeout=5)


def token(http: requests.Session, imds: ImdsServer, ttl: str = "60") -> str:
    response = put_token(http, imds, ttl)
    assert response.status_code == 200
    return response.text


def get(http: requests.Session, imds: ImdsServer, path: str, tok: str | None) -> requests.Response:
    headers = {} if tok is None else {"X-aws-ec2-metadata-token": tok}
    return http.get(imds.url + META + path, headers=headers, timeout=5)


def test_url_is_loopback_with_a_real_port(imds: ImdsServer) -> None:
    assert imds.url.startswith("http://127.0.0.1:")
    assert int(imds.url.rsplit(":", 1)[1]) > 0


def test_token_put_returns_fresh_tokens_and_echoes_ttl(http, imds) -> None:
    first = put_token(http, imds, "21600")
    second = put_token(http, imds, "1")
    assert first.status_code == second.status_code == 200
    assert first.headers["Content-Type"].startswith("text/plain")
    assert first.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    assert second.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "1"
    assert len(first.text) >= 40 and first.text != second.text


@pytest.mark.parametrize("ttl", [None, "0", "21601", "-5", "abc", ""])
def test_token_ttl_outside_1_to_21600_is_400(http, imds, ttl) -> None:
    assert put_token(http, imds, ttl).status_code == 400


def test_token_other_method_is_405(http, imds) -> None:
    assert http.get(imds.url + TOKEN, timeout=5).status_code == 405


def test_proxied_token_request_is_refused(http, imds) -> None:
    response = http.put(
        imds.url + TOKEN,
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60", "X-Forwarded-For": "10.0.0.1"},
        timeout=5,
    )
    assert response.status_code == 403


def test_reads_need_a_valid_token(http, imds) -> None:
    assert get(http, imds, "instance-id", None).status_code == 401
    assert get(http, imds, "instance-id", "not-a-token").status_code == 401
    response = get(http, imds, "instance-id", token(http, imds))
    assert response.status_code == 200
    assert response.text == SPOT.instance_id
    assert response.headers["Content-Type"].startswith("text/plain")


def test_token_expires_after_its_ttl(http, imds, clock) -> None:
    tok = token(http, imds, "10")
    clock.now += 9
    assert get(http, imds, "instance-id", tok).status_code == 200
    clock.now += 1
    assert get(http, imds, "instance-id", tok).status_code == 401


def test_identity_paths(http, imds) -> None:
    tok = token(http, imds)
    expected = {
        "instance-id": SPOT.instance_id,
        "placement/availability-zone": SPOT.availability_zone,
        "placement/region": SPOT.region,
        "instance-type": SPOT.instance_type,
        "instance-life-cycle": "spot",
    }
    for path, value in expected.items():
        response = get(http, imds, path, tok)
        assert (response.status_code, response.text) == (200, value), path


def test_directory_listings(http, imds) -> None:
    tok = token(http, imds)
    root = get(http, imds, "", tok).text.split("\n")
    assert root == sorted(root)
    assert {"instance-id", "instance-type", "instance-life-cycle", "placement/"} <= set(root)
    assert "spot/" not in root  # appears only once AWS posts a notice
    for path in ("placement/", "placement"):
        assert get(http, imds, path, tok).text == "availability-zone\nregion"
    bare = http.get(imds.url + "/latest/meta-data", headers={"X-aws-ec2-metadata-token": tok})
    assert bare.text.split("\n") == root


def test_unknown_paths_are_404(http, imds) -> None:
    tok = token(http, imds)
    for path in ("no-such-thing", "placement/nothing", "instance-id/", "spot/instance-action"):
        assert get(http, imds, path, tok).status_code == 404, path
    assert http.get(imds.url + "/latest/user-data", timeout=5).status_code == 404
    assert http.get(imds.url + "/", timeout=5).status_code == 404


def test_interruption_notice_is_404_then_fixed_json(http, imds) -> None:
    tok = token(http, imds)
    assert get(http, imds, "spot/instance-action", tok).status_code == 404
    assert get(http, imds, "spot/termination-time", tok).status_code == 404

    at = datetime(2017, 9, 18, 8, 22, 0, 750000, tzinfo=timezone.utc)
    issued = imds.issue_interruption("stop", at=at)
    assert issued == at.replace(microsecond=0)

    for _ in range(2):  # the same notice on every read
        response = get(http, imds, "spot/instance-action", tok)
        assert response.status_code == 200
        assert json.loads(response.text) == {"action": "stop", "time": "2017-09-18T08:22:00Z"}
    assert get(http, imds, "spot/termination-time", tok).text == "2017-09-18T08:22:00Z"
    assert "spot/" in get(http, imds, "", tok).text.split("\n")
    assert get(http, imds, "spot/", tok).text == "instance-action\ntermination-time"

    imds.clear_notices()
    assert get(http, imds, "spot/instance-action", tok).status_code == 404


def test_interruption_defaults_to_two_minutes_ahead(http, imds) -> None:
    before = datetime.now(timezone.utc)
    issued = imds.issue_interruption()
    after = datetime.now(timezone.utc)
    assert before + timedelta(seconds=119) <= issued <= after + timedelta(seconds=120)
    tok = token(http, imds)
    body = json.loads(get(http, imds, "spot/instance-action", tok).text)
    assert body == {"action": "terminate", "time": issued.strftime("%Y-%m-%dT%H:%M:%SZ")}


def test_interruption_rejects_bad_input(imds) -> None:
    with pytest.raises(ValueError, match="spot action"):
        imds.issue_interruption("reboot")
    with pytest.raises(ValueError, match="timezone"):
        imds.issue_interruption(at=datetime(2030, 1, 1))


def test_on_demand_instances_get_no_spot_notices() -> None:
    on_demand = ImdsIdentity("i-1", "eu-west-1a", "eu-west-1", "t3.micro", "on-demand")
    server = ImdsServer(on_demand)  # not started: control methods need no server
    with pytest.raises(ValueError, match="on-demand"):
        server.issue_interruption()
    with pytest.raises(ValueError, match="on-demand"):
        server.issue_rebalance()


def test_rebalance_recommendation(http, imds) -> None:
    tok = token(http, imds)
    assert get(http, imds, "events/recommendations/rebalance", tok).status_code == 404
    imds.issue_rebalance(at=datetime(2020, 10, 27, 8, 22, tzinfo=timezone.utc))
    response = get(http, imds, "events/recommendations/rebalance", tok)
    assert json.loads(response.text) == {"noticeTime": "2020-10-27T08:22:00Z"}
    assert get(http, imds, "events/recommendations/", tok).text == "rebalance"
    assert get(http, imds, "spot/instance-action", tok).status_code == 404  # not an interruption
    imds.clear_notices()
    assert get(http, imds, "events/recommendations/rebalance", tok).status_code == 404


def test_disabled_refuses_tokens_with_403(http, imds) -> None:
    tok = token(http, imds)
    imds.set_faults(ImdsFaults(disabled=True))
    assert put_token(http, imds).status_code == 403
    imds.clear_faults()
    assert put_token(http, imds).status_code == 200
    assert get(http, imds, "instance-id", tok).status_code == 200


def test_token_ttl_cap_expires_tokens_early_while_echoing_the_asked_ttl(http, imds, clock) -> None:
    imds.set_faults(ImdsFaults(token_ttl_cap_s=1))
    response = put_token(http, imds, "21600")
    assert response.headers["X-aws-ec2-metadata-token-ttl-seconds"] == "21600"
    clock.now += 2
    assert get(http, imds, "instance-id", response.text).status_code == 401


def test_fail_next_reads_with_401_then_recovers(http, imds) -> None:
    tok = token(http, imds)
    imds.set_faults(ImdsFaults(fail_next_reads_with_401=3))
    codes = [get(http, imds, "instance-id", tok).status_code for _ in range(4)]
    assert codes == [401, 401, 401, 200]
    assert put_token(http, imds).status_code == 200  # the token PUT is not a read


def test_fail_next_reads_with_500_then_recovers(http, imds) -> None:
    tok = token(http, imds)
    imds.set_faults(ImdsFaults(fail_next_reads_with_500=2))
    codes = [get(http, imds, "instance-id", tok).status_code for _ in range(3)]
    assert codes == [500, 500, 200]


def test_error_rate_is_seeded_and_reproducible(http, imds) -> None:
    tok = token(http, imds)

    def run(seed: int) -> list[int]:
        imds.set_faults(ImdsFaults(error_rate=0.5, seed=seed))
        return [get(http, imds, "instance-id", tok).status_code for _ in range(30)]

    first = run(7)
    assert set(first) == {200, 500}
    assert run(7) == first
    imds.set_faults(ImdsFaults(error_rate=1.0))
    assert get(http, imds, "instance-id", tok).status_code == 500
    assert put_token(http, imds).status_code == 200  # error_rate spares the token PUT
    with pytest.raises(ValueError):
        imds.set_faults(ImdsFaults(error_rate=1.5))


def test_delay_makes_answers_slow(http, imds) -> None:
    tok = token(http, imds)
    imds.set_faults(ImdsFaults(delay_s=5.0))
    with pytest.raises(requests.Timeout):
        http.get(
            imds.url + META + "instance-id",
            headers={"X-aws-ec2-metadata-token": tok},
            timeout=0.2,
        )
    # stop() (in the fixture) must not wait out the delayed handler.


def test_counts_requests_by_path_and_status(http, imds) -> None:
    tok = token(http, imds)
    get(http, imds, "instance-id", tok)
    get(http, imds, "instance-id", None)
    get(http, imds, "spot/instance-action", tok)
    assert imds.request_count(TOKEN) == 1
    assert imds.request_count(META + "instance-id") == 2
    assert imds.request_counts()[META + "spot/instance-action"] == 1
    assert imds.status_counts() == {200: 2, 401: 1, 404: 1}
    imds.reset_counts()
    assert imds.request_counts() == {} and imds.status_counts() == {}


def test_concurrent_requests_are_all_served_and_counted(http, imds) -> None:
    tok = token(http, imds)
    codes: list[int] = []
    lock = threading.Lock()

    def worker() -> None:
        with requests.Session() as session:
            session.trust_env = False
            for _ in range(10):
                code = get(session, imds, "instance-id", tok).status_code
                with lock:
                    codes.append(code)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert codes == [200] * 80
    assert imds.request_count(META + "instance-id") == 80


def test_stop_frees_the_port(http) -> None:
    server = ImdsServer(SPOT).start()
    url = server.url
    server.stop()
    with pytest.raises(requests.ConnectionError):
        http.put(url + TOKEN, headers={"X-aws-ec2-metadata-token-ttl-seconds": "1"}, timeout=2)
    with pytest.raises(RuntimeError):
        _ = server.url
    server.stop()  # idempotent
