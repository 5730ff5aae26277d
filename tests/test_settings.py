from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

from batch_engine.settings import EngineSettings
from orchestrator.settings import LimitSettings, Settings, unknown_variables
from orchestrator.stage_settings import (
    Dtype,
    GlmVisionSettings,
    LocalReasoningSettings,
    OcrVisionSettings,
    RemoteReasoningSettings,
    RemoteVisionSettings,
)
from stage_protocol.dtypes import DTYPES


def settings_with(monkeypatch: pytest.MonkeyPatch, variables: dict[str, str]) -> Settings:
    """`Settings()` read from an environment with `variables` set."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    return Settings()


@pytest.mark.parametrize(
    ("variables", "expected"),
    [
        pytest.param(
            {
                "ORCH_VISION__BACKEND": "ocr",
                "ORCH_REASONING__BACKEND": "local",
                "ORCH_REASONING__MODEL": "/models/glm-4-9b",
                "ORCH_LIMITS__MAX_IMAGE_BYTES": "1234",
            },
            {
                "vision": OcrVisionSettings(),
                "reasoning": LocalReasoningSettings(model="/models/glm-4-9b"),
                "limits": LimitSettings(max_image_bytes=1234),
            },
            id="backends-named",
        ),
        pytest.param(
            {
                "ORCH_VISION__TAGS": "false",
                "ORCH_VISION__RETRY__ATTEMPTS": "1",
                "ORCH_REASONING__CACHE_DIR": "/cache",
                "ORCH_REASONING__MAX_NEW_TOKENS": "40",
            },
            {
                "vision": OcrVisionSettings.model_validate({"tags": False, "retry": {"attempts": 1}}),
                "reasoning": LocalReasoningSettings(cache_dir=Path("/cache"), max_new_tokens=40),
            },
            id="default-backends-unnamed",
        ),
    ],
)
def test_nested_environment_variables_configure_the_stages(
    variables: dict[str, str], expected: dict[str, BaseModel], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each variable reaches its section's field, whether or not the backend it belongs to is named."""
    settings = settings_with(monkeypatch, variables)
    assert {section: getattr(settings, section) for section in expected} == expected


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


