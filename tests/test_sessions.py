"""Follow-up questions about an image by `session_id`, without sending it again."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from pydantic import SecretStr

from orchestrator.analysis.redis_sessions import RedisSessions
from orchestrator.analysis.sessions import MemorySessions, Session, SessionStore
from orchestrator.api.app import create_app
from orchestrator.errors import SessionNotFound
from orchestrator.settings import SessionSettings, Settings
from orchestrator.wiring import Backends
from tests.fakes import FakeReasoning, FakeVision
from tests.images import decoded, png_bytes
from vision_stage.types import DecodedImage

IMAGE = base64.b64encode(png_bytes()).decode()


def ask(client: TestClient, headers: dict[str, str] | None = None, **body: Any) -> tuple[int, dict[str, Any]]:
    response = client.post("/v1/analyze", json=body, headers=headers or {})
    return response.status_code, response.json()


def test_a_follow_up_reuses_the_image_and_on_the_reasoning_route_its_description() -> None:
    vision = FakeVision()
    with TestClient(create_app(Settings(), Backends(vision, FakeReasoning()))) as client:
        status, first = ask(client, question="Why is the total 54.06?", image_base64=IMAGE, mode="reasoning")
        assert status == 200
        session = first["session_id"]
        status, follow_up = ask(client, question="Is the total reasonable?", session_id=session, mode="reasoning")
        assert status == 200, follow_up
        assert [r.task for r in vision.requests] == ["describe"]  # the description was reused
        assert follow_up["session_id"] == session
        assert follow_up["vision"]["description"] == first["vision"]["description"]
        status, direct = ask(client, question="What is the total?", session_id=session, mode="vision")
    assert status == 200
    assert [r.task for r in vision.requests] == ["describe", "answer"]  # a direct answer is the question's own
    assert vision.requests[1].image.sha256 == vision.requests[0].image.sha256
    assert vision.requests[1].question == "What is the total?"
    assert direct["mode"] == "vision_only"


def test_a_follow_up_works_from_a_form_and_in_a_stream() -> None:
    with TestClient(create_app(Settings(), Backends(FakeVision(), FakeReasoning()))) as client:
        files = {"image": ("x.png", png_bytes(), "image/png")}
        session = client.post("/v1/analyze", files=files, data={"question": "What is it?"}).json()["session_id"]
        form = client.post("/v1/analyze", files={"session_id": (None, session), "question": (None, "And the total?")})
        assert form.status_code == 200, form.json()
        stream = client.post("/v1/analyze", json={"question": "Total?", "session_id": session, "stream": True})
    done = [line for line in stream.text.split("\n\n") if line.startswith("event: done")]
    assert json.loads(done[0].split("data: ", 1)[1])["session_id"] == session


def test_an_unknown_foreign_or_ambiguous_session_is_refused_clearly() -> None:
    settings = Settings(api_keys=SecretStr("key-a,key-b"))
    with TestClient(create_app(settings, Backends(FakeVision(), FakeReasoning()))) as client:
        a, b = {"Authorization": "Bearer key-a"}, {"Authorization": "Bearer key-b"}
        session = ask(client, a, question="What is it?", image_base64=IMAGE)[1]["session_id"]
        assert ask(client, a, question="And now?", session_id=session)[0] == 200
        status, body = ask(client, b, question="And now?", session_id=session)  # another key's session
        assert (status, body["error"]["type"]) == (404, "session_not_found")
        status, body = ask(client, a, question="And now?", session_id="no-such-session")
        assert (status, body["error"]["type"]) == (404, "session_not_found")
        status, body = ask(client, a, question="Which?", session_id=session, image_base64=IMAGE)
        assert (status, body["error"]["type"]) == (400, "image_missing")


@pytest.fixture(params=["memory", "redis"])
def stores(request: pytest.FixtureRequest) -> Callable[[SessionSettings], SessionStore]:
    """Session stores of the given settings: in memory, or in a shared Redis (emptied first)."""
    if request.param == "memory":
        return MemorySessions
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushdb()
    return lambda settings: RedisSessions(url, settings)


def same_image(session: Session, image: DecodedImage) -> bool:
    return session.image == image and session.image.pixels.tobytes() == image.pixels.tobytes()


async def test_sessions_expire_and_the_least_recently_used_go_first(
    stores: Callable[[SessionSettings], SessionStore],
) -> None:
    store = stores(SessionSettings(ttl_s=0.2, max_sessions=2))
    first = await store.open("me", decoded(), None)
    second = await store.open("me", decoded(), None)
    await store.get(first.id, "me")  # first is now the most recently used
    await store.open("me", decoded(), None)  # evicts second
    with pytest.raises(SessionNotFound):
        await store.get(second.id, "me")
    with pytest.raises(SessionNotFound):
        await store.get(first.id, "another caller")
    await asyncio.sleep(0.25)
    with pytest.raises(SessionNotFound, match="expired"):
        await store.get(first.id, "me")
    await store.aclose()


async def test_kept_images_stay_within_the_byte_budget(stores: Callable[[SessionSettings], SessionStore]) -> None:
    image = decoded((100, 100))  # 30,000 bytes of pixels, plus its PNG
    store = stores(SessionSettings(max_bytes=70_000))
    first = await store.open("me", image, None)
    second = await store.open("me", image, None)
    third = await store.open("me", image, None)  # over the budget: the least recently used goes
    with pytest.raises(SessionNotFound):
        await store.get(first.id, "me")
    assert same_image(await store.get(second.id, "me"), image)
    assert same_image(await store.get(third.id, "me"), image)
    await store.aclose()
    alone = stores(SessionSettings(max_bytes=1_000))  # less than one image: the most recent is still kept
    kept = await alone.open("me", image, None)
    newest = await alone.open("me", image, None)
    with pytest.raises(SessionNotFound):
        await alone.get(kept.id, "me")
    assert same_image(await alone.get(newest.id, "me"), image)
    await alone.aclose()


async def test_an_image_kept_without_its_upload_comes_back_from_redis_pixel_for_pixel(redis_url: str) -> None:
    pixels = decoded((40, 30)).pixels.rotate(90, expand=True)  # as if an EXIF orientation had been applied
    image = DecodedImage(pixels, "JPEG", 30, 40, 1234, "f00d")  # no `source`: the upload does not hold these pixels
    store = RedisSessions(redis_url, SessionSettings())
    session = await store.open("me", image, None)
    back = await store.get(session.id, "me")
    await store.aclose()
    assert same_image(back, image)
    assert (back.image.format, back.image.byte_size, back.image.source) == ("JPEG", 1234, None)
