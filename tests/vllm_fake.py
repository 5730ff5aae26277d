"""A fake vLLM: serves the recorded responses of `tests/recorded/`, through `httpx.MockTransport` or as a Starlette
app on loopback, and checks that each chat request has the shape vLLM accepts.

`FakeVllm(model, replies, models)` answers each `POST …/chat/completions` with the next of `replies` and
`GET …/models` with `models`: a `Recorded` response, or an exception for the transport to raise (`httpx.ConnectError`,
`httpx.ReadTimeout`). The JSON bodies of the chat requests are kept in `requests`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

RECORDED = Path(__file__).resolve().parent / "recorded"
_DATA_URL = re.compile(r"data:image/(png|jpeg);base64,(.+)", re.DOTALL)
_VLLM_FIELDS = {"model", "messages", "stream", "stream_options", "max_tokens", "temperature", "chat_template_kwargs"}
REQUEST_FIELDS: dict[str, set[str]] = {
    "auto": _VLLM_FIELDS,
    "vllm": _VLLM_FIELDS | {"skip_special_tokens"},
    "sglang": _VLLM_FIELDS | {"skip_special_tokens"},
    "openai": {"model", "messages", "stream", "stream_options", "max_completion_tokens", "temperature"},
    "zhipu": {"model", "messages", "stream", "max_tokens", "temperature", "do_sample", "thinking"},
}
"""The fields each dialect may send (`stage_protocol.client.dialects`): what that server documents and accepts."""


@dataclass(frozen=True)
class Recorded:
    status: int
    headers: dict[str, str]
    body: bytes

    def with_headers(self, **headers: str) -> Recorded:
        return replace(self, headers={**self.headers, **{k.replace("_", "-"): v for k, v in headers.items()}})

    def replaced(self, old: str, new: str) -> Recorded:
        """The same response with `old` replaced by `new` in the body (which must hold `old`)."""
        assert old.encode() in self.body, f"{old!r} is not in the recorded body"
        return replace(self, body=self.body.replace(old.encode(), new.encode()))

    def events(self) -> list[bytes]:
        """The body as server-sent events (each with its blank line), as a server writes them one by one."""
        return [event + b"\n\n" for event in self.body.split(b"\n\n") if event] or [b""]


def recorded(name: str) -> Recorded:
    entry = json.loads((RECORDED / "index.json").read_text(encoding="utf-8"))[name]
    return Recorded(entry["status"], dict(entry["headers"]), (RECORDED / entry["body"]).read_bytes())


def vllm_stream(model: str, pieces: list[str], finish_reason: str = "stop") -> Recorded:
    """A vLLM-format stream of these content pieces (in the recorded layout), for cases no recording covers."""
    head: dict[str, object] = {"id": "chatcmpl-00000000000000000000000000000000", "object": "chat.completion.chunk"}
    head |= {"created": 1764048000, "model": model}

    def chunk(delta: dict[str, str], finish: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return "data: " + json.dumps({**head, "choices": [choice]}, separators=(",", ":")) + "\n\n"

    events = [chunk({"role": "assistant", "content": ""})] + [chunk({"content": piece}) for piece in pieces]
    body = "".join(events) + chunk({"content": ""}, finish_reason) + "data: [DONE]\n\n"
    return Recorded(200, {"content-type": "text/event-stream; charset=utf-8"}, body.encode())


def check_chat_request(body: dict[str, Any], model: str, dialect: str = "auto") -> None:
    """Assert `body` is a streaming chat request the server of `dialect` accepts (vLLM's for `auto`), for `model`."""
    allowed = REQUEST_FIELDS[dialect]
    assert set(body) <= allowed, f"unexpected fields: {sorted(set(body) - allowed)}"
    assert body["model"] == model
    assert body["stream"] is True
    if "stream_options" in allowed:
        assert body["stream_options"] == {"include_usage": True}
    limit = body["max_completion_tokens" if dialect == "openai" else "max_tokens"]
    assert isinstance(limit, int)
    assert limit >= 1
    if "do_sample" not in body:
        assert isinstance(body["temperature"], int | float)
        assert 0 <= body["temperature"] <= (1 if dialect == "zhipu" else 2)
    messages = body["messages"]
    assert isinstance(messages, list)
    assert messages
    for message in messages:
        assert message["role"] in ("system", "user", "assistant")
        if not isinstance(message["content"], str):
            for part in message["content"]:
                _check_part(part, bare_base64=dialect == "zhipu")


def _check_part(part: dict[str, Any], *, bare_base64: bool) -> None:
    """A `text` part with text, or an `image_url` part with an http(s) URL or a base64 image `data:` URL (bare
    base64 for the GLM open platform)."""
    if part["type"] == "text":
        assert isinstance(part["text"], str)
        assert part["text"]
        return
    assert part["type"] == "image_url", f"unexpected content part {part['type']!r}"
    url = part["image_url"]["url"]
    if url.startswith(("http://", "https://")):
        return
    if bare_base64:
        assert not url.startswith("data:"), "the GLM open platform takes bare base64"
        base64.b64decode(url, validate=True)
    else:
        decode_data_url(url)


def decode_data_url(url: str) -> tuple[str, bytes]:
    """(subtype, bytes) of a `data:image/...;base64,...` URL; asserts it is one."""
    match = _DATA_URL.fullmatch(url)
    assert match, f"not an image data: URL: {url[:60]}"
    try:
        return match.group(1), base64.b64decode(match.group(2), validate=True)
    except binascii.Error as exc:
        raise AssertionError(f"the data: URL's payload is not base64: {exc}") from None


@dataclass
class FakeVllm:
    model: str
    replies: list[Recorded | Exception] = field(default_factory=list)
    models: Recorded | Exception | None = None
    requests: list[dict[str, Any]] = field(default_factory=list)
    dialect: str = "auto"

    def reply(self, method: str, path: str, authorization: str | None, content: bytes) -> Recorded:
        """The scripted answer to one request; asserts the request's shape first."""
        assert (authorization or "").startswith("Bearer "), "no API key sent"
        if method == "GET" and path.endswith("/models"):
            return _answer_or_raise(self.models)
        assert (method, path.rsplit("/v1/", 1)[-1]) == ("POST", "chat/completions"), f"unexpected {method} {path}"
        body = json.loads(content)
        check_chat_request(body, self.model, self.dialect)
        self.requests.append(body)
        assert self.replies, "more chat requests than scripted replies"
        return _answer_or_raise(self.replies.pop(0))

    def handler(self, request: httpx.Request) -> httpx.Response:
        """The `httpx.MockTransport` handler: a scripted exception is raised with this request attached."""
        try:
            answer = self.reply(request.method, request.url.path, request.headers.get("authorization"), request.read())
        except httpx.RequestError as exc:
            exc.request = request
            raise
        return httpx.Response(answer.status, headers=answer.headers, content=_chunks(answer))

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.MockTransport(self.handler))

    def app(self) -> Starlette:
        """The same fake as an ASGI app, streaming each event as its own write (for a real loopback server)."""

        async def answer(request: Request) -> Response:
            recorded_answer = self.reply(
                request.method, request.url.path, request.headers.get("authorization"), await request.body()
            )
            return StreamingResponse(_chunks(recorded_answer), recorded_answer.status, recorded_answer.headers)

        routes = [Route("/v1/chat/completions", answer, methods=["POST"]), Route("/v1/models", answer)]
        return Starlette(routes=routes)


def _answer_or_raise(answer: Recorded | Exception | None) -> Recorded:
    assert answer is not None, "no answer was scripted for this request"
    if isinstance(answer, Exception):
        raise answer
    return answer


async def _chunks(answer: Recorded) -> AsyncIterator[bytes]:
    for event in answer.events():
        yield event
