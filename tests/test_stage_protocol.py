"""The stage-protocol client's meaning of failures (`classify`), the request as it goes out, and `model_ids`.

`test_stage_transport` (transports, keep-alive, framing) and `test_stage_events` (the event stream, timeouts, error
statuses) hold the rest of the client's own tests; the stage backends' tests (`test_remote_backends`,
`test_faulty_server`) use it through the backends.
"""

from __future__ import annotations

import time
from contextlib import aclosing

import orjson
import pytest

from stage_protocol import client as protocol
from stage_protocol.client import errors as errors_module
from tests.raw_http import (
    BODY,
    EXPECTED,
    TRANSPORTS,
    Conn,
    Handler,
    Request,
    always,
    client_for,
    collect,
    head,
    head_then_silent,
    one_by_one,
    plain,
    response,
    serve,
    silent,
)

# --- classify ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "rejected"),
        (401, "rejected"),
        (403, "rejected"),
        (404, "rejected"),
        (408, "unavailable"),
        (413, "rejected"),
        (422, "rejected"),
        (429, "unavailable"),
        (499, "rejected"),
        (500, "unavailable"),
        (502, "unavailable"),
        (503, "unavailable"),
        (504, "unavailable"),
        (302, "unavailable"),
    ],
)
def test_classify_maps_statuses_and_passes_retry_after_only_when_asking_again_may_help(status: int, kind: str) -> None:
    failure = protocol.classify(protocol.StageStatus(status, {"message": "m", "code": "c"}, {"retry-after": "3"}))
    assert failure.kind == kind
    assert failure.retry_after_s == (3.0 if kind == "unavailable" else None)
    assert (failure.code, failure.detail) == ("c", "m")
    assert failure.message == (
        f"refused the request with HTTP {status}: m" if kind == "rejected" else f"answered HTTP {status}: m"
    )


@pytest.mark.parametrize(
    ("body", "kind", "says"),
    [
        ({"message": "bad", "code": 400}, "rejected", "refused the request with an error event (code 400): bad"),
        ({"message": "bad", "code": "400"}, "rejected", "refused the request with an error event (code 400): bad"),
        ({"message": "slow", "code": 429}, "unavailable", "answered an error event (code 429): slow"),
        ({"message": "down", "code": 500}, "unavailable", "answered an error event (code 500): down"),
        ({"message": "hm"}, "unavailable", "answered an error event (code None): hm"),
        (
            {"message": "hm", "code": "invalid_request"},
            "unavailable",
            "answered an error event (code invalid_request): hm",
        ),
        ({"message": "hm", "code": -400}, "unavailable", "answered an error event (code -400): hm"),
        # the GLM open platform's business codes are never read as HTTP statuses
        ({"message": "hm", "code": "1234"}, "unavailable", "answered an error event (code 1234): hm"),
        (
            {"message": "敏感", "code": "1301"},
            "rejected",
            "refused the request with an error event (code 1301): 敏感 (the vendor's safety check refused the content)",
        ),
        ("words", "unavailable", "answered an error event (code None): words"),
    ],
)
def test_classify_maps_error_events_by_their_code(body: object, kind: str, says: str) -> None:
    failure = protocol.classify(protocol.StageErrorEvent(body))
    assert (failure.kind, failure.message, failure.retry_after_s) == (kind, says, None)


def test_classify_maps_connection_failures_timeouts_and_malformed_answers() -> None:
    assert protocol.classify(protocol.StageUnreachable("could not be reached (x)")) == protocol.Failure(
        "unavailable", "could not be reached (x)"
    )
    assert protocol.classify(protocol.StageTimedOut("did not answer in time")) == protocol.Failure(
        "unavailable", "did not answer in time"
    )
    assert protocol.classify(protocol.StageMalformed("sent junk")) == protocol.Failure("invalid", "sent junk")


def subclasses(cls: type[protocol.StageHttpError]) -> set[type[protocol.StageHttpError]]:
    found = set(cls.__subclasses__())
    return found.union(*(subclasses(sub) for sub in found))


EXAMPLES: dict[type[protocol.StageHttpError], protocol.StageHttpError] = {
    protocol.StageUnreachable: protocol.StageUnreachable("could not be reached (x)"),
    protocol.StageTimedOut: protocol.StageTimedOut("did not answer in time"),
    protocol.StageStatus: protocol.StageStatus(418, "teapot", {}),
    protocol.StageErrorEvent: protocol.StageErrorEvent({"message": "x"}),
    protocol.StageMalformed: protocol.StageMalformed("sent junk"),
}


def test_every_error_of_the_tree_has_a_meaning() -> None:
    defined = {cls for cls in subclasses(protocol.StageHttpError) if cls.__module__ == errors_module.__name__}
    assert defined == set(EXAMPLES), "a new StageHttpError needs an example here and a case in classify"
    for error in EXAMPLES.values():
        failure = protocol.classify(error)
        assert failure.kind in ("unavailable", "rejected", "invalid")
        assert failure.message


