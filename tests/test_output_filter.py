"""The output filter: configured terms never reach a client, on every output path, streamed answers included (a term
split across two deltas too)."""

from __future__ import annotations

import base64
import json
import random
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from orchestrator.analysis.pipeline import Pipeline
from orchestrator.analysis.routing import KeywordRouter
from orchestrator.analysis.types import AnalyzeInput, DeltaEvent, DoneEvent, PipelineEvent
from orchestrator.api.app import create_app
from orchestrator.security.output_filter import OutputFilter, filtered_events, flush, release
from orchestrator.settings import OutputFilterSettings, Settings
from orchestrator.stage_settings import LocalReasoningSettings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeStreamingReasoning, FakeVision, FakeWitness
from tests.images import decoded, png_bytes

PNG = png_bytes()
IMAGE = "data:image/png;base64," + base64.b64encode(PNG).decode()
TERMS = "secret code, 机密 ,TOTAL"
ANSWER = "The secret code is 54.06; 机密 data."
FILTERED = "The [removed] is 54.06; [removed] data."
WHY = "Why is the secret code 54.06?"


def make_filter(terms: str = TERMS, replacement: str = "[removed]") -> OutputFilter:
    return OutputFilter.from_settings(OutputFilterSettings(terms=terms, replacement=replacement))


def streamed(output_filter: OutputFilter, pieces: list[str]) -> tuple[list[str], str]:
    """What a stream of `pieces` emits, piece by piece, and the flushed tail."""
    emitted, pending = [], ""
    for piece in pieces:
        out, pending = release(output_filter, pending, piece)
        emitted.append(out)
    return emitted, flush(output_filter, pending)


# --- the filter itself ----------------------------------------------------------------------------------------------


def test_terms_are_replaced_case_insensitively_in_any_script() -> None:
    output_filter = make_filter()
    assert output_filter.text("SECRET Code, Secret code and secret coder; total 5") == (
        "[removed], [removed] and [removed]r; [removed] 5"
    )
    assert output_filter.text("这是机密文件") == "这是[removed]文件"
    assert output_filter.text("nothing to hide") == "nothing to hide"


def test_the_longest_of_overlapping_terms_wins() -> None:
    output_filter = make_filter("bad, badword")
    assert output_filter.terms == ("badword", "bad")
    assert output_filter.text("a badword and a bad one") == "a [removed] and a [removed] one"


def test_no_terms_is_a_no_op_and_blank_terms_are_ignored() -> None:
    assert not make_filter("").active
    assert make_filter(" , ,").terms == ()
    assert release(make_filter(""), "ab", "cd") == ("abcd", "")


def test_a_replacement_containing_a_term_is_refused_at_startup() -> None:
    with pytest.raises(ValidationError, match="contains the term"):
        OutputFilterSettings(terms="removed", replacement="[REMOVED]")
    with pytest.raises(ValueError, match="contains the term"):
        OutputFilter(("x",), "xx")


def test_a_term_split_across_two_deltas_is_caught() -> None:
    output_filter = make_filter()
    emitted, tail = streamed(output_filter, ["The sec", "ret co", "de is 54.06; 机", "密 data."])
    assert "".join(emitted) + tail == FILTERED
    assert not any("sec" in piece.lower() or "机" in piece for piece in emitted)


@pytest.mark.parametrize("text", [ANSWER, "secret codesecret code", "TOTALtotal 机密机密!", "s", ""])
def test_any_split_of_a_stream_emits_the_filtered_whole(text: str) -> None:
    output_filter = make_filter()
    for cut in range(len(text) + 1):
        emitted, tail = streamed(output_filter, [text[:cut], text[cut:]])
        assert "".join(emitted) + tail == output_filter.text(text)
    rng = random.Random(7)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, rng.randint(1, 6))))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        emitted, tail = streamed(output_filter, pieces)
        assert "".join(emitted) + tail == output_filter.text(text)


def test_only_a_tail_shorter_than_the_longest_term_is_held_back() -> None:
    output_filter = make_filter("abcdef")
    out, pending = release(output_filter, "", "0123456789")
    assert (out, pending) == ("01234", "56789")
    out, pending = release(output_filter, pending, "abc")
    assert (out, pending) == ("567", "89abc")


async def test_filtered_events_flush_the_tail_before_the_next_event() -> None:
    pipe = Pipeline(FakeVision(), FakeStreamingReasoning(answer=ANSWER), LocalReasoningSettings(), KeywordRouter())
    events: list[PipelineEvent] = [
        event async for event in filtered_events(pipe.stream(AnalyzeInput(decoded(), WHY)), make_filter())
    ]
    text = "".join(event.text for event in events if isinstance(event, DeltaEvent))
    assert text == FILTERED
    assert not any("secret" in event.text for event in events if isinstance(event, DeltaEvent))
    last = events[-1]
    assert isinstance(last, DoneEvent)
    assert last.outcome.answer == FILTERED
    assert not last.replaced


def test_json_answers_stay_json_with_their_fields_filtered() -> None:
    output_filter = make_filter("secret", replacement='["x"]')
    answer = '{"merchant":"Secret shop","secret":"no","total":54.06}'
    assert json.loads(output_filter.answer(answer)) == {"merchant": '["x"] shop', '["x"]': "no", "total": 54.06}
    assert output_filter.answer("The secret is 5.") == 'The ["x"] is 5.'


