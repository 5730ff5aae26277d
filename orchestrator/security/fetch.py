"""Fetching a client's http(s) image URL without letting the client reach what only this service can reach (SSRF).

What a fetch checks, and where:

- The URL (`checked_url`, for the client's URL and for every redirect): http or https, a host, no credentials, a
  sane length. Anything else is `image_url_invalid` (`image_url_not_supported` for another scheme).
- The address, at connection time (`GuardedNetwork`, an httpcore network backend): the host is resolved once, every
  address it resolves to is checked (`refusal`), and the connection is made to a checked address — never to a name
  that could resolve differently a moment later (DNS rebinding). Private, loopback, link-local, unique-local,
  shared (CGNAT), multicast, reserved, unspecified and documentation addresses are refused, IPv4 addresses embedded
  in IPv6 ones (mapped, 6to4, Teredo, NAT64) included, and so are the cloud metadata addresses, some of which are
  public (Azure's 168.63.129.16). `fetch.allow` lets hosts (by name) or CIDR ranges through; a metadata address only
  when the allow-list names that very address. Every connection goes through this check: redirects, and a pooled
  connection was checked when it was opened.
- The answer (`ImageFetcher`): redirects followed by hand, at most `fetch.max_redirects`; a 2xx status; an `image/*`
  content type without content coding; at most `max_bytes`, counted while the body streams; all of it within
  `fetch.timeout_s`. Whether the bytes are an image is `vision_stage.images.decode_image`'s to say, as for uploads.

No cookies, no proxies from the environment, no `.netrc` credentials: the fetcher sends a plain GET through its own
httpx transport, not through an `httpx.AsyncClient`. Foreign errors (httpx's, httpcore's, the resolver's) are
translated into `orchestrator.errors` in `_translated`, the one place.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import ssl
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import httpcore
import httpx

from orchestrator.errors import (
    ImageUrlBadStatus,
    ImageUrlForbidden,
    ImageUrlInvalid,
    ImageUrlNotImage,
    ImageUrlNotSupported,
    ImageUrlTimeout,
    ImageUrlTooManyRedirects,
    ImageUrlUnreachable,
)
from orchestrator.settings import FetchSettings
from vision_stage.errors import ImageTooLarge

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
"""`(host, port)` → the addresses to connect to, in order; raises `OSError` (`socket.gaierror`) when it cannot."""

MAX_URL_CHARS = 8192
USER_AGENT = "glm-vision-orchestrator/0.1 (image fetch)"
_REDIRECTS = frozenset({301, 302, 303, 307, 308})

METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(address)
    for address in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle…
        "169.254.169.253",  # AWS's DNS resolver
        "169.254.169.123",  # AWS's time service
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.0.23",  # Tencent Cloud
        "100.100.100.200",  # Alibaba Cloud
        "168.63.129.16",  # Azure's wire server (a public address)
        "192.0.0.192",  # Oracle Cloud (older)
        "fd00:ec2::254",  # AWS, IPv6
        "fd00:ec2::253",  # AWS's DNS resolver, IPv6
    )
)
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


@dataclass(frozen=True)
class AllowList:
    """`fetch.allow`: host names (lower case, no trailing dot) and networks that may be fetched anyway."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """Comma-separated entries: a CIDR range or an address (`10.0.0.0/8`, `::1`), else a host name."""
        hosts: set[str] = set()
        networks = []
        for entry in (part.strip() for part in text.split(",")):
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                hosts.add(_host_key(entry))
        return cls(frozenset(hosts), tuple(networks))

    def admits(self, host: str, address: IPAddress) -> bool:
        if address in METADATA_ADDRESSES:  # only the address itself, never a range around it
            return any(network.num_addresses == 1 and address in network for network in self.networks)
        return _host_key(host) in self.hosts or any(address in network for network in self.networks)


def _host_key(host: str) -> str:
    return host.strip("[]").rstrip(".").lower()


def refusal(address: IPAddress) -> str | None:
    """Why `address` may not be fetched (a phrase), or None when it may."""
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            reason = refusal(embedded)
            return f"an IPv6 address embedding {embedded}, {reason}" if reason else None
    for reason, flagged in (
        ("a loopback address", address.is_loopback),
        ("an unspecified address", address.is_unspecified),
        ("a link-local address", address.is_link_local),
        ("a multicast address", address.is_multicast),
        ("a private address", address.is_private),
        ("a reserved address", address.is_reserved),
        ("an address that is not globally routable", not address.is_global),
    ):
        if flagged:
            return reason
    return None


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]  # the client's address; the server's is the relay
    if any(address in network for network in _NAT64):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


async def system_resolver(host: str, port: int) -> list[str]:
    """The system's resolver (`getaddrinfo`), TCP addresses only, in its order, without repeats."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class GuardedNetwork(httpcore.AsyncNetworkBackend):
    """httpcore's network backend with the address check at connection time: `host` is resolved once, every
    address checked, and the connection made to a checked address (the TLS layer still verifies the certificate
    against the host name, which httpcore passes to `start_tls` itself)."""

    def __init__(self, allow: AllowList, resolver: Resolver = system_resolver) -> None:
        self._allow = allow
        self._resolve = resolver
        self._network = httpcore.AnyIOBackend()

    async def connect_tcp(  # its signature is httpcore's
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        addresses = await self.checked_addresses(host, port)
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._network.connect_tcp(
                    str(address), port, timeout=timeout, local_address=local_address, socket_options=socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None
        raise failure

    async def checked_addresses(self, host: str, port: int) -> list[IPAddress]:
        """Every address `host` resolves to, once each; `ImageUrlForbidden` when any of them is refused."""
        try:
            resolved = await self._resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise ImageUrlUnreachable(f"the image URL's host {host!r} does not resolve: {_reason(exc)}") from None
        addresses = [ipaddress.ip_address(address.split("%", 1)[0]) for address in resolved]
        if not addresses:
            raise ImageUrlUnreachable(f"the image URL's host {host!r} resolves to no address")
        for address in addresses:
            reason = refusal(address)
            if reason is not None and not self._allow.admits(host, address):
                shown = host if host == str(address) else f"{host} ({address})"
                raise ImageUrlForbidden(f"the image URL's host {shown} is {reason}; such addresses are not fetched")
        return addresses

    async def connect_unix_socket(  # its signature is httpcore's
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise ImageUrlForbidden("image URLs are never fetched over Unix sockets")

    async def sleep(self, seconds: float) -> None:
        await self._network.sleep(seconds)


class GuardedTransport(httpx.AsyncBaseTransport):
    """httpx's transport interface over an httpcore pool whose every connection goes through `GuardedNetwork`.
    httpcore's errors pass through untranslated (`ImageFetcher` translates them)."""

    def __init__(self, network: GuardedNetwork, ssl_context: ssl.SSLContext | None = None) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context or httpx.create_ssl_context(),
            max_connections=64,
            max_keepalive_connections=16,
            keepalive_expiry=5.0,
            network_backend=network,
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = httpcore.URL(
            scheme=request.url.raw_scheme, host=request.url.raw_host, port=request.url.port, target=request.url.raw_path
        )
        assert isinstance(request.stream, typing.AsyncIterable)
        core = httpcore.Request(
            request.method, url, headers=request.headers.raw, content=request.stream, extensions=request.extensions
        )
        response = await self._pool.handle_async_request(core)
        assert isinstance(response.stream, typing.AsyncIterable)
        return httpx.Response(
            response.status, headers=response.headers, stream=_Body(response.stream), extensions=response.extensions
        )

    async def aclose(self) -> None:
        await self._pool.aclose()


class _Body(httpx.AsyncByteStream):
    def __init__(self, stream: typing.AsyncIterable[bytes]) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for part in self._stream:
            yield part

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None)
        if close is not None:
            await close()


@dataclass(frozen=True)
class FetchedImage:
    data: bytes
    url: str
    """Where the bytes came from: the client's URL, or where its redirects led."""
    content_type: str


class ImageFetcher:
    """`fetch(url)`: an image's bytes from a client's http(s) URL (module docstring). `transport` replaces the
    guarded network transport (tests of the HTTP logic use `httpx.MockTransport`); `resolver` replaces the system's
    resolver of the guarded one."""

    def __init__(
        self,
        settings: FetchSettings,
        max_bytes: int,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        resolver: Resolver = system_resolver,
    ) -> None:
        self._settings = settings
        self._max_bytes = max_bytes
        self._transport = transport or GuardedTransport(GuardedNetwork(AllowList.parse(settings.allow), resolver))

    async def fetch(self, url: str) -> FetchedImage:
        target = checked_url(url)
        timeout_s = self._settings.timeout_s
        try:
            async with asyncio.timeout(timeout_s), _translated(timeout_s):
                return await self._follow(target)
        except TimeoutError:
            raise ImageUrlTimeout(f"fetching the image URL took longer than {timeout_s:g} s") from None

    async def aclose(self) -> None:
        await self._transport.aclose()

    async def _follow(self, target: httpx.URL) -> FetchedImage:
        for _ in range(self._settings.max_redirects + 1):
            async with self._get(target) as response:
                location = response.headers.get("location")
                if response.status_code in _REDIRECTS and location:
                    target = checked_url(_joined(target, location), redirected=True)
                    continue
                content_type = self._checked_answer(response)
                return FetchedImage(await self._body(response), str(target), content_type)
        raise ImageUrlTooManyRedirects(
            f"the image URL redirects more than {self._settings.max_redirects} times; that is the limit"
        )

    @asynccontextmanager
    async def _get(self, url: httpx.URL) -> AsyncIterator[httpx.Response]:
        timeout = self._settings.timeout_s
        headers = {"user-agent": USER_AGENT, "accept": "image/*", "accept-encoding": "identity"}
        extensions = {"timeout": {"connect": timeout, "read": timeout, "write": timeout, "pool": timeout}}
        request = httpx.Request("GET", url, headers=headers, extensions=extensions)
        response = await self._transport.handle_async_request(request)
        response.request = request
        try:
            yield response
        finally:
            await response.aclose()

    def _checked_answer(self, response: httpx.Response) -> str:
        if not 200 <= response.status_code < 300:
            raise ImageUrlBadStatus(f"the image URL answered {response.status_code}; an image needs a 2xx answer")
        content_type = str(response.headers.get("content-type", "")).split(";")[0].strip().lower()
        if not content_type.startswith("image/"):
            raise ImageUrlNotImage(f"the image URL answered {content_type or 'no content type'!r}, not image/*")
        coding = response.headers.get("content-encoding", "identity").strip().lower()
        if coding not in ("", "identity"):
            raise ImageUrlNotImage(f"the image URL answered with content coding {coding!r}; send the image as is")
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self._max_bytes:
            raise ImageTooLarge(f"the image URL's body has {declared} bytes; the limit is {self._max_bytes}")
        return content_type

    async def _body(self, response: httpx.Response) -> bytes:
        parts, size = [], 0
        async for part in response.aiter_raw():
            size += len(part)
            if size > self._max_bytes:
                raise ImageTooLarge(f"the image URL's body is larger than the limit of {self._max_bytes} bytes")
            parts.append(part)
        return b"".join(parts)


def checked_url(url: str, *, redirected: bool = False) -> httpx.URL:
    """`url` parsed, when it is one we fetch: http(s), a host, no credentials, at most `MAX_URL_CHARS`."""
    where = "the image URL redirects to a URL that" if redirected else "the image URL"
    if len(url) > MAX_URL_CHARS:
        raise ImageUrlInvalid(f"{where} is longer than {MAX_URL_CHARS} characters")
    if any(ord(char) < 0x21 or ord(char) == 0x7F for char in url):
        raise ImageUrlInvalid(f"{where} holds whitespace or control characters")
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ImageUrlInvalid(f"{where} does not parse: {exc}") from None
    if parsed.scheme not in ("http", "https"):
        error = ImageUrlInvalid if redirected else ImageUrlNotSupported
        raise error(f"{where} has the scheme {parsed.scheme or '(none)'!r}; only http and https URLs are fetched")
    if not parsed.host:
        raise ImageUrlInvalid(f"{where} has no host")
    if parsed.userinfo:
        raise ImageUrlInvalid(f"{where} holds credentials (user:password@); they are never sent")
    if parsed.port is not None and not 0 < parsed.port < 65536:
        raise ImageUrlInvalid(f"{where} has the port {parsed.port}, which does not exist")
    return parsed


def _joined(base: httpx.URL, location: str) -> str:
    """Where a redirect's `Location` points, relative to `base`."""
    try:
        return str(base.join(location.strip()))
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise ImageUrlInvalid(f"the image URL redirects to a URL that does not parse: {exc}") from None


@asynccontextmanager
async def _translated(timeout_s: float) -> AsyncIterator[None]:
    """httpx's and httpcore's errors as `orchestrator.errors`, the one place they are translated."""
    try:
        yield
    except (httpcore.TimeoutException, httpx.TimeoutException):
        raise ImageUrlTimeout(f"fetching the image URL took longer than {timeout_s:g} s") from None
    except (httpcore.ConnectError, httpx.ConnectError) as exc:
        raise ImageUrlUnreachable(f"could not connect to the image URL's host: {_reason(exc)}") from None
    except (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol) as exc:
        raise ImageUrlInvalid(f"the image URL cannot be fetched: {_reason(exc)}") from None
    except (httpcore.NetworkError, httpcore.ProtocolError, httpx.TransportError, httpx.DecodingError) as exc:
        raise ImageUrlUnreachable(f"the image URL's server broke off its answer: {_reason(exc)}") from None


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
