"""Fetching client image URLs (`orchestrator.security.fetch`) against a real image server on loopback: what is refused,
what is fetched, and that the address check holds when the connection is made; then the same through the API."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from orchestrator import errors
from orchestrator.api.app import create_app
from orchestrator.security.fetch import AllowList, ImageFetcher, refusal
from orchestrator.settings import FetchSettings, LimitSettings, RateLimitSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import RunningServer, image_message, serving, unused_port
from vision_stage.errors import ImageTooLarge

PNG = png_bytes()
MAX_BYTES = 50_000


class ImageServer:
    """What the fetcher talks to; `paths` records every request that reached it."""

    def __init__(self) -> None:
        self.paths: list[str] = []
        self.hosts: list[str] = []
        self.app = Starlette(routes=[Route("/{name:path}", self._serve)])

    async def _serve(self, request: Request) -> Response:
        self.paths.append(request.url.path)
        self.hosts.append(request.headers.get("host", ""))
        name = request.path_params["name"]
        if name.startswith("chain/"):
            left = int(name.removeprefix("chain/"))  # redirects still to come
            return (
                RedirectResponse(f"/chain/{left - 1}", status_code=302)
                if left
                else Response(PNG, media_type="image/png")
            )
        handler = _ANSWERS.get(name)
        return handler(request) if handler else Response("no such image", status_code=404)


async def _trickle() -> AsyncIterator[bytes]:
    yield PNG[:10]
    for _ in range(100):  # ends by itself within 5 s, so that no test waits on it
        await asyncio.sleep(0.05)
        yield b"\0"


async def _endless() -> AsyncIterator[bytes]:
    for _ in range(200):
        yield b"\0" * 4096


_ANSWERS: dict[str, Any] = {
    "image.png": lambda r: Response(PNG, media_type="image/png"),
    "image-typed.png": lambda r: Response(PNG, media_type="image/png; charset=binary"),
    "redirect": lambda r: RedirectResponse(r.query_params["to"], status_code=int(r.query_params.get("code", 302))),
    "big.png": lambda r: Response(b"\0" * (MAX_BYTES + 1), media_type="image/png"),
    "chunked.png": lambda r: StreamingResponse(_endless(), media_type="image/png"),
    "slow.png": lambda r: StreamingResponse(_trickle(), media_type="image/png"),
    "page.html": lambda r: Response("<html>not an image</html>", media_type="text/html"),
    "octets": lambda r: Response(PNG, media_type="application/octet-stream"),
    "untyped": lambda r: Response(PNG, headers={"content-type": ""}),
    "gzipped.png": lambda r: Response(gzip.compress(PNG), media_type="image/png", headers={"content-encoding": "gzip"}),
    "text.png": lambda r: Response(b"hello, I am not a picture", media_type="image/png"),
    "svg.svg": lambda r: Response(b"<svg xmlns='http://www.w3.org/2000/svg'/>", media_type="image/svg+xml"),
    "secret": lambda r: Response("internal", media_type="text/plain"),
}


@pytest.fixture(scope="module")
def image_server() -> Iterator[tuple[RunningServer, ImageServer]]:
    server = ImageServer()
    with serving(server.app) as live:
        yield live, server


@pytest.fixture
def images(image_server: tuple[RunningServer, ImageServer]) -> ImageServer:
    image_server[1].paths.clear()
    image_server[1].hosts.clear()
    return image_server[1]


@pytest.fixture
def url(image_server: tuple[RunningServer, ImageServer]) -> str:
    return image_server[0].url


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def fetcher(allow: str = "", *, timeout_s: float = 5.0, max_redirects: int = 3, **kwargs: Any) -> ImageFetcher:
    settings = FetchSettings(allow=allow, timeout_s=timeout_s, max_redirects=max_redirects)
    return ImageFetcher(settings, MAX_BYTES, **kwargs)


async def fetch(url: str, allow: str = "127.0.0.1", **kwargs: Any) -> bytes:
    client = fetcher(allow, **kwargs)
    try:
        return (await client.fetch(url)).data
    finally:
        await client.aclose()


# --- addresses -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1", "127.8.9.10", "0.0.0.0", "10.1.2.3", "172.16.0.1", "192.168.1.1", "169.254.1.1", "100.64.0.1",
        "198.18.0.1", "192.0.2.1", "224.0.0.1", "239.255.255.250", "240.0.0.1", "255.255.255.255",
        "169.254.169.254", "169.254.170.2", "100.100.100.200", "168.63.129.16", "fd00:ec2::254", "::1", "::",
        "fe80::1", "fc00::1", "fd12:3456::1", "ff02::1", "::ffff:127.0.0.1", "::ffff:10.0.0.1", "2002:7f00:1::1",
        "2002:a9fe:a9fe::1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe", "2001:db8::1",
    ],
)  # fmt: skip
def test_internal_and_metadata_addresses_are_refused(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "93.184.216.34", "2606:4700:4700::1111", "::ffff:8.8.8.8"])
def test_public_addresses_are_fetched(address: str) -> None:
    assert refusal(ipaddress.ip_address(address)) is None


def test_metadata_addresses_name_themselves_and_need_an_exact_allow_entry() -> None:
    metadata = ipaddress.ip_address("169.254.169.254")
    assert refusal(metadata) == "a cloud metadata address"
    assert not AllowList.parse("169.254.0.0/16, metadata.google.internal").admits("metadata.google.internal", metadata)
    assert AllowList.parse("169.254.169.254").admits("anything", metadata)
    allow = AllowList.parse("images.internal., 10.0.0.0/8, [::1]")
    assert allow.admits("IMAGES.internal", ipaddress.ip_address("192.168.1.1"))
    assert allow.admits("x", ipaddress.ip_address("10.9.9.9"))
    assert allow.admits("x", ipaddress.ip_address("::1"))
    assert not allow.admits("x", ipaddress.ip_address("127.0.0.1"))


# --- fetching from loopback ------------------------------------------------------------------------------------------


async def test_loopback_is_refused_by_default_and_nothing_reaches_it(url: str, images: ImageServer) -> None:
    with pytest.raises(errors.ImageUrlForbidden, match="loopback"):
        await fetch(f"{url}/image.png", allow="")
    with pytest.raises(errors.ImageUrlForbidden, match="loopback"):
        await fetch(f"http://localhost:{port_of(url)}/image.png", allow="")
    assert images.paths == []


@pytest.mark.parametrize("allow", ["127.0.0.1", "127.0.0.0/8", "localhost"])
async def test_an_allow_listed_host_or_range_is_fetched(url: str, images: ImageServer, allow: str) -> None:
    assert await fetch(f"http://localhost:{port_of(url)}/image.png", allow=allow) == PNG
    assert images.paths == ["/image.png"]


async def test_the_connection_goes_to_the_address_that_was_checked(url: str, images: ImageServer) -> None:
    """A name only our resolver knows: the fetch connects to the address it resolved and checked (the system could
    not resolve the name again), while the request still names the host."""
    calls: list[str] = []

    async def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    assert await fetch(f"http://images.test:{port_of(url)}/image.png", resolver=resolver) == PNG
    assert calls == ["images.test"]
    assert images.hosts == [f"images.test:{port_of(url)}"]


async def test_dns_rebinding_cannot_slip_an_internal_address_in(url: str, images: ImageServer) -> None:
    """The name first resolves to a public address, then to loopback. One resolution serves both the check and the
    connection, so the loopback server is never reached; a fetcher that checked, then let the connection resolve
    the name again, would have fetched from it."""
    answers = iter([["192.0.2.0"], ["127.0.0.1"], ["127.0.0.1"]])

    async def resolver(host: str, port: int) -> list[str]:
        return next(answers)

    with pytest.raises((errors.ImageUrlUnreachable, errors.ImageUrlTimeout)):
        await fetch(f"http://rebind.test:{port_of(url)}/secret", allow="192.0.2.0/24", resolver=resolver, timeout_s=1)
    assert next(answers) == ["127.0.0.1"]  # resolved once only
    assert images.paths == []


async def test_a_name_resolving_to_any_forbidden_address_is_refused(url: str, images: ImageServer) -> None:
    async def resolver(host: str, port: int) -> list[str]:
        return ["8.8.8.8", "127.0.0.1"]

    with pytest.raises(errors.ImageUrlForbidden, match=r"mixed\.test \(127\.0\.0\.1\) is a loopback address"):
        await fetch(f"http://mixed.test:{port_of(url)}/image.png", allow="", resolver=resolver)
    assert images.paths == []


@pytest.mark.parametrize(
    "target",
    ["http://127.0.0.1:{port}/secret", "http://169.254.169.254/latest/meta-data/", "http://[::1]:{port}/secret",
     "http://10.0.0.1/admin"],
)  # fmt: skip
async def test_a_redirect_to_a_forbidden_address_is_refused(url: str, images: ImageServer, target: str) -> None:
    port = port_of(url)
    start = f"http://localhost:{port}/redirect?to={target.format(port=port)}"
    with pytest.raises(errors.ImageUrlForbidden):
        await fetch(start, allow="localhost")
    assert images.paths == ["/redirect"]


@pytest.mark.parametrize(
    "target",
    ["file:///etc/passwd", "gopher://localhost:70/", "http://user:pw@localhost/x", "http://[::1", "http://h:0x/"],
)
async def test_a_redirect_to_a_url_never_fetched_is_refused(url: str, images: ImageServer, target: str) -> None:
    with pytest.raises(errors.ImageUrlInvalid, match="redirects to a URL that"):
        await fetch(f"{url}/redirect?to={target}")


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
async def test_every_kind_of_redirect_is_followed(url: str, images: ImageServer, code: int) -> None:
    assert await fetch(f"{url}/redirect?to=/image.png&code={code}") == PNG
    assert images.paths == ["/redirect", "/image.png"]


async def test_redirects_are_followed_up_to_the_limit(url: str) -> None:
    assert await fetch(f"{url}/chain/3", max_redirects=3) == PNG
    with pytest.raises(errors.ImageUrlTooManyRedirects, match="more than 2 times"):
        await fetch(f"{url}/chain/3", max_redirects=2)
    with pytest.raises(errors.ImageUrlTooManyRedirects):
        await fetch(f"{url}/chain/1", max_redirects=0)


@pytest.mark.parametrize("name", ["big.png", "chunked.png"])
async def test_a_body_over_the_limit_is_refused_while_it_streams(url: str, name: str) -> None:
    with pytest.raises(ImageTooLarge, match=str(MAX_BYTES)):
        await fetch(f"{url}/{name}")


async def test_a_slow_body_is_cut_at_the_fetch_timeout(url: str) -> None:
    started = time.monotonic()
    with pytest.raises(errors.ImageUrlTimeout, match=r"0\.5 s"):
        await fetch(f"{url}/slow.png", timeout_s=0.5)
    assert time.monotonic() - started < 2


@pytest.mark.parametrize(
    ("name", "match"),
    [("page.html", "text/html"), ("octets", "application/octet-stream"), ("untyped", "no content type"),
     ("gzipped.png", "gzip")],
)  # fmt: skip
async def test_what_is_not_served_as_an_image_is_refused(url: str, name: str, match: str) -> None:
    with pytest.raises(errors.ImageUrlNotImage, match=match):
        await fetch(f"{url}/{name}")


async def test_image_types_with_parameters_are_fetched_and_a_bad_status_is_refused(url: str) -> None:
    assert await fetch(f"{url}/image-typed.png") == PNG
    with pytest.raises(errors.ImageUrlBadStatus, match="404"):
        await fetch(f"{url}/missing.png")


NEVER_FETCHED: dict[type[Exception], tuple[str, ...]] = {
    errors.ImageUrlNotSupported: ("file:///etc/passwd", "ftp://example.com/a.png", "gopher://127.0.0.1:6379/_FLUSHALL"),
    errors.ImageUrlInvalid: (
        "http://user:secret@example.com/a.png",
        "http://:secret@example.com/a.png",
        "http://example.com:99999/a.png",
        "http:///a.png",
        "http://exa mple.com/a.png",
    ),
    errors.ImageUrlUnreachable: ("http://images.invalid/a.png",),
}


@pytest.mark.parametrize(("bad", "error"), [(bad, error) for error, urls in NEVER_FETCHED.items() for bad in urls])
async def test_urls_that_are_never_fetched(bad: str, error: type[Exception]) -> None:
    with pytest.raises(error):
        await fetch(bad, allow="")


async def test_a_refused_connection_is_unreachable() -> None:
    with pytest.raises(errors.ImageUrlUnreachable, match="could not connect"):
        await fetch(f"http://127.0.0.1:{unused_port()}/image.png")


# --- through the API -------------------------------------------------------------------------------------------------


def api(vision: FakeVision | None = None, **fetch_settings: Any) -> TestClient:
    settings = Settings(
        fetch=FetchSettings(**fetch_settings),
        limits=LimitSettings(max_image_bytes=MAX_BYTES),
        rate_limit=RateLimitSettings(requests_per_s=1000, burst=1000),  # the corpus goes out in one burst
    )
    return TestClient(create_app(settings, Backends(vision or FakeVision(), FakeReasoning())))


def analyze(client: TestClient, image_url: str) -> Any:
    return client.post("/v1/analyze", json={"question": "What is the total?", "image_url": image_url})


def assert_error(response: Any, status: int, type_: str) -> None:
    assert response.status_code == status, response.text
    assert response.json()["error"]["type"] == type_


def test_analyze_and_chat_fetch_an_allow_listed_url_and_pass_it_to_the_vision_stage(url: str) -> None:
    vision = FakeVision()
    with api(vision, allow="127.0.0.1") as client:
        response = analyze(client, f"{url}/redirect?to=/image.png")
        assert response.status_code == 200, response.text
        chat = client.post(
            "/v1/chat/completions",
            json={"model": "vision-only", "messages": image_message("Total?", f"{url}/image.png")},
        )
        assert chat.status_code == 200, chat.text
    assert [request.image.byte_size for request in vision.requests] == [len(PNG), len(PNG)]
    assert [request.image_url for request in vision.requests] == [f"{url}/image.png", f"{url}/image.png"]


def test_the_api_answers_each_fetch_failure_with_its_4xx(url: str) -> None:
    with api(allow="127.0.0.1", timeout_s=0.5) as client:
        assert_error(analyze(client, f"{url}/text.png"), 415, "image_unsupported")  # served as an image, but is not
        assert_error(analyze(client, f"{url}/svg.svg"), 415, "image_unsupported")
        assert_error(analyze(client, f"{url}/page.html"), 415, "image_url_not_image")
        assert_error(analyze(client, f"{url}/big.png"), 413, "image_too_large")
        assert_error(analyze(client, f"{url}/slow.png"), 400, "image_url_timeout")
        assert_error(analyze(client, f"{url}/missing.png"), 400, "image_url_bad_status")
        assert_error(analyze(client, f"{url}/chain/5"), 400, "image_url_too_many_redirects")
    with api() as client:
        assert_error(analyze(client, f"{url}/image.png"), 403, "image_url_forbidden")


def test_with_fetching_off_http_urls_are_not_supported(url: str, images: ImageServer) -> None:
    with api(enabled=False, allow="127.0.0.1") as client:
        assert_error(analyze(client, f"{url}/image.png"), 400, "image_url_not_supported")
        chat = client.post(
            "/v1/chat/completions", json={"model": "auto", "messages": image_message("Total?", f"{url}/image.png")}
        )
        assert_error(chat, 400, "image_url_not_supported")
    assert images.paths == []


HOSTILE_URLS: list[tuple[str, int, str]] = [
    ("file:///etc/passwd", 400, "image_url_not_supported"),
    ("ftp://example.com/a.png", 400, "image_url_not_supported"),
    ("gopher://127.0.0.1:6379/_FLUSHALL%0D%0A", 400, "image_url_not_supported"),
    ("dict://127.0.0.1:11211/stat", 400, "image_url_not_supported"),
    ("javascript:alert(1)", 400, "image_url_not_supported"),
    ("data:text/html;base64,PGgxPmhpPC9oMT4=", 400, "invalid_data_url"),
    ("http://127.0.0.1/", 403, "image_url_forbidden"),
    ("HTTP://127.0.0.1:22/", 403, "image_url_forbidden"),
    ("https://127.0.0.1:443/", 403, "image_url_forbidden"),
    ("http://localhost/", 403, "image_url_forbidden"),
    ("http://[::1]/", 403, "image_url_forbidden"),
    ("http://0.0.0.0/", 403, "image_url_forbidden"),
    ("http://2130706433/", 403, "image_url_forbidden"),
    ("http://0x7f000001/", 403, "image_url_forbidden"),
    ("http://0177.0.0.1/", 400, "image_url_invalid"),  # httpx refuses octal parts
    ("http://127.1/", 403, "image_url_forbidden"),
    ("http://[::ffff:127.0.0.1]/", 403, "image_url_forbidden"),
    ("http://[::ffff:7f00:1]/", 403, "image_url_forbidden"),
    ("http://169.254.169.254/latest/meta-data/iam/security-credentials/", 403, "image_url_forbidden"),
    ("http://[fd00:ec2::254]/latest/meta-data/", 403, "image_url_forbidden"),
    ("http://100.100.100.200/latest/meta-data/", 403, "image_url_forbidden"),
    ("http://168.63.129.16/machine?comp=goalstate", 403, "image_url_forbidden"),
    ("http://10.0.0.1/admin", 403, "image_url_forbidden"),
    ("http://192.168.0.1/", 403, "image_url_forbidden"),
    ("http://[fe80::1]/", 403, "image_url_forbidden"),
    ("http://[64:ff9b::a9fe:a9fe]/", 403, "image_url_forbidden"),
    ("http://user:password@example.com/a.png", 400, "image_url_invalid"),
    ("http://example.com\\@127.0.0.1/", 400, "image_url_invalid"),
    ("http://example.com:99999/a.png", 400, "image_url_invalid"),
    ("http:///a.png", 400, "image_url_invalid"),
    ("http://exa mple.com/a.png", 400, "image_url_invalid"),
    ("http://example.com/\r\nX-Injected: 1", 400, "image_url_invalid"),
    ("http://" + "a" * 9000 + ".com/", 400, "image_url_invalid"),
    ("http://images.invalid/a.png", 400, "image_url_unreachable"),
]


def test_hostile_urls_get_a_precise_4xx_and_never_a_5xx() -> None:
    answers = []
    with api() as client:
        for hostile, _, _ in HOSTILE_URLS:
            response = analyze(client, hostile)
            error = response.json().get("error", {})
            answers.append((hostile, response.status_code, error.get("type")))
    assert answers == HOSTILE_URLS
