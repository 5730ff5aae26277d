"""The orchestrator against stages that fail in every way `tests.faulty_server` knows, over real HTTP on loopback.

For each fault mode: the reasoning stage failing gives a degraded vision-only answer (200, `degraded: true`, the
failure naming the stage, the backend and the attempt); the vision stage failing gives a 503 with `Retry-After`
naming the vision stage (or a 502 for garbage), or the `ocr` fallback's answer when configured. Every request ends
well inside the request's deadline: none hangs.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from fastapi.testclient import TestClient

from orchestrator.api.app import create_app
from orchestrator.settings import CacheSettings, LimitSettings, RouterSettings, Settings
from orchestrator.stage_settings import (
    AdmissionSettings,
    BreakerSettings,
    RemoteReasoningSettings,
    RemoteVisionSettings,
    RetrySettings,
)
from tests.faulty_server import Faults, FaultyServer, Mode, refused_base_url, running
from tests.images import png_bytes

DEADLINE_S = 6.0
TIMEOUTS: dict[str, Any] = {
    "connect_timeout_s": 1.0,
    "first_byte_timeout_s": 0.5,
    "timeout_s": 1.5,
    "retry": RetrySettings(attempts=2, backoff_s=0.01, backoff_max_s=0.02),
    "breaker": BreakerSettings(failures=1000, min_calls=1000),
}
FAULTS = Faults(trickle_delay_s=0.4, huge_bytes=4 * 1024 * 1024, retry_after="0")
REQUEST = {"image_base64": base64.b64encode(png_bytes()).decode(), "question": "Is this total right?"}


def settings_for(vision_urls: str, reasoning_urls: str, **vision: Any) -> Settings:
    return Settings(
        vision=RemoteVisionSettings(base_url=vision_urls, model="m", **{**TIMEOUTS, **vision}),
        reasoning=RemoteReasoningSettings(base_url=reasoning_urls, model="m", **TIMEOUTS),
        router=RouterSettings(kind="keyword"),
        limits=LimitSettings(request_deadline_s=DEADLINE_S, fallback_reserve_s=2.0),
        cache=CacheSettings(enabled=False),  # every request must reach the stages
    )


@contextmanager
def orchestrator(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings)) as client:
        yield client


def analyze(client: TestClient, mode: str = "reasoning") -> tuple[int, dict[str, Any], float, dict[str, str]]:
    started = time.monotonic()
    response = client.post("/v1/analyze", json={**REQUEST, "mode": mode})
    return response.status_code, response.json(), time.monotonic() - started, dict(response.headers)


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[FaultyServer, str, FaultyServer, str]]:
    vision, reasoning = FaultyServer(model="m", faults=FAULTS), FaultyServer(model="m", faults=FAULTS)
    with running(vision) as vision_live, running(reasoning) as reasoning_live:
        yield vision, vision_live.base_url, reasoning, reasoning_live.base_url


@pytest.fixture
def stages(servers: tuple[FaultyServer, str, FaultyServer, str]) -> tuple[FaultyServer, str, FaultyServer, str]:
    """The two servers, answering normally again and with nothing recorded (each test scripts its faults)."""
    vision, _, reasoning, _ = servers
    vision.reset()
    reasoning.reset()
    return servers


REASONING_FAULTS: list[tuple[Mode, int]] = [
    ("status_500", 2),  # retried once, then given up
    ("status_503", 2),
    ("hang_before_headers", 2),  # nothing arrived: retried
    ("hang_after_headers", 2),
    ("trickle", 1),  # part of the answer had arrived: not retried
    ("malformed_json", 1),  # garbage: not retried
    ("wrong_content_type", 1),
    ("truncated", 1),
    ("dropped", 1),
    ("huge_body", 1),
]


@pytest.mark.parametrize(("mode", "attempts"), REASONING_FAULTS)
def test_a_failing_reasoning_stage_gives_a_degraded_answer_in_time(
    stages: tuple[FaultyServer, str, FaultyServer, str], mode: Mode, attempts: int
) -> None:
    _vision, vision_url, reasoning, reasoning_url = stages
    reasoning.reset(default=mode, faults=FAULTS)
    with orchestrator(settings_for(vision_url, reasoning_url)) as client:
        status, body, took, _ = analyze(client)
    assert status == 200, body
    assert body["degraded"] is True
    assert body["mode"] == "vision_only"
    assert body["answer"]
    [failure] = body["failures"]
    assert failure["stage"] == "reasoning"
    assert failure["backend"] == "remote"
    assert f"reasoning stage, attempt {attempts} of at most 2" in failure["message"]
    assert reasoning_url in failure["message"]
    assert len(reasoning.chat_requests) == attempts
    assert took < DEADLINE_S


def test_a_transient_reasoning_failure_is_retried_and_answered_whole(
    stages: tuple[FaultyServer, str, FaultyServer, str],
) -> None:
    _vision, vision_url, reasoning, reasoning_url = stages
    reasoning.script(["status_429"])
    with orchestrator(settings_for(vision_url, reasoning_url)) as client:
        status, body, _, _ = analyze(client)
    assert status == 200
    assert body["degraded"] is False
    assert body["mode"] == "vision_then_reasoning"
    assert [r.mode for r in reasoning.chat_requests] == ["status_429", "ok"]


def test_a_refused_reasoning_connection_gives_a_degraded_answer(
    stages: tuple[FaultyServer, str, FaultyServer, str],
) -> None:
    _vision, vision_url, _, _ = stages
    with orchestrator(settings_for(vision_url, refused_base_url())) as client:
        status, body, took, _ = analyze(client)
    assert status == 200
    assert body["degraded"] is True
    assert "could not be reached" in body["failures"][0]["message"]
    assert took < DEADLINE_S


VISION_FAULTS: list[tuple[Mode, int, str]] = [
    ("status_500", 503, "vision_unavailable"),
    ("status_429", 503, "vision_unavailable"),
    ("hang_before_headers", 503, "vision_unavailable"),
    ("trickle", 503, "vision_unavailable"),
    ("malformed_json", 502, "vision_invalid_output"),
    ("wrong_content_type", 502, "vision_invalid_output"),
    ("truncated", 502, "vision_invalid_output"),
    ("dropped", 503, "vision_unavailable"),
    ("huge_body", 502, "vision_invalid_output"),
]


@pytest.mark.parametrize(("mode", "status", "slug"), VISION_FAULTS)
def test_a_failing_vision_stage_is_a_clear_error_naming_the_stage_in_time(
    stages: tuple[FaultyServer, str, FaultyServer, str], mode: Mode, status: int, slug: str
) -> None:
    vision, vision_url, reasoning, reasoning_url = stages
    vision.reset(default=mode, faults=FAULTS)
    with orchestrator(settings_for(vision_url, reasoning_url)) as client:
        got, body, took, headers = analyze(client, mode="vision")
    assert got == status, body
    assert body["error"]["type"] == slug
    assert "vision stage, attempt" in body["error"]["message"]
    if status == 503:
        assert int(headers["retry-after"]) >= 1
    assert not reasoning.chat_requests
    assert took < DEADLINE_S


def test_the_ocr_fallback_answers_when_the_vision_server_is_down(
    stages: tuple[FaultyServer, str, FaultyServer, str],
) -> None:
    vision, vision_url, _reasoning, reasoning_url = stages
    vision.reset(default="status_500")
    settings = settings_for(vision_url, reasoning_url, fallback="ocr", tags=False)
    with orchestrator(settings) as client:
        status, body, took, _ = analyze(client, mode="vision")
    assert status == 200, body
    assert body["vision"]["backend"] == "ocr"
    assert body["degraded"] is True
    assert body["notices"] == [
        "The remote vision backend could not answer (VisionUnavailable); the ocr backend answered instead."
    ]
    [failure] = body["failures"]
    assert (failure["stage"], failure["backend"], failure["error_type"]) == ("vision", "remote", "VisionUnavailable")
    assert "vision stage, attempt 2 of at most 2" in failure["message"]
    assert took < DEADLINE_S


def test_a_dead_endpoint_is_ejected_by_its_breaker_and_shown_in_ready(
    stages: tuple[FaultyServer, str, FaultyServer, str],
) -> None:
    vision, vision_url, _reasoning, reasoning_url = stages
    dead = refused_base_url()
    breaker = BreakerSettings(failures=2, open_s=60)
    settings = settings_for(f"{dead},{vision_url}", reasoning_url, breaker=breaker)
    with orchestrator(settings) as client:
        answers = [analyze(client, mode="vision") for _ in range(6)]
        ready = client.get("/ready").json()
    assert [status for status, *_ in answers] == [200] * 6  # a failed attempt on the dead one is retried on the other
    assert len(vision.chat_requests) == 6
    [dead_state, live_state] = ready["vision"]["endpoints"]
    assert (dead_state["endpoint"], dead_state["breaker"]) == (dead, "open")
    assert (live_state["endpoint"], live_state["breaker"]) == (vision_url, "closed")
    assert 0 < dead_state["retry_in_s"] <= 60


def test_beyond_the_admission_bounds_a_request_is_refused_at_once_as_overloaded(
    stages: tuple[FaultyServer, str, FaultyServer, str],
) -> None:
    import threading

    vision, vision_url, _reasoning, reasoning_url = stages
    vision.reset(default="trickle", faults=Faults(trickle_delay_s=0.2))
    admission = AdmissionSettings(max_in_flight=1, max_queue=0)
    settings = settings_for(vision_url, reasoning_url, admission=admission, timeout_s=5.0, first_byte_timeout_s=5.0)
    with orchestrator(settings) as client:
        first = threading.Thread(target=analyze, args=(client, "vision"))
        first.start()
        while not vision.chat_requests:
            time.sleep(0.01)
        status, body, took, headers = analyze(client, mode="vision")
        first.join(timeout=DEADLINE_S)
    assert status == 503
    assert body["error"]["type"] == "overloaded"
    assert headers["retry-after"] == "1"
    assert took < 0.5
    assert not first.is_alive()


# With the default settings: an interactive user gets the degraded answer within 30 s, whatever the reasoning stage does


INTERACTIVE_S = 30.0


@pytest.mark.parametrize(
    ("mode", "faults"),
    [
        ("hang_before_headers", Faults(hang_limit_s=120)),  # hung: accepts the request, never answers
        ("hang_after_headers", Faults(hang_limit_s=120)),  # silent: answers 200, then nothing
        ("trickle", Faults(pieces=40, trickle_delay_s=2.0)),  # slow: a token every 2 s, 80 s for the answer
    ],
)
def test_with_default_settings_a_hung_silent_or_slow_reasoning_stage_degrades_within_30_s(
    stages: tuple[FaultyServer, str, FaultyServer, str], mode: Mode, faults: Faults
) -> None:
    _vision, vision_url, reasoning, reasoning_url = stages
    reasoning.reset(default=mode, faults=faults)
    settings = Settings(
        vision=RemoteVisionSettings(base_url=vision_url, model="m"),
        reasoning=RemoteReasoningSettings(base_url=reasoning_url, model="m"),
        router=RouterSettings(kind="keyword"),
        cache=CacheSettings(enabled=False),
    )
    try:
        with orchestrator(settings) as client:
            status, body, took, _ = analyze(client)
    finally:
        reasoning.release()
    assert status == 200, body
    assert (body["degraded"], body["mode"]) == (True, "vision_only")
    assert body["answer"]
    assert took < INTERACTIVE_S, f"the degraded answer took {took:.1f} s"
    assert len(reasoning.chat_requests) <= 2  # a second attempt only when it could run as long as the first
