"""Who may call the API and how often: API keys, per-key rate limits, and the middleware that enforces both.

- `ApiKeys` (pure): the configured keys (`api_keys`, comma-separated; `sha256:<hex>` entries are a key's digest),
  kept only as SHA-256 digests. A presented key is hashed and compared with every digest in constant time, so
  neither the comparison nor the configuration leaks a key; a key's id in logs and the audit log is the first 8 hex
  digits of its digest.
- `RateLimiter` (pure, clock injected): per client (the key id, or the client's address when no keys are
  configured), a token bucket of `rate_limit.burst` requests refilled at `rate_limit.requests_per_s`, and at most
  `rate_limit.max_concurrent` requests in flight. It remembers at most `max_clients` clients; an idle client whose
  bucket has refilled is forgotten first (forgetting it changes nothing), and past the bound the least recently
  seen idle ones are.
- `SecurityMiddleware` (ASGI): every path but the open ones (`is_open`) needs `Authorization: Bearer <key>` when
  keys are configured (401 `api_key_missing` / `api_key_invalid`, with `WWW-Authenticate`), then passes the limiter
  (429 `rate_limited` / `too_many_in_flight`, with `Retry-After`). It notes the key id in the request's audit record
  and in `request.state.key_id`.
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

from starlette.types import ASGIApp, Receive, Scope, Send

from orchestrator import audit
from orchestrator.errors import (
    ApiKeyInvalid,
    ApiKeyMissing,
    OrchestratorError,
    RateLimited,
    Throttled,
    TooManyInFlight,
    Unauthenticated,
)
from orchestrator.settings import RateLimitSettings

OPEN_PATHS = frozenset({"/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/"})
"""Paths served without a key and without rate limits: liveness, the API's description (no secret: it is what the
README says) and the web page (static files; the page sends the key the user enters with its API calls). `/ready`
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
    after it, from one event loop."""

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

    def acquire(self, client: str) -> None:
        """Take a token and an in-flight slot for `client`, or raise `TooManyInFlight` / `RateLimited`."""
        now = self._clock()
        bucket = self._buckets.get(client) or _Bucket(self._burst, now)
        bucket.tokens = self._refilled(bucket, now)
        bucket.updated = now
        self._buckets[client] = bucket
        self._buckets.move_to_end(client)
        self._evict(now)
        if bucket.in_flight >= self._max_concurrent:
            raise TooManyInFlight(
                f"this client already has {bucket.in_flight} requests in flight; the limit is {self._max_concurrent}",
                retry_after_s=1,
            )
        if bucket.tokens < 1:
            wait_s = math.ceil((1 - bucket.tokens) / self._rate)
            raise RateLimited(
                f"more than {self._rate:g} requests per second (bursts of {self._burst:g}); retry in {wait_s} s",
                retry_after_s=wait_s,
            )
        bucket.tokens -= 1
        bucket.in_flight += 1

    def release(self, client: str) -> None:
        bucket = self._buckets.get(client)
        if bucket is not None and bucket.in_flight > 0:
            bucket.in_flight -= 1

    def _refilled(self, bucket: _Bucket, now: float) -> float:
        return min(self._burst, bucket.tokens + (now - bucket.updated) * self._rate)

    def _evict(self, now: float) -> None:
        """From the least recently seen client on: forget idle clients whose bucket has refilled (nothing is lost),
        and while over the bound, idle ones whatever their bucket; stop at the first client to keep. The client
        just seen (last) is never looked at: each step removes one client or moves one with requests in flight
        behind it."""
        for _ in range(len(self._buckets) - 1):
            client, bucket = next(iter(self._buckets.items()))
            over = len(self._buckets) > self._max_clients
            if bucket.in_flight == 0 and (over or self._refilled(bucket, now) >= self._burst):
                del self._buckets[client]
            elif over:
                self._buckets.move_to_end(client)
            else:
                return


class SecurityMiddleware:
    """Authentication, then rate limits, for every HTTP request to a path that is not open (module docstring)."""

    def __init__(self, app: ASGIApp, keys: ApiKeys, limiter: RateLimiter, refuse: Refuse) -> None:
        self.app = app
        self.keys = keys
        self.limiter = limiter
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        try:
            client = self._client(scope)
            self.limiter.acquire(client)
        except (Unauthenticated, Throttled) as exc:
            await self.refuse(scope, receive, send, exc)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.limiter.release(client)

    def _client(self, scope: Scope) -> str:
        """Who the limits count against: `key:<id>` once authenticated, else `address:<host>`."""
        if self.keys.enabled:
            authorization = [value for name, value in scope.get("headers", []) if name == b"authorization"]
            identity = self.keys.authenticate(authorization)
            audit.note(key_id=identity)
            scope.setdefault("state", {})["key_id"] = identity
            return f"key:{identity}"
        address = scope.get("client")
        return f"address:{address[0] if address else '-'}"
