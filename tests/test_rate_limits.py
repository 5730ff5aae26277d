"""Rate limits as a client sees them: the defaults let a well-behaved client and a gateway through, per-address limits
find the real client behind trusted proxies (and only behind them), and no forwarded header can fail a request."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from orchestrator.api.app import create_app
from orchestrator.errors import RateLimited, TooManyInFlight
from orchestrator.security.access import ApiKeys, LocalLimiter, RateLimiter, SecurityMiddleware
from orchestrator.security.addresses import ClientAddresses
from orchestrator.settings import RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import Clock, FakeReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import data_url
from vision_stage.types import VisionRequest, VisionResult

KEY = "k-5d0c9e2a7f31b846"
IMAGE = data_url(png_bytes())
PROXY = "10.0.0.1"


# --- the limiter -----------------------------------------------------------------------------------------------------


def tight(clock: Clock, burst: int = 2, concurrent: int = 10, max_clients: int = 100) -> RateLimiter:
    settings = RateLimitSettings(requests_per_s=1.0, burst=burst, max_concurrent=concurrent)
    return RateLimiter(settings, max_clients=max_clients, clock=clock)


def test_the_default_limits_let_a_batch_of_64_at_concurrency_16_through_even_when_answered_at_once() -> None:
    limits = RateLimiter(RateLimitSettings(), clock=Clock())  # a frozen clock: every answer is instant
    for _ in range(64 // 16):
        for _ in range(16):
            limits.acquire("key:a")
        for _ in range(16):
            limits.release("key:a")


def test_the_default_limits_still_hold_a_flood_and_a_pile_of_requests_in_flight() -> None:
    clock = Clock()
    limits = RateLimiter(RateLimitSettings(), clock=clock)

    def admitted(attempts: int) -> int:
        count = 0
        for _ in range(attempts):
            try:
                limits.acquire("key:flood")
            except RateLimited:
                continue
            limits.release("key:flood")
            count += 1
        return count

    assert admitted(1000) == 200  # the burst
    clock.now += 10
    assert admitted(1000) == 200  # 10 s at 50 per second refill the bucket, and it holds no more than the burst
    clock.now += 1
    assert admitted(1000) == 50
    clock.now += 60
    for _ in range(32):
        limits.acquire("key:busy")
    with pytest.raises(TooManyInFlight):
        limits.acquire("key:busy")


def test_a_request_counted_against_a_key_and_an_address_needs_room_in_both_and_takes_from_both_or_neither() -> None:
    limits = tight(Clock(), burst=2)
    limits.acquire("key:a", "address:198.51.100.1")
    limits.release("key:a", "address:198.51.100.1")
    limits.acquire("key:b", "address:198.51.100.1")
    limits.release("key:b", "address:198.51.100.1")
    with pytest.raises(RateLimited, match="this client address"):
        limits.acquire("key:c", "address:198.51.100.1")  # the address's bucket is empty
    for _ in range(2):  # key:c's tokens were left alone by the refusal
        limits.acquire("key:c", "address:198.51.100.2")
    with pytest.raises(RateLimited, match="this API key"):
        limits.acquire("key:c", "address:198.51.100.3")
    limits.acquire("key:d", "address:198.51.100.3")  # and so were that address's


def test_in_flight_counts_are_kept_per_key_and_per_address() -> None:
    limits = tight(Clock(), burst=10, concurrent=1)
    limits.acquire("key:a", "address:198.51.100.1")
    with pytest.raises(TooManyInFlight, match="this client address"):
        limits.acquire("key:b", "address:198.51.100.1")
    with pytest.raises(TooManyInFlight, match="this API key"):
        limits.acquire("key:a", "address:198.51.100.2")
    limits.release("key:a", "address:198.51.100.1")
    limits.acquire("key:b", "address:198.51.100.1")


def test_the_clients_of_a_request_in_flight_survive_the_memory_bound() -> None:
    limits = tight(Clock(), burst=100, concurrent=1, max_clients=1)
    limits.acquire("key:a", "address:198.51.100.1")
    for n in range(20):
        limits.acquire(f"key:{n}", f"address:203.0.113.{n}")
        limits.release(f"key:{n}", f"address:203.0.113.{n}")
        assert len(limits) <= 4  # the two clients in flight and the last request's two: nothing idle is kept
    with pytest.raises(TooManyInFlight):
        limits.acquire("key:z", "address:198.51.100.1")


# --- the client's address --------------------------------------------------------------------------------------------


def xff(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"x-forwarded-for", value.encode()) for value in values]


BEHIND_PROXIES = ClientAddresses.from_settings(RateLimitSettings(trusted_proxies="10.0.0.0/8, 192.168.7.7, fd00::/8"))


@pytest.mark.parametrize(
    ("peer", "headers", "client"),
    [
        ("203.0.113.5", xff("198.51.100.1"), "203.0.113.5"),  # an untrusted peer's header is the client's own word
        (PROXY, [], PROXY),  # the proxy's own request (a health check)
        (PROXY, xff("198.51.100.1"), "198.51.100.1"),
        (PROXY, xff("198.51.100.66, 198.51.100.1"), "198.51.100.1"),  # the client sent one; the proxy appended
        (PROXY, xff("198.51.100.66, 198.51.100.1, 10.2.3.4, 192.168.7.7"), "198.51.100.1"),  # a chain of proxies
        (PROXY, xff("198.51.100.66", "198.51.100.1"), "198.51.100.1"),  # several fields: one list, in order
        (PROXY, xff("10.9.9.9, 10.2.3.4"), "10.9.9.9"),  # all proxies: the farthest
        (PROXY, xff("198.51.100.1:50123"), "198.51.100.1"),
        (PROXY, xff(" 198.51.100.1 "), "198.51.100.1"),
        (PROXY, xff("2001:db8:1:2:aaaa::5"), "2001:db8:1:2::/64"),
        (PROXY, xff("[2001:db8:1:2::5]:443"), "2001:db8:1:2::/64"),
        (PROXY, xff("::ffff:198.51.100.1"), "198.51.100.1"),
        ("::ffff:10.0.0.1", xff("198.51.100.1"), "198.51.100.1"),  # a dual-stack server's view of an IPv4 proxy
        ("fd00::7", xff("2001:db8::9, fd12::1"), "2001:db8::/64"),
        ("2001:db8:5:6::1", xff("198.51.100.1"), "2001:db8:5:6::/64"),  # untrusted IPv6 peer, by its /64
        ("testclient", xff("198.51.100.1"), "testclient"),  # a peer that is not an address is counted as named
    ],
)
def test_the_client_is_the_right_most_address_no_trusted_proxy_wrote_and_only_behind_one(
    peer: str, headers: list[tuple[bytes, bytes]], client: str
) -> None:
    assert BEHIND_PROXIES.client(peer, headers) == client


def test_without_a_peer_address_requests_share_one_client() -> None:
    assert BEHIND_PROXIES.client(None, xff("198.51.100.1")) == "-"


def test_ipv6_clients_are_counted_by_their_configured_prefix() -> None:
    per_host = ClientAddresses.from_settings(RateLimitSettings(ipv6_prefix=128))
    per_site = ClientAddresses.from_settings(RateLimitSettings(ipv6_prefix=48))
    assert per_host.client("2001:db8:1:2::5", []) == "2001:db8:1:2::5"
    assert per_site.client("2001:db8:1:2::5", []) == per_site.client("2001:db8:1:ffff::9", []) == "2001:db8:1::/48"
    assert per_site.client("2001:db8:2::5", []) == "2001:db8:2::/48"


def forwarded(*values: str) -> list[tuple[bytes, bytes]]:
    return [(b"forwarded", value.encode()) for value in values]


RFC_7239 = ClientAddresses.from_settings(RateLimitSettings(trusted_proxies="10.0.0.0/8", forwarded_header="forwarded"))


@pytest.mark.parametrize(
    ("headers", "client"),
    [
        (forwarded("for=198.51.100.1"), "198.51.100.1"),
        (forwarded("For=198.51.100.1;proto=https;by=10.0.0.1"), "198.51.100.1"),
        (forwarded('for="[2001:db8:cafe::17]:4711"'), "2001:db8:cafe::/64"),
        (forwarded('for="198.51.100.66", for=198.51.100.1;proto=http, for=10.3.3.3'), "198.51.100.1"),
        (forwarded("for=198.51.100.66", "for=198.51.100.1"), "198.51.100.1"),
        (forwarded("proto=https;host=example.com;for=198.51.100.1"), "198.51.100.1"),
        (xff("198.51.100.1"), PROXY),  # the other header: a client could have sent it
    ],
)
def test_the_forwarded_header_is_read_when_configured(headers: list[tuple[bytes, bytes]], client: str) -> None:
    assert RFC_7239.client(PROXY, headers) == client


def test_x_forwarded_for_ignores_a_forwarded_header() -> None:
    assert BEHIND_PROXIES.client(PROXY, forwarded("for=198.51.100.1")) == PROXY


GARBAGE = [
    "",
    ",",
    " , ,",
    "garbage",
    "unknown",
    "_hidden",
    "198.51.100.1, garbage",
    "198.51.100.1,",
    "999.1.1.1",
    "01.02.03.04",
    "198.51.100.1:99999999",
    "198.51.100.1:",
    "198.51.100.1:http",
    "198.51.100.1 198.51.100.2",
    "[2001:db8::1",
    "[2001:db8::1]x",
    "[2001:db8::1]:",
    "[198.51.100.1]:80:80",
    ":::::",
    "2001:db8::1::2",
    "fe80::1%",
    "for=198.51.100.1",
    '"198.51.100.1"',
    "\x00198.51.100.1",
    "١٩٨.٥١.١٠٠.١",
    "198.51.100.1\xff\xfe",
    "198.51.100.1, " * 2000 + "garbage",
]
FORWARDED_GARBAGE = [
    "",
    "for=",
    "for",
    "=",
    ";;;,,,",
    "proto=https",
    "for=unknown",
    "for=_gazonk",
    'for="[2001:db8::1',
    'for="198.51.100.1',
    "for=198.51.100.1;for=198.51.100.2",
    "for=[2001:db8::1",
    "198.51.100.1",
    'for="\\"\\""',
    "for=198.51.100.1, for=garbage",
]


@pytest.mark.parametrize("value", GARBAGE, ids=range(len(GARBAGE)))
def test_an_unreadable_x_forwarded_for_counts_against_the_proxy(value: str) -> None:
    assert BEHIND_PROXIES.client(PROXY, xff(value)) == PROXY


@pytest.mark.parametrize("value", FORWARDED_GARBAGE, ids=range(len(FORWARDED_GARBAGE)))
def test_an_unreadable_forwarded_header_counts_against_the_proxy(value: str) -> None:
    assert RFC_7239.client(PROXY, forwarded(value)) == PROXY


def test_garbage_left_of_the_client_the_proxy_appended_changes_nothing() -> None:
    assert BEHIND_PROXIES.client(PROXY, xff("garbage, unknown, 198.51.100.1")) == "198.51.100.1"
    assert RFC_7239.client(PROXY, forwarded('for="[oops, for=198.51.100.1')) == "198.51.100.1"


@pytest.mark.parametrize("proxies", ["proxy.internal", "10.0.0.0/33", "10.0.0.1, ::g", "10.0.0.0/8;192.168.0.0/16"])
def test_trusted_proxies_that_are_not_addresses_stop_the_start(proxies: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_RATE_LIMIT__TRUSTED_PROXIES", proxies)
    with pytest.raises(ValidationError, match="trusted_proxies"):
        Settings()


# --- through the app -------------------------------------------------------------------------------------------------


@dataclass
class SlowVision(FakeVision):
    """Takes a moment over each request, and notes the most it had at once."""

    running: int = 0
    peak: int = 0

    async def generate(self, request: VisionRequest) -> VisionResult:
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(0.02)
            return await super().generate(request)
        finally:
            self.running -= 1


async def statuses(app: Any, requests: int, concurrency: int, peer: str = PROXY, **headers: str) -> list[int]:
    """`requests` different questions about one image from one client, `concurrency` at a time."""
    gate = asyncio.Semaphore(concurrency)
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://o") as client:

        async def ask(n: int) -> int:
            async with gate:
                body = {"question": f"What is the total on receipt {n}?", "image_url": IMAGE}
                return (await client.post("/v1/analyze", json=body, headers=headers)).status_code

        return list(await asyncio.gather(*(ask(n) for n in range(requests))))


async def test_with_default_settings_and_no_keys_64_requests_at_concurrency_16_are_all_answered() -> None:
    vision = SlowVision()
    app = create_app(Settings(), Backends(vision, FakeReasoning()))
    assert await statuses(app, 64, 16) == [200] * 64
    assert vision.peak == 16  # they really were 16 at a time


async def test_with_default_limits_one_key_sends_64_requests_at_concurrency_16_without_a_429() -> None:
    vision = SlowVision()
    app = create_app(Settings(api_keys=KEY), Backends(vision, FakeReasoning()))
    assert await statuses(app, 64, 16, authorization=f"Bearer {KEY}") == [200] * 64
    assert vision.peak == 16


def per_address_app() -> Any:
    limits = RateLimitSettings(per_address=True, trusted_proxies="10.0.0.0/8", requests_per_s=0.001, burst=2)
    return create_app(Settings(rate_limit=limits), Backends(FakeVision(), FakeReasoning()))


async def get_models(app: Any, peer: str, *forwarded_for: str) -> httpx.Response:
    transport = httpx.ASGITransport(app=app, client=(peer, 50000))
    async with httpx.AsyncClient(transport=transport, base_url="http://o") as client:
        headers = [("X-Forwarded-For", value) for value in forwarded_for]
        return await client.get("/v1/models", headers=headers)


async def test_per_address_limits_behind_a_trusted_proxy_count_each_forwarded_client_apart() -> None:
    app = per_address_app()
    async with app.router.lifespan_context(app):
        first = [(await get_models(app, PROXY, "198.51.100.1")).status_code for _ in range(2)]
        refused = await get_models(app, PROXY, "198.51.100.1")
        spoofed = await get_models(app, PROXY, "203.0.113.77, 198.51.100.1")  # a made-up hop gets it nowhere
        other = [(await get_models(app, "10.0.0.2", "198.51.100.2")).status_code for _ in range(2)]
    assert first == [200, 200]
    assert (refused.status_code, refused.json()["error"]["type"]) == (429, "rate_limited")
    assert int(refused.headers["retry-after"]) >= 1
    assert spoofed.status_code == 429
    assert other == [200, 200]


async def test_per_address_limits_ignore_the_header_of_a_peer_that_is_not_a_trusted_proxy() -> None:
    app = per_address_app()
    async with app.router.lifespan_context(app):
        codes = [(await get_models(app, "203.0.113.5", f"198.51.100.{n}")).status_code for n in range(3)]
    assert codes == [200, 200, 429]


async def test_unreadable_forwarded_headers_are_never_a_5xx() -> None:
    app = per_address_app()
    async with app.router.lifespan_context(app):
        codes = [(await get_models(app, PROXY, value)).status_code for value in GARBAGE[:6]]
    assert codes == [200, 200, 429, 429, 429, 429]  # all counted against the proxy's address


# --- in flight -------------------------------------------------------------------------------------------------------


async def test_a_client_that_has_its_answer_may_send_the_next_request_at_once() -> None:
    """The in-flight count drops as the last byte goes out, not after: with a limit of one, a client that sends its
    next request the moment it holds an answer is never told `too_many_in_flight`."""

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok", "more_body": False})

    async def refuse(scope: Any, receive: Any, send: Any, error: Exception) -> None:
        await send({"type": "http.response.start", "status": 429, "headers": []})
        await send({"type": "http.response.body", "body": type(error).__name__.encode()})

    limiter = RateLimiter(RateLimitSettings(max_concurrent=1))
    middleware = SecurityMiddleware(app, ApiKeys.parse(KEY), LocalLimiter(limiter), refuse, ClientAddresses())
    scope = {"type": "http", "path": "/v1/models", "headers": [(b"authorization", f"Bearer {KEY}".encode())]}
    answers: list[tuple[int, bytes]] = []

    async def client(message: Any) -> None:
        if message["type"] == "http.response.start":
            answers.append((message["status"], b""))
        elif not message.get("more_body") and len(answers) < 3:
            await middleware(dict(scope), receive, client)  # the next request, sent on receipt of the answer

    async def receive() -> Any:
        return {"type": "http.request", "body": b""}

    await middleware(dict(scope), receive, client)
    assert [status for status, _ in answers] == [200, 200, 200]
