"""Who may call the API and how often: API keys, per-key rate limits, and the middleware that enforces both.

- `ApiKeys` (pure): the configured keys (`api_keys`, comma-separated; `sha256:<hex>` entries are a key's digest),
  kept only as SHA-256 digests. A presented key is hashed and compared with every digest in constant time, so
  neither the comparison nor the configuration leaks a key; a key's id in logs and the audit log is the first 8 hex
  digits of its digest.
- `RateLimiter` (pure, clock injected): per client, a token bucket of `rate_limit.burst` requests refilled at
  `rate_limit.requests_per_s`, and at most `rate_limit.max_concurrent` requests in flight. A request counts against
  its key (`key:<id>`, when keys are configured) and, when `rate_limit.per_address` is on, its client's address
  (`address:<address>`), each with its own bucket: it is let through only if every one of them has room. It
  remembers at most `max_clients` clients; an idle client whose bucket has refilled is forgotten first (forgetting it
  changes nothing), and past the bound the least recently seen idle ones are. A client's address is
  `orchestrator.security.addresses.ClientAddresses`'s.
- `SecurityMiddleware` (ASGI): every path but the open ones (`is_open`) needs `Authorization: Bearer <key>` when
  keys are configured (401 `api_key_missing` / `api_key_invalid`, with `WWW-Authenticate`), then passes the limiter
  (429 `rate_limited` / `too_many_in_flight`, with `Retry-After`). Without keys and without `per_address` nothing is
  counted. A request leaves the in-flight count as its response's last byte is handed on (or when it ends without
  one), so that a client that has its answer never finds it still counted. It sets the key id on the request's record
  (`orchestrator.observability.record`).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from orchestrator.bulk.runner import BATCH_OWNER
from orchestrator.errors import (
    ApiKeyInvalid,
    ApiKeyMissing,
    LimitsUnavailable,
    OrchestratorError,
    RateLimited,
    Throttled,
    TooManyInFlight,
    Unauthenticated,
)
from orchestrator.observability.record import RequestRecord
from orchestrator.security.addresses import ClientAddresses
from orchestrator.settings import RateLimitSettings
from orchestrator.stages.admission import BULK

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
"""Paths served without a key and without rate limits: liveness, the API's description (no secret: it is what the
docs say) and the web page (static files; the page sends the key the user enters with its API calls). `/ready`
and `/metrics` are not among them: they name the stages' endpoints and their breakers' states."""
OPEN_FOLDERS = ("/web/",)
"""The web page's script and style sheet: a plain file name in these folders is open (nothing deeper, no dot
segments), so that no path that routes elsewhere can borrow their openness."""
MAX_AUTHORIZATION_BYTES = 1024
_BEARER = re.compile(r"^[Bb][Ee][Aa][Rr][Ee][Rr] +(?P<token>[A-Za-z0-9\-._~+/]+=*) *$")
"""RFC 6750's `Bearer b64token`; the scheme's name is case-insensitive."""
_DIGEST = re.compile(r"^sha256:(?P<hex>[0-9a-fA-F]{64})$")

Refuse = Callable[[Scope, Receive, Send, OrchestratorError], Awaitable[None]]
"""Sends the error response for a refused request (the app's error format)."""


def is_open(path: str) -> bool:
    """Whether `path` is served without a key (`OPEN_PATHS`, `OPEN_FOLDERS`)."""
    folder, _, name = path.rpartition("/")
    return path in OPEN_PATHS or (f"{folder}/" in OPEN_FOLDERS and bool(name) and not name.startswith("."))


def key_id(digest: bytes) -> str:
    """What logs and the audit log call a key: the first 8 hex digits of its SHA-256 digest."""
    return digest.hex()[:8]


@dataclass(frozen=True)
class ApiKeys:
    digests: tuple[bytes, ...] = ()

    @classmethod
    def parse(cls, text: str | None) -> ApiKeys:
        """Comma-separated keys, each a key as clients send it or `sha256:<64 hex digits>`; blanks are skipped. A key
        that no `Authorization: Bearer` header could carry is a `ValueError`."""
        digests = []
        for entry in (part.strip() for part in (text or "").split(",")):
            if not entry:
                continue
            match = _DIGEST.match(entry)
            if match is not None:
                digests.append(bytes.fromhex(match.group("hex")))
            elif entry.startswith("sha256:"):
                raise ValueError("an api_keys entry starting with sha256: must be followed by 64 hex digits")
            elif _BEARER.match(f"Bearer {entry}") is None:
                raise ValueError("an api_keys entry holds characters a bearer token cannot: use A-Z a-z 0-9 -._~+/")
            else:
                digests.append(hashlib.sha256(entry.encode()).digest())
        return cls(tuple(dict.fromkeys(digests)))

    @property
    def enabled(self) -> bool:
        return bool(self.digests)

    def authenticate(self, authorization: list[bytes]) -> str:
        """The key id of the key in the `Authorization` header values; `ApiKeyMissing` or `ApiKeyInvalid` else."""
        if not authorization:
            raise ApiKeyMissing("this API needs a key: send Authorization: Bearer <key>")
        if len(authorization) > 1:
            raise ApiKeyInvalid("send one Authorization header, not several")
        raw = authorization[0]
        if len(raw) > MAX_AUTHORIZATION_BYTES:
            raise ApiKeyInvalid(f"the Authorization header is longer than {MAX_AUTHORIZATION_BYTES} bytes")
        match = _BEARER.match(raw.decode("latin-1"))
        if match is None:
            raise ApiKeyInvalid("the Authorization header must be: Bearer <key>")
        presented = hashlib.sha256(match.group("token").encode("ascii")).digest()
        found = False
        for digest in self.digests:  # every digest compared, in constant time: no early exit to time
            found |= hmac.compare_digest(presented, digest)
        if not found:
            raise ApiKeyInvalid("the API key is not valid")
        return key_id(presented)


@dataclass
class _Bucket:
    tokens: float
    updated: float
    in_flight: int = 0


class RateLimiter:
    """Token buckets and in-flight counts per client (module docstring). `acquire` before a request, `release`
    after it, with the same clients, from one event loop."""

    def __init__(
        self, settings: RateLimitSettings, *, max_clients: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._rate = settings.requests_per_s
        self._burst = float(settings.burst)
        self._max_concurrent = settings.max_concurrent
        self._max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def acquire(self, *clients: str) -> None:
        """Take a token and an in-flight slot from each of `clients`, or, when any of them is over a limit, from
        none: `TooManyInFlight` / `RateLimited`."""
        now = self._clock()
        buckets = [self._seen(client, now) for client in clients]
        self._evict(now, keep=len(clients))
        for client, bucket in zip(clients, buckets, strict=True):
            self._check(client, bucket)
        for bucket in buckets:
            bucket.tokens -= 1
            bucket.in_flight += 1

    def release(self, *clients: str) -> None:
        for client in clients:
            bucket = self._buckets.get(client)
            if bucket is not None and bucket.in_flight > 0:
                bucket.in_flight -= 1

    def _seen(self, client: str, now: float) -> _Bucket:
        """`client`'s bucket, refilled to `now` and moved to the most recently seen end."""
        bucket = self._buckets.get(client) or _Bucket(self._burst, now)
        bucket.tokens = self._refilled(bucket, now)
        bucket.updated = now
        self._buckets[client] = bucket
        self._buckets.move_to_end(client)
        return bucket

    def _check(self, client: str, bucket: _Bucket) -> None:
        if bucket.in_flight >= self._max_concurrent:
            raise too_many_in_flight(client, bucket.in_flight, self._max_concurrent)
        if bucket.tokens < 1:
            raise rate_limited(client, bucket.tokens, self._rate, self._burst)

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)

    def _evict(self, now: float, keep: int) -> None:
        """From the least recently seen client on: forget idle clients whose bucket has refilled (nothing is lost),
        and while over the bound, idle ones whatever their bucket; stop at the first client to keep. The `keep`
        clients just seen (last) are never looked at: each step removes one client or moves one with requests in
        flight behind them."""
        for _ in range(len(self._buckets) - keep):
            client, bucket = next(iter(self._buckets.items()))
            over = len(self._buckets) > self._max_clients
            if bucket.in_flight == 0 and (over or self._refilled(bucket, now) >= self._burst):
                del self._buckets[client]
            elif over:
                self._buckets.move_to_end(client)
            else:
                return


def too_many_in_flight(client: str, held: int, limit: int) -> TooManyInFlight:
    """The refusal of a request of `client` that already has `held` of its `limit` requests in flight."""
    return TooManyInFlight(
        f"{_who(client)} already has {held} requests in flight; the limit is {limit}", retry_after_s=1
    )


def rate_limited(client: str, tokens: float, rate: float, burst: float) -> RateLimited:
    """The refusal of a request of `client` whose bucket holds `tokens` (under one), with the wait for the next."""
    wait_s = math.ceil((1 - tokens) / rate)
    return RateLimited(
        f"{_who(client)} sent more than {rate:g} requests per second (bursts of {burst:g}); retry in {wait_s} s",
        retry_after_s=wait_s,
    )


def _who(client: str) -> str:
    return "this API key" if client.startswith("key:") else "this client address"


class Limiter(Protocol):
    """What `SecurityMiddleware` asks of a limiter: a ticket for a request's clients (or a refusal), given back after
    it. `LocalLimiter` in this process; `shared_limits.RedisRateLimiter` across replicas."""

    async def acquire(self, *clients: str) -> object: ...

    async def release(self, ticket: Any) -> None: ...


class LocalLimiter:
    """`RateLimiter` behind the `Limiter` protocol: the ticket is the clients."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter

    async def acquire(self, *clients: str) -> tuple[str, ...]:
        self.limiter.acquire(*clients)
        return clients

    async def release(self, ticket: tuple[str, ...]) -> None:
        self.limiter.release(*ticket)


class SecurityMiddleware:
    """Authentication, then rate limits, for every HTTP request to a path that is not open (module docstring).
    `addresses`: count each request against its client's address too (`rate_limit.per_address`)."""

    def __init__(
        self,
        app: ASGIApp,
        keys: ApiKeys,
        limiter: Limiter,
        refuse: Refuse,
        addresses: ClientAddresses | None = None,
    ) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.refuse = refuse
        self.addresses = addresses

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        owner = scope.get(BATCH_OWNER)
        if isinstance(owner, str):  # a request of a batch, sent in-process for its owner: no key, no limits
            RequestRecord.of(scope).key_id = owner
            bulk = BULK.set(True)  # the stages take its turns from their bulk share
            try:
                await self.app(scope, receive, send)
            finally:
                BULK.reset(bulk)
            return
        try:
            clients = self._clients(scope)
            ticket = await self.limiter.acquire(*clients)
        except (Unauthenticated, Throttled, LimitsUnavailable) as exc:
            await self.refuse(scope, receive, send, exc)
            return
        released = False

        async def release() -> None:
            nonlocal released
            if not released:
                released = True
                await self.limiter.release(ticket)

        async def send_and_release(message: Message) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                await release()  # before the last byte goes out: a client holding its answer is no longer in flight
            await send(message)

        try:
            await self.app(scope, receive, send_and_release)
        finally:
            await release()

    def _clients(self, scope: Scope) -> tuple[str, ...]:
        """Whom the limits count the request against: `key:<id>` once authenticated (with keys), and
        `address:<client>` (with `addresses`)."""
        clients = []
        if self.keys.enabled:
            authorization = [value for name, value in scope.get("headers", []) if name == b"authorization"]
            identity = self.keys.authenticate(authorization)
            RequestRecord.of(scope).key_id = identity
            clients.append(f"key:{identity}")
        if self.addresses is not None:
            peer = scope.get("client")
            address = self.addresses.client(peer[0] if peer else None, scope.get("headers", []))
            clients.append(f"address:{address}")
        return tuple(clients)
