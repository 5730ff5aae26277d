"""What real OpenAI clients send, answered: request bodies recorded from the `openai` SDK, LangChain's `ChatOpenAI`
and LiteLLM (`tests/recorded/clients/`, each with the client version it came from) posted to the app; the sampling
fields, the `developer` role, `logprobs`, one image per message, `GET /v1/models/{id}`, the `Allow` header of a 405
and the outcome headers; and the sampling fields in the body a `remote` reasoning backend sends, per dialect."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from orchestrator.api.app import create_app
from orchestrator.api.chat_reply import ChatCompletionOut
from orchestrator.api.chat_request import ChatCompletionRequest
from orchestrator.settings import Settings
from orchestrator.stage_settings import RemoteReasoningSettings
from orchestrator.wiring import Backends
from reasoning_stage.errors import ReasoningUnavailable
from reasoning_stage.remote import RemoteReasoningBackend
from reasoning_stage.types import ChatMessage, ReasoningRequest, Sampling
from stage_protocol.client import DialectName
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision
from tests.images import png_bytes
from tests.servers import data_url, image_message, openai_client, serving, sse_events
from tests.vllm_fake import vllm_stream

CLIENTS = Path(__file__).resolve().parent / "recorded" / "clients"
LLM_ANSWER = "The total is 54.06."
VISION_ANSWER = "Text in the image most relevant to the question: “TOTAL 54.06”."
IMAGE = data_url(png_bytes())
SAMPLING_FIELDS = ["top_p", "seed", "stop", "presence_penalty", "frequency_penalty"]
HEADERS = ("x-orchestrator-degraded", "x-orchestrator-mode", "x-orchestrator-needs-human-review")


def recorded_body(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((CLIENTS / name).read_text(encoding="utf-8"))["body"]
    return body


RECORDINGS = sorted(path.name for path in CLIENTS.glob("*.json"))


@contextmanager
def app_client(
    reasoning: FakeReasoning | None = None, settings: Settings | None = None, vision: FakeVision | None = None
) -> Iterator[httpx.Client]:
    """An HTTP client of the app served on loopback over fake stages."""
    backends = Backends(vision or FakeVision(), reasoning or FakeStreamingReasoning(answer=LLM_ANSWER))
    with serving(create_app(settings or Settings(), backends)) as server, httpx.Client(base_url=server.url) as client:
        yield client


@pytest.fixture
def client() -> Iterator[httpx.Client]:
    with app_client() as client:
        yield client


def chat(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post("/v1/chat/completions", json=body)


def streamed_answer(response: httpx.Response) -> tuple[str, dict[str, Any]]:
    """The content of a streamed answer, and the orchestration of its finish chunk."""
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    text = "".join(chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"])
    finished = [chunk for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    return text, finished[-1]["orchestration"]


def test_every_client_is_recorded_plain_and_streamed() -> None:
    for client in ("openai", "langchain", "litellm"):
        assert {f"{client}_plain.json", f"{client}_stream.json"} <= set(RECORDINGS)
    for name in RECORDINGS:
        recorded = json.loads((CLIENTS / name).read_text(encoding="utf-8"))
        assert recorded["recorded_from"]["version"], f"{name} does not say which client version sent it"


@pytest.mark.parametrize("name", RECORDINGS)
def test_a_recorded_client_body_gets_its_answer(client: httpx.Client, name: str) -> None:
    body = recorded_body(name)
    response = chat(client, body)
    assert response.status_code == 200, response.text
    expected = VISION_ANSWER if body["model"] == "auto" else LLM_ANSWER  # "What is the total?" is a look-up
    if body.get("stream"):
        text, orchestration = streamed_answer(response)
    else:
        completion = ChatCompletionOut.model_validate(response.json())
        text, orchestration = completion.choices[0].message.content, completion.orchestration.model_dump()
    assert text == expected
    assert orchestration["answer"] == expected
    assert orchestration["degraded"] is False


def test_sampling_fields_the_in_process_backend_does_not_take_are_named(client: httpx.Client) -> None:
    for name in ("openai_sampling_plain.json", "langchain_sampling_stream.json", "litellm_sampling_plain.json"):
        response = chat(client, recorded_body(name))
        assert response.status_code == 200, response.text
        orchestration = streamed_answer(response)[1] if "stream" in name else response.json()["orchestration"]
        assert orchestration["not_applied"] == SAMPLING_FIELDS  # Settings(): the `local` backend takes none


def test_without_sampling_fields_nothing_is_named(client: httpx.Client) -> None:
    response = chat(client, recorded_body("openai_plain.json"))
    assert response.json()["orchestration"]["not_applied"] == []


@pytest.mark.parametrize(
    ("dialect", "not_applied"),
    [
        ("vllm", []),
        ("openai", []),
        ("zhipu", ["seed", "stop", "presence_penalty", "frequency_penalty"]),  # two stop words: it takes one
    ],
)
def test_a_remote_backend_is_named_by_its_dialect(dialect: DialectName, not_applied: list[str]) -> None:
    reasoning = RemoteReasoningSettings(base_url="http://llm.test/v1", model="m", dialect=dialect)
    with app_client(settings=Settings(reasoning=reasoning)) as client:
        response = chat(client, recorded_body("langchain_sampling_plain.json"))
    assert response.status_code == 200, response.text
    assert response.json()["orchestration"]["not_applied"] == not_applied


def test_a_developer_message_is_read_as_system() -> None:
    reasoning = FakeStreamingReasoning(answer=LLM_ANSWER)
    with app_client(reasoning) as client:
        response = chat(client, recorded_body("openai_sampling_plain.json"))
    assert response.status_code == 200, response.text
    assert recorded_body("openai_sampling_plain.json")["messages"][0]["role"] == "developer"
    assert ChatMessage("system", "Answer in one sentence.") in reasoning.requests[0].messages


def test_a_role_that_is_none_of_openais_is_still_refused(client: httpx.Client) -> None:
    body = {"model": "auto", "messages": [{"role": "tool", "content": "x"}, *image_message("What?", IMAGE)]}
    response = chat(client, body)
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


@pytest.mark.parametrize(
    "extra", [{"logprobs": True}, {"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 2}, {"top_logprobs": 0}]
)
def test_logprobs_are_refused_as_not_supported(client: httpx.Client, extra: dict[str, Any]) -> None:
    response = chat(client, {"model": "auto", "messages": image_message("What is the total?", IMAGE), **extra})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "unsupported_parameter"
    assert "logprobs" in error["message"]
    assert "not supported" in error["message"]


@pytest.mark.parametrize(
    "extra",
    [{"top_p": 1.5}, {"seed": 2**64}, {"stop": ["a", "b", "c", "d", "e"]}, {"stop": ""}, {"presence_penalty": 3},
     {"frequency_penalty": -2.5}, {"best_of": 2}],
)  # fmt: skip
def test_out_of_range_sampling_and_unknown_fields_are_refused(client: httpx.Client, extra: dict[str, Any]) -> None:
    response = chat(client, {"model": "auto", "messages": image_message("What is the total?", IMAGE), **extra})
    assert response.status_code == 422
    assert response.json()["error"]["type"] == "validation_error"


def test_a_stop_string_is_accepted(client: httpx.Client) -> None:
    response = chat(client, {"model": "vision-then-reasoning", "messages": image_message("Why?", IMAGE), "stop": "\n"})
    assert response.status_code == 200, response.text
    assert response.json()["orchestration"]["not_applied"] == ["stop"]


def test_two_images_in_one_message_are_refused(client: httpx.Client) -> None:
    response = chat(client, {"model": "auto", "messages": image_message("Which is larger?", IMAGE, IMAGE)})
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "too_many_images"
    assert "messages.0 holds 2 images" in error["message"]
    assert "one image per request" in error["message"]


def test_the_openai_client_raises_bad_request_for_two_images() -> None:
    backends = Backends(FakeVision(), FakeStreamingReasoning(answer=LLM_ANSWER))
    with serving(create_app(Settings(), backends)) as server, pytest.raises(openai.BadRequestError) as raised:
        openai_client(server).chat.completions.create(model="auto", messages=image_message("Which?", IMAGE, IMAGE))
    assert raised.value.type == "too_many_images"


def test_the_most_recent_image_of_a_conversation_is_looked_at() -> None:
    vision = FakeVision()
    earlier, latest = data_url(png_bytes((40, 30))), data_url(png_bytes((80, 60)))
    messages = [
        *image_message("What is this?", earlier),
        {"role": "assistant", "content": "A receipt."},
        *image_message("And this one: what is the total?", latest),
    ]
    with app_client(vision=vision) as client:
        response = chat(client, {"model": "auto", "messages": messages})
    assert response.status_code == 200, response.text
    assert (vision.requests[-1].image.width, vision.requests[-1].image.height) == (80, 60)


def test_the_models_one_by_one_through_the_openai_client() -> None:
    backends = Backends(FakeVision(), FakeStreamingReasoning(answer=LLM_ANSWER))
    with serving(create_app(Settings(), backends)) as server:
        client = openai_client(server)
        listed = {model.id: model for model in client.models.list()}
        for name, model in listed.items():
            retrieved = client.models.retrieve(name)
            assert (retrieved.id, retrieved.object, retrieved.owned_by) == (name, "model", "orchestrator")
            assert retrieved.created == model.created
        assert set(listed) == {"auto", "vision-only", "vision-then-reasoning"}
        with pytest.raises(openai.NotFoundError) as raised:
            client.models.retrieve("gpt-4o")
    assert raised.value.type == "not_found"
    assert "gpt-4o" in raised.value.message


@pytest.mark.parametrize(
    ("method", "path", "allow"),
    [("GET", "/v1/chat/completions", "POST"), ("PUT", "/v1/analyze", "POST"), ("POST", "/v1/models", "GET"),
     ("DELETE", "/v1/models/auto", "GET")],
)  # fmt: skip
def test_a_405_says_which_methods_are_allowed(client: httpx.Client, method: str, path: str, allow: str) -> None:
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.headers["allow"] == allow
    assert response.json()["error"]["type"] == "method_not_allowed"


def test_a_whole_chat_answer_says_its_outcome_in_headers(client: httpx.Client) -> None:
    response = chat(client, recorded_body("langchain_sampling_plain.json"))
    orchestration = response.json()["orchestration"]
    assert [response.headers[name] for name in HEADERS] == ["false", "vision_then_reasoning", "false"]
    assert orchestration["mode"] == "vision_then_reasoning"


def test_a_degraded_chat_answer_says_so_in_its_headers() -> None:
    with app_client(FakeReasoning(error=ReasoningUnavailable("down"))) as client:
        body = recorded_body("litellm_sampling_plain.json") | {"profile": "medical"}
        response = chat(client, body)
    assert response.status_code == 200, response.text
    orchestration = response.json()["orchestration"]
    assert orchestration["degraded"] is True
    assert orchestration["needs_human_review"] is True
    assert response.headers["x-orchestrator-degraded"] == "true"
    assert response.headers["x-orchestrator-needs-human-review"] == "true"
    assert response.headers["x-orchestrator-mode"] == orchestration["mode"]


def test_a_streamed_chat_answer_has_no_outcome_headers(client: httpx.Client) -> None:
    response = chat(client, recorded_body("langchain_sampling_stream.json"))
    assert response.status_code == 200
    assert not set(HEADERS) & set(response.headers)


def test_a_whole_analyze_answer_says_its_outcome_in_headers() -> None:
    with app_client(FakeReasoning(error=ReasoningUnavailable("down"))) as client:
        body = {"image_url": IMAGE, "question": "Why is the total 54.06?", "mode": "reasoning"}
        response = client.post("/v1/analyze", json=body)
        streamed = client.post("/v1/analyze", json=body | {"stream": True})
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["degraded"] is True
    assert [response.headers[name] for name in HEADERS] == ["true", answer["mode"], "false"]
    assert streamed.status_code == 200
    assert not set(HEADERS) & set(streamed.headers)


class CapturingServer:
    """A chat-completions server that records each request body and answers `ok` (any field allowed, unlike
    `tests.vllm_fake.FakeVllm`, which allows only what each dialect sent before sampling fields)."""

    def __init__(self, answer: str = "ok") -> None:
        self.bodies: list[dict[str, Any]] = []
        self.answer = answer

    def handler(self, request: httpx.Request) -> httpx.Response:
        self.bodies.append(json.loads(request.read()))
        reply = vllm_stream("m", [self.answer])
        return httpx.Response(reply.status, headers=reply.headers, content=reply.body)


SAMPLING = Sampling(top_p=0.9, seed=7, stop=("\n\n", "END"), presence_penalty=0.1, frequency_penalty=0.2)
SENT = {"top_p": 0.9, "seed": 7, "stop": ["\n\n", "END"], "presence_penalty": 0.1, "frequency_penalty": 0.2}


@pytest.mark.parametrize(
    ("dialect", "sampling", "sent"),
    [
        ("auto", SAMPLING, SENT),
        ("vllm", SAMPLING, SENT),
        ("sglang", SAMPLING, SENT),
        ("openai", SAMPLING, SENT),
        ("zhipu", SAMPLING, {"top_p": 0.9}),
        ("zhipu", Sampling(top_p=0.5, stop=("END",), seed=1), {"top_p": 0.5, "stop": ["END"]}),
        ("vllm", Sampling(), {}),
    ],
)
async def test_sampling_fields_reach_the_remote_server(
    dialect: DialectName, sampling: Sampling, sent: dict[str, object]
) -> None:
    server = CapturingServer()
    backend = await RemoteReasoningBackend.load(
        base_url="http://llm.test/v1",
        model="m",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(server.handler)),
        dialect_name=dialect,
    )
    request = ReasoningRequest((ChatMessage("user", "Why?"),), max_new_tokens=32, temperature=0.2, sampling=sampling)
    try:
        result = await backend.generate(request)
    finally:
        await backend.aclose()
    assert result.text == "ok"
    (body,) = server.bodies
    assert {name: body[name] for name in SAMPLING_FIELDS if name in body} == sent


@pytest.mark.parametrize(
    ("dialect", "sent", "not_applied"),
    [
        ("vllm", SENT, []),
        ("zhipu", {"top_p": 0.9}, ["seed", "stop", "presence_penalty", "frequency_penalty"]),
    ],
)
@pytest.mark.parametrize("name", ["openai_sampling_plain.json", "langchain_sampling_stream.json"])
async def test_a_clients_sampling_fields_reach_the_remote_reasoning_server(
    dialect: DialectName, sent: dict[str, object], not_applied: list[str], name: str
) -> None:
    server = CapturingServer(LLM_ANSWER)
    reasoning = await RemoteReasoningBackend.load(
        base_url="http://llm.test/v1",
        model="m",
        http_client=httpx.AsyncClient(transport=httpx.MockTransport(server.handler)),
        dialect_name=dialect,
    )
    settings = Settings(reasoning=RemoteReasoningSettings(base_url="http://llm.test/v1", model="m", dialect=dialect))
    backends = Backends(FakeVision(), reasoning)
    with serving(create_app(settings, backends)) as running, httpx.Client(base_url=running.url) as client:
        response = chat(client, recorded_body(name))
    assert response.status_code == 200, response.text
    orchestration = streamed_answer(response)[1] if "stream" in name else response.json()["orchestration"]
    assert orchestration["answer"] == LLM_ANSWER
    assert orchestration["not_applied"] == not_applied
    (body,) = server.bodies
    assert {field: body[field] for field in SAMPLING_FIELDS if field in body} == sent
    assert body["temperature"] == 0.2


def test_top_p_zero_is_greedy_decoding_not_a_top_p_servers_refuse() -> None:
    body = ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "top_p": 0, "temperature": 0.7}
    )
    assert "top_p" not in body.sampling.fields()  # vLLM and SGLang refuse top_p 0
    assert body.reasoning_temperature == 0.0
    kept = ChatCompletionRequest.model_validate(
        {"model": "auto", "messages": [{"role": "user", "content": "hi"}], "top_p": 0.9, "temperature": 0.7}
    )
    assert (kept.sampling.fields()["top_p"], kept.reasoning_temperature) == (0.9, 0.7)