@pytest.mark.parametrize(
    ("variable", "message"),
    [
        ("ORCH_VISON__BACKEND", "ORCH_VISON__BACKEND (did you mean ORCH_VISION__BACKEND?)"),
        ("ORCH_API_KEY", "ORCH_API_KEY (did you mean ORCH_API_KEYS?)"),
        ("orch_ratelimit__burst", "orch_ratelimit__burst (did you mean ORCH_RATE_LIMIT__BURST?)"),
        ("ORCH_VISION_BACKEND", "ORCH_VISION_BACKEND (did you mean ORCH_VISION__BACKEND?)"),
        ("ORCH_LOG_LEVEL__X", "ORCH_LOG_LEVEL__X (did you mean ORCH_LOG_LEVEL?)"),
        ("ORCH_TOTALLY_ELSE", "ORCH_TOTALLY_ELSE"),
    ],
)
def test_a_variable_no_setting_reads_is_refused_naming_the_closest(
    variable: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside a known section pydantic would ignore a misspelt name, and the service would run on defaults."""
    with pytest.raises(ValidationError, match="unknown ORCH_ variables") as caught:
        settings_with(monkeypatch, {variable: "1"})
    assert message in str(caught.value)


def test_the_variables_of_other_commands_and_any_case_are_read_as_settings_read_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = settings_with(monkeypatch, {"ORCH_EVAL_API_KEY": "k", "orch_log_level": "debug", "OTHER_THING": "x"})
    assert settings.log_level == "debug"
    read = {"ORCH_VISION": "{}", "ORCH_LIMITS__MAX_IMAGE_BYTES": "1", "PATH": "/bin"}
    # What Kubernetes and Docker's links put in the environment of a service named `orch`: not settings, not refused.
    injected = {"ORCH_SERVICE_HOST": "10.0.0.1", "ORCH_PORT": "tcp://10.0.0.1:8000", "ORCH_PORT_8000_TCP_PORT": "8000"}
    assert unknown_variables({**read, **injected}) == []


def test_the_remote_backends_read_their_endpoints(monkeypatch: pytest.MonkeyPatch) -> None:
    remote = {"BACKEND": "remote", "BASE_URL": "http://a:8000/v1, http://b:8000/v1", "MODEL": "m"}
    variables = {
        **{f"ORCH_{stage}__{name}": value for stage in ("VISION", "REASONING") for name, value in remote.items()},
        "ORCH_VISION__FALLBACK": "ocr",
        "ORCH_VISION__TAGS": "false",  # the `ocr` fallback's
        "ORCH_REASONING__DIALECT": "vllm",
    }
    settings = settings_with(monkeypatch, variables)
    vision, reasoning = settings.vision, settings.reasoning
    assert isinstance(vision, RemoteVisionSettings)
    assert isinstance(reasoning, RemoteReasoningSettings)
    assert vision.base_urls() == reasoning.base_urls() == ("http://a:8000/v1", "http://b:8000/v1")
    assert (vision.fallback, vision.tags, vision.first_byte_timeout_s, vision.timeout_s) == ("ocr", False, 15, 25)
    assert (reasoning.dialect, reasoning.first_byte_timeout_s, reasoning.timeout_s) == ("vllm", 10, 20)


def test_the_glm_backend_reads_its_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    glm = {"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": "/models/glm"}
    vision = settings_with(monkeypatch, glm).vision
    assert isinstance(vision, GlmVisionSettings)
    assert (vision.engine, vision.engine_slots, vision.engine_max_tokens) == ("batched", 16, 8192)
    assert (vision.engine_queue, vision.engine_prefix_mb, vision.engine_cuda_graphs) == (64, 4096, True)
    variables = {
        "ORCH_VISION__ENGINE": "generate",
        "ORCH_VISION__ENGINE_SLOTS": "4",
        "ORCH_VISION__ENGINE_MAX_TOKENS": "2048",
        "ORCH_VISION__ENGINE_QUEUE": "8",
        "ORCH_VISION__ENGINE_PREFIX_MB": "0",
        "ORCH_VISION__ENGINE_CUDA_GRAPHS": "false",
    }
    vision = settings_with(monkeypatch, variables).vision
    assert vision == GlmVisionSettings(
        model="/models/glm",
        engine="generate",
        engine_slots=4,
        engine_max_tokens=2048,
        engine_queue=8,
        engine_prefix_mb=0,
        engine_cuda_graphs=False,
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [("ENGINE", "vllm"), ("ENGINE_SLOTS", "0"), ("ENGINE_SLOTS", "129"), ("ENGINE_MAX_TOKENS", "255"),
     ("ENGINE_QUEUE", "0"), ("ENGINE_PREFIX_MB", "-1")],
)  # fmt: skip
def test_the_glm_engine_settings_are_bounded(name: str, value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    variables = {"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": "m", f"ORCH_VISION__{name}": value}
    with pytest.raises(ValidationError, match=rf"vision\.glm\.{name.lower()}"):
        settings_with(monkeypatch, variables)


async def test_the_glm_engine_settings_reach_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    from orchestrator.wiring import _vision_loader
    from vision_stage.glm import GlmVisionBackend

    calls: list[dict[str, Any]] = []

    async def load(model: str, **kwargs: Any) -> Any:
        calls.append({"model": model, **kwargs})
        return object()

    monkeypatch.setattr(GlmVisionBackend, "load", load)
    options = {"engine_slots": 3, "engine_prefix_mb": 7, "engine_compile": "on", "engine_prefill_tokens": 99}
    options.update(engine_decode_kernel="on", engine_compile_shapes="dynamic", engine_linear_kernel="on")
    options.update(engine_attention_plans="length", engine_recurring_plans=False, engine_dependent_launch="off")
    options.update(engine_prefill_graphs="on")
    await _vision_loader(GlmVisionSettings(model="m", **options), "glm")()
    await _vision_loader(GlmVisionSettings(model="m", engine="generate", engine_slots=3), "glm")()
    assert [call["model"] for call in calls] == ["m", "m"]
    assert calls[0]["batching"] == EngineSettings(
        slots=3,
        prefix_bytes=7 << 20,
        compile=True,
        prefill_tokens=99,
        decode_kernel=True,
        compile_shapes="dynamic",
        linear_kernel=True,
        attention_plans="length",
        recurring_plans=False,
        dependent_launch=False,
        prefill_graphs=True,
    )
    assert calls[1]["batching"] is None
    auto = EngineSettings(compile=None, decode_kernel=None, linear_kernel=None, dependent_launch=None)  # by the device
    assert GlmVisionSettings(model="m").batching() == auto
    assert auto.compile_shapes == "automatic"
    assert auto.attention_plans == "power-of-two"
    assert auto.recurring_plans
    assert auto.prefill_graphs is None  # on where the start finds the host slow


@pytest.mark.parametrize(
    ("variables", "refused"),
    [
        ({"ORCH_VISION__DEVICE": "cuda"}, r"vision\.ocr\.device"),
        ({"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": "m", "ORCH_VISION__DIALECT": "vllm"}, "glm.dialect"),
        ({"ORCH_VISION__BACKEND": "glm"}, r"vision\.glm\.model"),
        ({"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": ""}, r"vision\.glm\.model"),
        ({"ORCH_VISION__ENGINE_MAX_TOKENS": "4096"}, r"vision\.ocr\.engine_max_tokens"),
        ({"ORCH_VISION__BACKEND": "remote", "ORCH_VISION__MODEL": "m"}, r"vision\.remote\.base_url"),
        ({"ORCH_REASONING__BACKEND": "none", "ORCH_REASONING__MODEL": "m"}, r"reasoning\.none\.model"),
        ({"ORCH_REASONING__BASE_URL": "http://a/v1"}, r"reasoning\.local\.base_url"),
        ({"ORCH_REASONING__BACKEND": "remote", "ORCH_REASONING__BASE_URL": "http://a/v1"}, r"remote\.model"),
    ],
)
def test_a_variable_of_another_backend_or_a_missing_one_is_refused(
    variables: dict[str, str], refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValidationError, match=refused):
        settings_with(monkeypatch, variables)


@pytest.mark.parametrize(
    ("base_url", "reason"),
    [("", "no endpoint"), (" , ", "no endpoint"), ("ftp://a/v1", "not an http"), ("http://a/v1,http://a/v1", "twice")],
)
def test_remote_endpoints_are_http_urls_each_listed_once(base_url: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        RemoteVisionSettings(base_url=base_url, model="m")


async def test_the_state_url_is_the_vision_cache_s_unless_the_cache_names_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from orchestrator import wiring

    stores: list[str | None] = []

    def build_store(cache: Any) -> object:
        stores.append(cache.url)
        return object()

    monkeypatch.setattr(wiring, "build_store", build_store)
    monkeypatch.setattr(wiring, "CachedVision", lambda backend, store, cache: backend)

    async def vision(settings: Any) -> Any:
        return object()

    monkeypatch.setattr(wiring, "build_vision", vision)
    monkeypatch.setattr(wiring, "build_reasoning", lambda *args, **kwargs: vision(None))
    state = {"ORCH_STATE__URL": "redis://state:6379/0"}
    for variables in (state, {**state, "ORCH_CACHE__URL": "redis://cache:6379/1"}):
        await wiring.build_backends(settings_with(monkeypatch, variables))
    assert stores == ["redis://state:6379/0", "redis://cache:6379/1"]
    for variable in ("ORCH_STATE__URL", "ORCH_CACHE__URL"):
        with pytest.raises(ValidationError, match=r"(state|cache)\.url\n.*'http://state:6379' is not a redis://"):
            settings_with(monkeypatch, {variable: "http://state:6379"})
        monkeypatch.delenv(variable)


@pytest.mark.parametrize("variable", ["ORCH_REASONING__DTYPE", "ORCH_VISION__DTYPE"])
def test_a_dtype_other_than_the_four_the_loaders_take_is_refused_at_start(
    variable: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = {"ORCH_VISION__BACKEND": "glm", "ORCH_VISION__MODEL": "/m"} if "VISION" in variable else {}
    with pytest.raises(ValidationError, match="dtype"):
        settings_with(monkeypatch, {**backend, variable: "float64"})
    assert settings_with(monkeypatch, {**backend, variable: "bfloat16"})
    assert set(get_args(Dtype)) == {"auto", *DTYPES}, "the settings take what the loaders take"


def test_a_shared_batch_request_is_not_taken_back_while_it_may_still_be_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shared = {"ORCH_STATE__URL": "redis://state:6379/0", "ORCH_BATCH__VISIBILITY_S": "20"}
    with pytest.raises(ValidationError, match=r"visibility_s \(20\) must be above limits.request_deadline_s \(30\)"):
        settings_with(monkeypatch, shared)
    assert settings_with(monkeypatch, {**shared, "ORCH_LIMITS__REQUEST_DEADLINE_S": "10"}).batch.visibility_s == 20
    monkeypatch.delenv("ORCH_STATE__URL")
    monkeypatch.delenv("ORCH_LIMITS__REQUEST_DEADLINE_S")
    assert settings_with(monkeypatch, {"ORCH_BATCH__VISIBILITY_S": "20"}).batch.visibility_s == 20  # no Redis: no check


def test_both_in_process_engines_must_plan_cuda_attention_one_way(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's cuDNN attention plans one way for the whole process (`batch_engine.attention_plans`)."""
    monkeypatch.setenv("ORCH_VISION__BACKEND", "glm")
    monkeypatch.setenv("ORCH_VISION__MODEL", "m")
    monkeypatch.setenv("ORCH_REASONING__ENGINE", "batched")
    monkeypatch.setenv("ORCH_REASONING__ENGINE_ATTENTION_PLANS", "length")
    with pytest.raises(ValidationError, match="engine_attention_plans must be the same"):
        Settings()
    monkeypatch.setenv("ORCH_VISION__ENGINE_ATTENTION_PLANS", "length")
    assert Settings().vision.batching().attention_plans == "length"  # type: ignore[union-attr]
    monkeypatch.setenv("ORCH_REASONING__ENGINE", "generate")  # the reasoning stage runs no engine: either way
    monkeypatch.setenv("ORCH_VISION__ENGINE_ATTENTION_PLANS", "power-of-two")
    assert Settings().reasoning.batching() is None  # type: ignore[union-attr]
