from __future__ import annotations

import pytest
from pydantic import ValidationError

from orchestrator.settings import Settings


def test_nested_environment_variables_configure_the_stages(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORCH_VISION__BACKEND", "ocr")
    monkeypatch.setenv("ORCH_REASONING__BACKEND", "none")
    monkeypatch.setenv("ORCH_REASONING__MODEL", "/models/glm-4-9b")
    monkeypatch.setenv("ORCH_LIMITS__MAX_IMAGE_BYTES", "1234")
    settings = Settings()
    assert settings.vision.backend == "ocr"
    assert settings.reasoning.backend == "none"
    assert settings.reasoning.model == "/models/glm-4-9b"
    assert settings.limits.max_image_bytes == 1234


def test_defaults_run_the_embedded_models_offline() -> None:
    settings = Settings()
    assert (settings.vision.backend, settings.reasoning.backend) == ("ocr", "local")
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