# --- every output path ----------------------------------------------------------------------------------------------


def make_client(reasoning: FakeReasoning | None = None, terms: str = TERMS) -> TestClient:
    settings = Settings(output_filter=OutputFilterSettings(terms=terms))
    backends = Backends(FakeVision(), reasoning or FakeStreamingReasoning(answer=ANSWER))
    return TestClient(create_app(settings, backends), raise_server_exceptions=False)


@pytest.fixture
def client() -> Iterator[TestClient]:
    with make_client() as c:
        yield c


def sse(text: str) -> list[tuple[str | None, dict[str, Any]]]:
    events: list[tuple[str | None, dict[str, Any]]] = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.split("\n"))
        if fields["data"] != "[DONE]":
            events.append((fields.get("event"), json.loads(fields["data"])))
    return events


def leaks(body: object) -> list[str]:
    """Every string in `body` that still holds a term."""
    if isinstance(body, str):
        lowered = body.lower()
        return [body] if any(term in lowered for term in ("secret code", "机密", "total")) else []
    if isinstance(body, dict):
        return [leak for value in body.values() for leak in leaks(value)]
    if isinstance(body, list):
        return [leak for value in body for leak in leaks(value)]
    return []


def test_analyze_json_answers_are_filtered_everywhere(client: TestClient) -> None:
    body = client.post("/v1/analyze", json={"question": WHY, "image_url": IMAGE}).json()
    assert body["answer"] == FILTERED
    assert body["reasoning"]["answer"] == FILTERED
    assert body["vision"]["structured"]["text_lines"][-1]["text"] == "[removed] 54.06"  # the image read "TOTAL"
    assert leaks({key: value for key, value in body.items() if key != "route"}) == []
    vision_only = client.post("/v1/analyze", files={"image": ("x.png", PNG)}, data={"question": "What is it?"})
    assert vision_only.json()["answer"] == "Text in the image most relevant to the question: “[removed] 54.06”."


def test_the_witness_reading_a_check_cites_is_filtered() -> None:
    settings = Settings(output_filter=OutputFilterSettings(terms=TERMS))
    vision, reasoning = FakeVision(lines=("TOTAL 90.00",)), FakeReasoning(answer="The total is 90.00.")
    backends = Backends(vision, reasoning, witness=FakeWitness(lines=("TOTAL 80.00",)))
    with TestClient(create_app(settings, backends)) as client:
        body = client.post("/v1/analyze", files={"image": ("x.png", PNG)}, data={"question": WHY}).json()
    check = body["arbitration"]["checks"][0]
    assert (check["verdict"], check["witness"]["text"]) == ("contradicted", "[removed] 80.00")
    assert leaks({key: value for key, value in body.items() if key != "route"}) == []


def test_analyze_stream_catches_a_term_split_across_deltas(client: TestClient) -> None:
    response = client.post("/v1/analyze", json={"question": WHY, "image_url": IMAGE, "stream": True})
    events = sse(response.text)
    pieces = [data["text"] for name, data in events if name == "reasoning"]
    assert "".join(pieces) == FILTERED
    # The fake streams word by word: "secret" and "code" come in two deltas; neither may show.
    assert not any("secret" in piece or "code" in piece for piece in pieces)
    final = events[-1][1]
    assert (events[-1][0], final["answer"], final["replaced"]) == ("done", FILTERED, False)
    arbitration = next(data for name, data in events if name == "arbitration")
    assert arbitration["answer"] == FILTERED
    assert leaks([data for name, data in events if name != "route"]) == []


def test_chat_completion_json_is_filtered(client: TestClient) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                             {"type": "text", "text": WHY}]}]  # fmt: skip
    body = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages}).json()
    assert body["choices"][0]["message"]["content"] == FILTERED
    assert body["orchestration"]["answer"] == FILTERED
    assert leaks({key: value for key, value in body["orchestration"].items() if key != "route"}) == []


def test_chat_completion_chunks_catch_a_term_split_across_deltas(client: TestClient) -> None:
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMAGE}},
                                             {"type": "text", "text": WHY}]}]  # fmt: skip
    response = client.post("/v1/chat/completions", json={"model": "auto", "messages": messages, "stream": True})
    chunks = [data for _, data in sse(response.text)]
    pieces = [chunk["choices"][0]["delta"].get("content") or "" for chunk in chunks if chunk["choices"]]
    assert "".join(pieces) == FILTERED
    assert not any("secret" in piece or "code" in piece for piece in pieces)
    assert chunks[-1]["orchestration"]["answer"] == FILTERED


def test_infer_and_caption_are_filtered() -> None:
    with make_client(terms="lines of text, secret code") as client:
        infer = client.post("/infer", json={"image_url": IMAGE, "prompt": WHY}).json()
        caption = client.post("/caption", files={"file": ("x.png", PNG, "image/png")}).json()
    assert infer["answer"] == "The [removed] is 54.06; 机密 data."
    assert caption["caption"] == "An image with 3 [removed]."


def test_nothing_is_changed_without_terms() -> None:
    with make_client(terms="") as client:
        body = client.post("/v1/analyze", json={"question": WHY, "image_url": IMAGE}).json()
    assert body["answer"] == ANSWER
