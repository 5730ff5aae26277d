from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.settings import (
    LocalReasoningSettings,
    OcrVisionSettings,
    RemoteReasoningSettings,
    RemoteVisionSettings,
    Settings,
)


def test_nested_environment_variables_configure_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_VISION__BACKEND", "ocr")
    monkeypatch.setenv("ORCH_REASONING__BACKEND", "local")
    monkeypatch.setenv("ORCH_REASONING__MODEL", "/models/glm-4-9b")
    monkeypatch.setenv("ORCH_LIMITS__MAX_IMAGE_BYTES", "1234")
    settings = Settings()
    assert settings.vision.backend == "ocr"
    assert settings.reasoning.backend == "local"
    assert isinstance(settings.reasoning, LocalReasoningSettings)
    assert settings.reasoning.model == "/models/glm-4-9b"
    assert settings.limits.max_image_bytes == 1234


def test_defaults_run_the_embedded_models_offline() -> None:
    settings = Settings()
    assert (settings.vision.backend, settings.reasoning.backend) == ("ocr", "local")
    assert isinstance(settings.reasoning, LocalReasoningSettings)
    assert settings.reasoning.model is None
    assert settings.reasoning.allow_download is False


def test_unknown_backends_and_fields_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_REASONING__BACKEND", "gpt")
    with pytest.raises(ValidationError, match=r"reasoning\.backend"):
        Settings()
    monkeypatch.delenv("ORCH_REASONING__BACKEND")
    monkeypatch.setenv("ORCH_REASONING__MODLE", "typo")
    with pytest.raises(ValidationError, match="modle"):
        Settings()


def test_a_backends_variables_apply_without_naming_the_default_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_VISION__TAGS", "false")
    monkeypatch.setenv("ORCH_VISION__RETRY__ATTEMPTS", "1")
    monkeypatch.setenv("ORCH_REASONING__CACHE_DIR", "/cache")
    monkeypatch.setenv("ORCH_REASONING__MAX_NEW_TOKENS", "40")
    settings = Settings()
    assert settings.vision == OcrVisionSettings.model_validate({"tags": False, "retry": {"attempts": 1}})
    assert settings.reasoning == LocalReasoningSettings(cache_dir=Path("/cache"), max_new_tokens=40)


def test_the_remote_backends_read_their_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    for stage in ("VISION", "REASONING"):
        monkeypatch.setenv(f"ORCH_{stage}__BACKEND", "remote")
        monkeypatch.setenv(f"ORCH_{stage}__BASE_URL", "http://a:8000/v1, http://b:8000/v1")
        monkeypatch.setenv(f"ORCH_{stage}__MODEL", "m")
    monkeypatch.setenv("ORCH_VISION__FALLBACK", "ocr")
    monkeypatch.setenv("ORCH_VISION__TAGS", "false")  # the `ocr` fallback's
    monkeypatch.setenv("ORCH_REASONING__DIALECT", "vllm")
    settings = Settings()
    vision, reasoning = settings.vision, settings.reasoning
    assert isinstance(vision, RemoteVisionSettings)
    assert isinstance(reasoning, RemoteReasoningSettings)
    assert vision.base_urls() == reasoning.base_urls() == ("http://a:8000/v1", "http://b:8000/v1")
    assert (vision.fallback, vision.tags, vision.first_byte_timeout_s, vision.timeout_s) == ("ocr", False, 15, 25)
    assert (reasoning.dialect, reasoning.first_byte_timeout_s, reasoning.timeout_s) == ("vllm", 10, 20)


@pytest.mark.parametrize(
    ("variables", "refused"),
    [
        ({"ORCH_VISION__DEVICE": "cuda"}, r"vision\.ocr\.device"),
        ({"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": "m", "ORCH_VISION__DIALECT": "vllm"}, "glm.dialect"),
        ({"ORCH_VISION__BACKEND": "glm"}, r"vision\.glm\.model"),
        ({"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": ""}, r"vision\.glm\.model"),
        ({"ORCH_VISION__BACKEND": "remote", "ORCH_VISION__MODEL": "m"}, r"vision\.remote\.base_url"),
        ({"ORCH_REASONING__BACKEND": "none", "ORCH_REASONING__MODEL": "m"}, r"reasoning\.none\.model"),
        ({"ORCH_REASONING__BASE_URL": "http://a/v1"}, r"reasoning\.local\.base_url"),
        ({"ORCH_REASONING__BACKEND": "remote", "ORCH_REASONING__BASE_URL": "http://a/v1"}, r"remote\.model"),
    ],
)
def test_a_variable_of_another_backend_or_a_missing_one_is_refused(
    variables: dict[str, str], refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError, match=refused):
        Settings()


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [("", "no endpoint"), (" , ", "no endpoint"), ("ftp://a/v1", "not an http"), ("http://a/v1,http://a/v1", "twice")],
)
def test_remote_endpoints_are_http_urls_each_listed_once(base_url: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        RemoteVisionSettings(base_url=base_url, model="m")