# --- the request ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("suffix", "path"),
    [
        ("", "/chat/completions"),
        ("/", "/chat/completions"),
        ("/v1", "/v1/chat/completions"),
        ("/v1/", "/v1/chat/completions"),
        ("/a/b/v1", "/a/b/v1/chat/completions"),
    ],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_the_request_goes_to_the_base_urls_path_as_json_with_its_headers(
    transport: str, suffix: str, path: str
) -> None:
    async with serve(always(response())) as server, client_for(transport, server.url + suffix) as client:
        assert await collect(client, {"x-request-id": "r-1"}) == EXPECTED
        async with aclosing(protocol.ChatClient(server.url + suffix, api_key="sk-test")) as keyed:
            assert await collect(keyed) == EXPECTED
    plain, keyed_request = server.requests
    assert (plain.method, plain.target) == ("POST", path)
    assert plain.body == orjson.dumps(BODY)
    assert orjson.loads(plain.body) == BODY
    assert plain.headers["host"] == f"127.0.0.1:{server.port}"
    assert plain.headers["content-length"] == str(len(plain.body))
    assert plain.headers["content-type"] == "application/json"
    assert plain.headers["authorization"] == "Bearer EMPTY"
    assert plain.headers["x-request-id"] == "r-1"
    assert "x-request-id" not in keyed_request.headers
    assert keyed_request.headers["authorization"] == "Bearer sk-test"


@pytest.mark.parametrize("key", ["sk\r\nx-injected: 1", "sk\n", "sk\0", "sk-clé"])
def test_an_api_key_that_cannot_be_a_header_is_refused_at_construction(key: str) -> None:
    with pytest.raises(ValueError, match="cannot go in a header"):
        protocol.ChatClient("http://stage.test/v1", api_key=key)


def test_a_port_no_client_could_connect_to_is_refused_at_construction() -> None:
    with pytest.raises(ValueError, match=r"(?i)port"):
        protocol.ChatClient("https://stage.test:99999/v1")


async def test_credentials_in_the_base_url_never_reach_the_server() -> None:
    async with serve(always(response())) as server, plain(f"http://user:secret@127.0.0.1:{server.port}/v1") as client:
        assert await collect(client) == EXPECTED
    [request] = server.requests
    assert request.headers["host"] == f"127.0.0.1:{server.port}"
    assert "secret" not in repr(request)


async def test_the_client_asks_for_an_unencoded_body() -> None:
    async with serve(always(response())) as server, plain(server.url) as client:
        await collect(client)
    assert server.requests[0].headers["accept-encoding"] == "identity"


@pytest.mark.parametrize(
    "headers",
    [
        {"x-a": "v\r\nx-injected: 1"},
        {"x-a": "v\nw"},
        {"x-a": "v\rw"},
        {"x-a": "v\0w"},
        {"x-a\r\nx-b": "v"},
        {"x:a": "v"},
        {"x a": "v"},
        {"x-a": "vé"},
    ],
    ids=["crlf", "lf", "cr", "nul", "in-name", "colon-in-name", "space-in-name", "non-ascii"],
)
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_a_malformed_header_is_refused_and_nothing_is_sent(transport: str, headers: dict[str, str]) -> None:
    async with serve(always(response())) as server, client_for(transport, f"{server.url}/v1") as client:
        with pytest.raises(protocol.StageUnreachable, match="nothing was sent"):
            await collect(client, headers)
        assert server.accepted == 0
        assert await collect(client) == EXPECTED  # with a pooled connection too: it stays usable
        with pytest.raises(protocol.StageUnreachable, match="nothing was sent"):
            await collect(client, headers)
        assert await collect(client) == EXPECTED
    assert len(server.requests) == 2
    assert server.accepted == 1


# --- model_ids --------------------------------------------------------------------------------------------------------


def models(raw: bytes, status: int = 200, content_type: str = "application/json") -> Handler:
    return always(response(raw, status, content_type=content_type))


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_model_ids_lists_the_ids(transport: str) -> None:
    page = {"object": "list", "data": [{"id": "a", "object": "model"}, {"id": "b/c"}, "junk", {"object": "model"}]}
    async with serve(models(orjson.dumps(page))) as server, client_for(transport, f"{server.url}/v1/") as client:
        assert await client.model_ids(2.0) == ["a", "b/c", ""]
        assert await client.model_ids(2.0) == ["a", "b/c", ""]
    assert [(r.method, r.target, r.body) for r in server.requests] == [("GET", "/v1/models", b"")] * 2
    assert server.requests[0].headers["authorization"] == "Bearer EMPTY"
    if transport == "aiohttp":
        assert server.accepted == 1


@pytest.mark.parametrize(
    ("handler", "error", "says"),
    [
        (models(b"<html>Not here</html>", content_type="text/html"), protocol.StageMalformed, "not JSON"),
        (models(b'{"models": []}'), protocol.StageMalformed, "without `data`"),
        (models(b'{"detail":"Not Found"}', 404), protocol.StageStatus, "HTTP 404"),
        (models(b'{"error":{"message":"down"}}', 503), protocol.StageStatus, "HTTP 503: down"),
        (silent, protocol.StageTimedOut, "did not answer in time"),
        (head_then_silent, protocol.StageTimedOut, "did not answer in time"),
    ],
    ids=["not-json", "no-data", "404", "503", "silent", "head-only"],
)
async def test_model_ids_raises_stage_errors_only(
    handler: Handler, error: type[protocol.StageHttpError], says: str
) -> None:
    async with serve(handler) as server, plain(f"{server.url}/v1") as client:
        started = time.monotonic()
        with pytest.raises(error, match=says):
            await client.model_ids(0.3)
        assert time.monotonic() - started < 2


async def test_model_ids_bounds_a_trickle_by_its_whole_timeout() -> None:
    """`model_ids`' timeout bounds the whole call, unlike the chat stream's first-byte timeout."""

    async def trickle(request: Request, conn: Conn) -> None:
        page = orjson.dumps({"data": [{"id": "a"}]})
        await conn.send(head(length=len(page), content_type="application/json"), *one_by_one(page), pause_s=0.1)

    async with serve(trickle) as server, plain(f"{server.url}/v1") as client:
        started = time.monotonic()
        with pytest.raises(protocol.StageTimedOut):
            await client.model_ids(0.3)
        assert time.monotonic() - started < 1
