"""Reading the deployment files (compose.yaml, the Dockerfile) for `test_deployment.py`: services, their commands,
environments, ports, health checks and GPUs, the image's instructions, and the settings' variable names."""

from __future__ import annotations

import re
import shlex
from functools import cache
from pathlib import Path
from typing import Any, get_args

import pytest
import yaml
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel

from orchestrator.settings import Settings
from reasoning_stage.__main__ import _parser as reasoning_stage_parser
from vision_stage.__main__ import _parser as vision_stage_parser

ROOT = Path(__file__).resolve().parent.parent

ORCHESTRATORS = ("orchestrator", "orchestrator-stages")
VISION_MODEL = "zai-org/GLM-4.6V-Flash"
REASONING_MODEL_PREFIX = "zai-org/GLM-4-"
VLLM_IMAGE = "vllm/vllm-openai:"
VLLM_HEALTH_PATH = "/health"  # vLLM's OpenAI server: 200 once the engine is up
VLLM_DEFAULT_GPU_SHARE = 0.9  # vLLM's --gpu-memory-utilization when unset
REDIS_PORT = 6379
REASONING_CONTEXT = 32768  # GLM-4-9B-0414's context (shared/MODELS.md)
PROMPT_ALLOWANCE = 2048  # tokens for the vision prompt's text, beside the image and the answer

MIN_START_PERIOD_S = {"orchestrator": 60, "vllm": 20 * 60, "vision_stage": 5 * 60, "reasoning_stage": 5 * 60}


# --- reading the files ---------------------------------------------------------------------------------------------


@cache
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text(encoding="utf-8"))
    return loaded


def services() -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = compose()["services"]
    return found


def service(name: str) -> dict[str, Any]:
    assert name in services(), f"compose.yaml has no service {name!r}"
    return services()[name]


def command(name: str) -> list[str]:
    raw = service(name).get("command") or []
    return shlex.split(raw) if isinstance(raw, str) else [str(token) for token in raw]


def environment(name: str) -> dict[str, str | None]:
    raw = service(name).get("environment") or {}
    if isinstance(raw, list):
        pairs = (entry.partition("=") for entry in raw)
        return {key: (value if sep else None) for key, sep, value in pairs}
    return {key: None if value is None else str(value) for key, value in raw.items()}


def profiles(name: str) -> frozenset[str]:
    return frozenset(service(name).get("profiles") or ())


def depends_on(name: str) -> dict[str, dict[str, Any]]:
    raw = service(name).get("depends_on") or {}
    assert isinstance(raw, dict), f"{name}: depends_on must be a mapping with conditions, not a list"
    return raw


def kind(name: str) -> str:
    """What a service runs: `orchestrator`, `vllm`, `vision_stage`, `reasoning_stage` or `redis`."""
    definition = service(name)
    image = str(definition.get("image", ""))
    tokens = command(name)
    if image.startswith(VLLM_IMAGE):
        return "vllm"
    if image.startswith("redis:"):
        return "redis"
    if tokens[:2] == ["python", "-m"] and tokens[2] in ("vision_stage", "reasoning_stage"):
        return tokens[2]
    if "build" in definition and not tokens:
        return "orchestrator"
    raise AssertionError(f"tests/test_deployment.py does not know what service {name!r} runs: teach it")


def vllm_command(name: str) -> tuple[str, dict[str, str]]:
    """The model tag and the flags of a `vllm serve` service."""
    assert service(name).get("entrypoint") == ["vllm", "serve"], f"{name}: entrypoint must be `vllm serve`"
    model, *rest = command(name)
    flags: dict[str, str] = {}
    index = 0
    while index < len(rest):
        token = rest[index]
        assert token.startswith("--"), f"{name}: {token!r} is not a flag"
        if "=" in token:
            flag, _, value = token.partition("=")
            index += 1
        elif index + 1 < len(rest) and not rest[index + 1].startswith("--"):
            flag, value = token, rest[index + 1]
            index += 2
        else:
            flag, value = token, ""
            index += 1
        flags[flag] = value
    return model, flags


def stage_args(name: str) -> Any:
    """A stage server's command line, parsed by that server's own parser."""
    tokens = command(name)
    parser = vision_stage_parser() if kind(name) == "vision_stage" else reasoning_stage_parser()
    return parser.parse_args(tokens[3:])


def listening_port(name: str) -> int:
    match kind(name):
        case "vllm":
            return int(vllm_command(name)[1]["--port"])
        case "vision_stage" | "reasoning_stage":
            port: int = stage_args(name).port
            return port
        case "redis":
            assert "--port" not in command(name)
            return REDIS_PORT
        case _:
            return image_port()


def served_model(name: str) -> tuple[str, str]:
    """(the model a server loads, the name it serves it under)."""
    if kind(name) == "vllm":
        model, flags = vllm_command(name)
        return model, flags.get("--served-model-name", model)
    args = stage_args(name)
    return args.model, args.served_model_name or args.model


def health_url(test: list[str] | str) -> str:
    text = test if isinstance(test, str) else " ".join(test)
    found = re.search(r"https?://[^\s'\"),]+", text)
    assert found is not None, f"no URL in the health check {text!r}"
    return found.group(0)


def duration_s(value: str) -> float:
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 0.000001}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    assert "".join(number + unit for number, unit in parts) == value, f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined, comments dropped."""
    lines = (ROOT / "Dockerfile").read_text(encoding="utf-8").splitlines()
    text = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    joined = re.sub(r"\\\n", " ", text)
    instructions = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, arguments = line.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def instruction(keyword: str) -> list[str]:
    return [arguments for found, arguments in dockerfile() if found == keyword]


def image_cmd() -> list[str]:
    (cmd,) = instruction("CMD")
    tokens: list[str] = yaml.safe_load(cmd)  # exec form: a JSON array, which YAML reads too
    return tokens


def image_port() -> int:
    tokens = image_cmd()
    return int(tokens[tokens.index("--port") + 1])


def pinned(text: str, package: str) -> str:
    found = re.search(rf"(?<![\w-]){re.escape(package)}==([\w.+]+)", text)
    assert found is not None, f"no {package}==... pin"
    return found.group(1)


def settings_env_names(model: type[BaseModel], prefix: str = "ORCH_") -> frozenset[str]:
    """Every environment variable that sets a field of `model`, walking its nested sections (each backend's, for a
    stage's settings)."""
    names: set[str] = set()
    for field_name, field in model.model_fields.items():
        name = prefix + field_name.upper()
        sections = models_in(field.annotation)
        for section in sections:
            names |= settings_env_names(section, name + "__")
        if not sections:
            names.add(name)
    return frozenset(names)


def models_in(annotation: object) -> list[type[BaseModel]]:
    """The models an annotation names: itself, or the members of a union (`Annotated` or not)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [model for arg in get_args(annotation) for model in models_in(arg)]


def valid_env_names() -> frozenset[str]:
    return settings_env_names(Settings)


def get_status(app: FastAPI, path: str) -> int:
    with TestClient(app) as client:
        return client.get(path).status_code


def compose_settings(name: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The orchestrator's settings as the container would read them (variables without a value stay unset)."""
    for variable, value in environment(name).items():
        if value is not None:
            monkeypatch.setenv(variable, value)
    return Settings()


def of_kind(*kinds: str) -> list[str]:
    return [name for name in services() if kind(name) in kinds]
