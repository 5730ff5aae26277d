"""API keys, per-key rate limits and what the audit log keeps of them: the pure parts with a fake clock, then the
app's answers to good and hostile `Authorization` headers, and `python -m orchestrator serve`'s warnings."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.errors import ApiKeyInvalid, ApiKeyMissing, RateLimited, TooManyInFlight
from orchestrator.security.access import ApiKeys, RateLimiter, key_id
from orchestrator.settings import AuditSettings, RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import Clock, FakeReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import data_url
from vision_stage.types import VisionRequest, VisionResult

KEY = "k-3f9a2c7e41b8d05e6f1a"
OTHER_KEY = "other-key-0123456789"
HASHED_KEY = "hashed-key-9876543210"
HASHED_DIGEST = hashlib.sha256(HASHED_KEY.encode()).hexdigest()
KEYS = f"{KEY}, sha256:{HASHED_DIGEST} ,{OTHER_KEY}"
PNG = png_bytes()
ANALYZE = {"question": "What is the total?", "image_url": data_url(PNG)}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def digest_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


# --- keys ------------------------------------------------------------------------------------------------------------


def test_keys_are_kept_as_digests_and_named_by_the_first_8_hex_digits() -> None:
    keys = ApiKeys.parse(KEYS + ", ," + KEY)
    assert keys.digests == tuple(hashlib.sha256(k.encode()).digest() for k in (KEY, HASHED_KEY, OTHER_KEY))
    assert keys.authenticate([f"Bearer {HASHED_KEY}".encode()]) == digest_id(HASHED_KEY)
    assert key_id(hashlib.sha256(KEY.encode()).digest()) == digest_id(KEY)
    assert KEY not in repr(keys)
    assert not ApiKeys.parse(None).enabled
    assert not ApiKeys.parse(" , ").enabled


@pytest.mark.parametrize("bad", ["sha256:abc", "sha256:" + "g" * 64, "key with spaces", "ключ", "a:b"])
def test_keys_no_bearer_header_could_carry_are_refused_at_startup(bad: str) -> None:
    with pytest.raises(ValueError, match="api_keys"):
        ApiKeys.parse(bad)
    with pytest.raises(ValueError, match="api_keys"):
        create_app(Settings(api_keys=bad), Backends(FakeVision(), FakeReasoning()))


def test_a_missing_header_and_a_wrong_key_are_told_apart() -> None:
    keys = ApiKeys.parse(KEY)
    with pytest.raises(ApiKeyMissing):
        keys.authenticate([])
    with pytest.raises(ApiKeyInvalid, match="not valid"):
        keys.authenticate([b"Bearer " + KEY.upper().encode()])


# --- the rate limiter ------------------------------------------------------------------------------------------------


def limiter(
    clock: Clock, rate: float = 2.0, burst: int = 3, concurrent: int = 10, max_clients: int = 100
) -> RateLimiter:
    settings = RateLimitSettings(requests_per_s=rate, burst=burst, max_concurrent=concurrent)
    return RateLimiter(settings, max_clients=max_clients, clock=clock)


def test_a_bucket_allows_its_burst_then_its_rate_and_says_when_the_next_token_comes() -> None:
    clock = Clock()
    limits = limiter(clock, rate=0.5, burst=3)
    for _ in range(3):
        limits.acquire("a")
        limits.release("a")
    with pytest.raises(RateLimited) as refused:
        limits.acquire("a")
    assert refused.value.retry_after_s == 2  # one token at 0.5 per second
    clock.now += 1.5
    with pytest.raises(RateLimited) as refused:
        limits.acquire("a")
    assert refused.value.retry_after_s == 1  # 0.75 of a token: 0.5 s to go, rounded up
    clock.now += 0.5
    limits.acquire("a")
    limits.acquire("b")  # another client has its own bucket


def test_requests_in_flight_are_capped_per_client_and_freed_on_release() -> None:
    limits = limiter(Clock(), burst=10, concurrent=2)
    limits.acquire("a")
    limits.acquire("a")
    with pytest.raises(TooManyInFlight) as refused:
        limits.acquire("a")
    assert refused.value.retry_after_s == 1
    limits.acquire("b")
    limits.release("a")
    limits.acquire("a")


def test_memory_is_bounded_idle_clients_are_forgotten_busy_ones_kept() -> None:
    clock = Clock()
    limits = limiter(clock, rate=1.0, burst=5, concurrent=2, max_clients=3)
    limits.acquire("busy")
    limits.acquire("busy")  # two in flight: at its limit
    for n in range(50):
        limits.acquire(f"client-{n}")
        limits.release(f"client-{n}")
        assert len(limits) <= 4  # the bound, plus the client in flight
    with pytest.raises(TooManyInFlight):
        limits.acquire("busy")  # its count survived the evictions
    clock.now += 60  # everyone idle has refilled: forgetting them loses nothing
    limits.release("busy")
    limits.release("busy")
    limits.acquire("late")
    assert len(limits) == 1


# --- through the app -------------------------------------------------------------------------------------------------


def app_client(tmp_path: Path | None = None, vision: FakeVision | None = None, **settings: Any) -> TestClient:
    if tmp_path is not None:
        settings["audit"] = AuditSettings(path=tmp_path / "audit.jsonl")
    app = create_app(Settings(**settings), Backends(vision or FakeVision(), FakeReasoning()))
    return TestClient(app, raise_server_exceptions=False)


@pytest.fixture
def secured() -> Iterator[TestClient]:
    with app_client(api_keys=KEYS) as client:
        yield client


def assert_refused(response: Any, status: int, type_: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["type"] == type_
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def test_open_paths_need_no_key_and_everything_else_does(secured: TestClient) -> None:
    for path in ("/health", "/openapi.json", "/docs", "/redoc"):
        assert secured.get(path).status_code == 200, path
    assert secured.get("/").status_code != 401
    assert secured.get("/web/app.js").status_code != 401
    for borrowed in ("/web/../v1/models", "/web/x/../../ready", "/web/", "/web/.hidden", "/web/a/b", "/health/x"):
        assert_refused(secured.get(borrowed), 401, "api_key_missing")
    for method, path in [("GET", "/ready"), ("GET", "/v1/models"), ("POST", "/v1/analyze"),
                         ("POST", "/v1/chat/completions"), ("GET", "/no-such-path"), ("GET", "/metrics")]:  # fmt: skip
        response = secured.request(method, path)
        assert_refused(response, 401, "api_key_missing")
        assert response.headers["www-authenticate"] == "Bearer"
    assert secured.get("/ready", headers=bearer(KEY)).status_code == 200
    assert secured.get("/no-such-path", headers=bearer(KEY)).status_code == 404


def test_each_configured_key_works_for_every_endpoint(secured: TestClient) -> None:
    for key in (KEY, HASHED_KEY, OTHER_KEY):
        assert secured.post("/v1/analyze", json=ANALYZE, headers=bearer(key)).status_code == 200
    chat = {"model": "auto", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(PNG)}}, {"type": "text", "text": "Total?"}]}]}  # fmt: skip
    assert secured.post("/v1/chat/completions", json=chat, headers=bearer(KEY)).status_code == 200
    assert secured.get("/v1/models", headers={"authorization": f"bearer {KEY}"}).status_code == 200


HOSTILE_AUTHORIZATION: list[tuple[str, list[tuple[bytes, bytes]]]] = [
    ("wrong key", [(b"Authorization", b"Bearer not-the-key")]),
    ("key in another case", [(b"Authorization", f"Bearer {KEY.upper()}".encode())]),
    ("key with padding", [(b"Authorization", f"Bearer {KEY}==".encode())]),
    ("key prefix", [(b"Authorization", f"Bearer {KEY[:-1]}".encode())]),
    ("key plus a byte", [(b"Authorization", f"Bearer {KEY}x".encode())]),
    ("the configured digest", [(b"Authorization", f"Bearer sha256:{HASHED_DIGEST}".encode())]),
    ("no scheme", [(b"Authorization", KEY.encode())]),
    ("basic scheme", [(b"Authorization", b"Basic dXNlcjpwYXNzd29yZA==")]),
    ("token scheme", [(b"Authorization", f"Token {KEY}".encode())]),
    ("scheme glued to the key", [(b"Authorization", f"Bearer{KEY}".encode())]),
    ("empty bearer", [(b"Authorization", b"Bearer")]),
    ("bearer and a space", [(b"Authorization", b"Bearer ")]),
    ("empty header", [(b"Authorization", b"")]),
    ("two tokens", [(b"Authorization", f"Bearer {KEY} {KEY}".encode())]),
    ("comma list", [(b"Authorization", f"Bearer {KEY}, Bearer {KEY}".encode())]),
    ("quoted key", [(b"Authorization", f'Bearer "{KEY}"'.encode())]),
    ("non-ASCII", [(b"Authorization", "Bearer clé-ключ".encode())]),
    ("latin-1 bytes", [(b"Authorization", b"Bearer \xe9\xff\xfe")]),
    ("NUL byte", [(b"Authorization", b"Bearer abc\x00def")]),
    ("oversized", [(b"Authorization", b"Bearer " + b"a" * 20_000)]),
    ("oversized valid prefix", [(b"Authorization", f"Bearer {KEY}".encode() + b"=" * 2000)]),
    ("two headers, one right", [(b"Authorization", f"Bearer {KEY}".encode()), (b"Authorization", b"Bearer nope")]),
    ("the same key twice", [(b"Authorization", f"Bearer {KEY}".encode())] * 2),
]  # fmt: skip


@pytest.mark.parametrize(("_", "headers"), HOSTILE_AUTHORIZATION, ids=[name for name, _ in HOSTILE_AUTHORIZATION])
def test_hostile_authorization_headers_get_a_401_and_never_a_5xx(
    secured: TestClient, _: str, headers: list[tuple[bytes, bytes]]
) -> None:
    for method, path in (("POST", "/v1/analyze"), ("GET", "/v1/models"), ("GET", "/ready")):
        response = secured.request(method, path, headers=headers, json=ANALYZE if method == "POST" else None)
        error = assert_refused(response, 401, "api_key_invalid")
        assert response.headers["www-authenticate"] == 'Bearer error="invalid_token"'
        assert KEY not in error["message"]


def test_without_keys_no_authorization_is_looked_at() -> None:
    with app_client() as client:
        assert client.get("/v1/models", headers={"Authorization": "Bearer anything"}).status_code == 200
        assert client.get("/v1/models", headers={b"Authorization": b"Basic \xff"}).status_code == 200


def test_the_openapi_description_names_the_bearer_key(secured: TestClient) -> None:
    spec = secured.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"] == {"bearer": {"type": "http", "scheme": "bearer"}}
    assert spec["paths"]["/v1/analyze"]["post"]["security"] == [{"bearer": []}]
    assert "security" not in spec["paths"]["/health"]["get"]


def test_requests_over_the_rate_are_refused_per_key_with_retry_after() -> None:
    limits = RateLimitSettings(requests_per_s=0.5, burst=2)
    with app_client(api_keys=KEYS, rate_limit=limits) as client:
        assert [client.get("/v1/models", headers=bearer(KEY)).status_code for _ in range(2)] == [200, 200]
        refused = client.get("/v1/models", headers=bearer(KEY))
        assert_refused(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "2"
        assert client.get("/v1/models", headers=bearer(OTHER_KEY)).status_code == 200
        assert client.get("/health").status_code == 200  # never limited


def test_without_keys_nothing_is_limited_unless_per_address_limits_are_on() -> None:
    with app_client(rate_limit=RateLimitSettings(requests_per_s=0.5, burst=1)) as client:
        assert [client.get("/v1/models").status_code for _ in range(5)] == [200] * 5
    with app_client(rate_limit=RateLimitSettings(requests_per_s=0.5, burst=1, per_address=True)) as client:
        assert client.get("/v1/models").status_code == 200
        assert_refused(client.get("/v1/models"), 429, "rate_limited")


def test_per_address_limits_with_keys_count_each_key_and_each_address() -> None:
    limits = RateLimitSettings(requests_per_s=0.5, burst=2, per_address=True)
    with app_client(api_keys=KEYS, rate_limit=limits) as client:  # one address, the test client's
        assert client.get("/v1/models", headers=bearer(KEY)).status_code == 200
        assert client.get("/v1/models", headers=bearer(OTHER_KEY)).status_code == 200
        assert_refused(client.get("/v1/models", headers=bearer(HASHED_KEY)), 429, "rate_limited")


@dataclass
class GatedVision(FakeVision):
    """Holds every request until `gate` is set; `entered` is set when one arrives."""

    entered: asyncio.Event = field(default_factory=asyncio.Event)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    async def generate(self, request: VisionRequest) -> VisionResult:
        self.entered.set()
        await self.gate.wait()
        return await super().generate(request)


async def test_requests_in_flight_are_capped_per_key() -> None:
    vision = GatedVision()
    settings = Settings(api_keys=KEYS, rate_limit=RateLimitSettings(max_concurrent=1))
    app = create_app(settings, Backends(vision, FakeReasoning()))
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://orchestrator") as client:
            first = asyncio.create_task(client.post("/v1/analyze", json=ANALYZE, headers=bearer(KEY)))
            await asyncio.wait_for(vision.entered.wait(), 10)
            refused = await client.get("/v1/models", headers=bearer(KEY))
            other = await client.get("/v1/models", headers=bearer(OTHER_KEY))
            vision.gate.set()
            assert (await first).status_code == 200
            after = await client.get("/v1/models", headers=bearer(KEY))
    assert_refused(refused, 429, "too_many_in_flight")
    assert refused.headers["retry-after"] == "1"
    assert (other.status_code, after.status_code) == (200, 200)


# --- the audit log ---------------------------------------------------------------------------------------------------


def records(tmp_path: Path) -> list[dict[str, Any]]:
    lines = (tmp_path / "audit.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]


def test_the_audit_log_names_the_key_by_its_id_and_audits_refusals_without_one(tmp_path: Path) -> None:
    limits = RateLimitSettings(requests_per_s=0.1, burst=1)
    with app_client(tmp_path, api_keys=KEYS, rate_limit=limits) as client:
        answered = client.post("/v1/analyze", json=ANALYZE, headers=bearer(KEY))
        throttled = client.post("/v1/analyze", json=ANALYZE, headers=bearer(KEY))
        missing = client.post("/v1/analyze", json=ANALYZE)
        wrong = client.post("/v1/analyze", json=ANALYZE, headers=bearer(KEY + "x"))
        client.get("/health")
    responses = [answered, throttled, missing, wrong]
    logged = records(tmp_path)
    assert [r["request_id"] for r in logged] == [r.headers["x-request-id"] for r in responses]
    assert [r["status"] for r in logged] == [200, 429, 401, 401]
    assert [r.get("key_id") for r in logged] == [digest_id(KEY), digest_id(KEY), None, None]
    assert all(r["client"] and r["endpoint"] == "POST /v1/analyze" for r in logged)
    assert logged[0]["answer"].startswith("sha256:")
    text = (tmp_path / "audit.jsonl").read_text(encoding="utf-8")
    assert KEY not in text
    assert "TOTAL 54.06" not in text


# --- the command line ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def taken_port() -> Iterator[int]:
    """A loopback port something listens on: a server started on it stops right after its startup logs."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def serve(port: int, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {name: value for name, value in os.environ.items() if name != "ORCH_API_KEYS"}
    environment |= {
        "ORCH_VISION__BACKEND": "remote",
        "ORCH_VISION__BASE_URL": "http://127.0.0.1:9/v1",
        "ORCH_VISION__MODEL": "m",
        "ORCH_REASONING__BACKEND": "none",
        "ORCH_ROUTER__KIND": "keyword",
        **env,
    }
    command = [sys.executable, "-m", "orchestrator", "serve", "--port", str(port), *args]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=60, check=False)


def test_serving_beyond_loopback_without_keys_warns_loudly(taken_port: int) -> None:
    exposed = serve(taken_port, "--host", "0.0.0.0")
    assert "BINDING 0.0.0.0 WITHOUT API KEYS" in exposed.stderr
    assert "NO API KEYS CONFIGURED" in exposed.stderr
    local = serve(taken_port)
    assert "BINDING" not in local.stderr
    assert f"starting on http://127.0.0.1:{taken_port}" in local.stderr
    assert "NO API KEYS CONFIGURED" in local.stderr
    keyed = serve(taken_port, "--host", "0.0.0.0", ORCH_API_KEYS=KEY)
    assert "API KEYS" not in keyed.stderr


def test_keys_that_do_not_parse_stop_the_start(taken_port: int) -> None:
    bad = serve(taken_port, ORCH_API_KEYS="sha256:nothex")
    assert bad.returncode == 2
    assert "invalid ORCH_API_KEYS" in bad.stderr


@dataclass
class BrokenVision(FakeVision):
    async def generate(self, request: VisionRequest) -> VisionResult:
        raise RuntimeError("a bug")


def test_a_request_that_fails_with_an_internal_error_is_audited_too(tmp_path: Path) -> None:
    with app_client(tmp_path, vision=BrokenVision(), api_keys=KEYS) as client:
        response = client.post("/v1/analyze", json=ANALYZE, headers=bearer(KEY))
    assert response.status_code == 500
    [record] = records(tmp_path)
    assert (record["status"], record["error"], record["key_id"]) == (500, "RuntimeError", digest_id(KEY))
