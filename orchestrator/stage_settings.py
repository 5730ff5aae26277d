"""The stages' settings (`ORCH_VISION__…`, `ORCH_REASONING__…`): one model per backend, and the policy every
stage shares (retries, circuit breaker, admission). `orchestrator.settings.Settings` holds them with the rest.

A stage's settings are one model per backend (`VisionSettings`, `ReasoningSettings`: unions chosen by `backend`,
which defaults to `ocr` and `local` when unset); each model refuses the fields of the others, so a variable set for
another backend than the configured one stops the service at start instead of being ignored.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Discriminator, Field, SecretStr, Tag, field_validator

from batch_engine.settings import EngineSettings, engine_settings
from stage_protocol.client.dialects import DialectName
from stage_protocol.client.transport import TransportName

Dtype = Literal["auto", "bfloat16", "float16", "float32"]
"""An in-process model's dtype; `auto`: bfloat16 on a GPU, float32 on the CPU."""


class Section(BaseModel):
    """A settings section: no unknown fields, frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(Section):
    """Retries of retryable failures only (connection errors, 429, 5xx, timeouts before any byte arrived), with
    jittered exponential backoff that honours `Retry-After`, inside the request's deadline
    (`orchestrator.stages`)."""

    attempts: int = Field(default=3, ge=1, le=10)
    """Attempts in all, the first included; 1 turns retries off."""
    backoff_s: float = Field(default=0.2, ge=0.0)
    """The first backoff's upper bound; each further one doubles, up to `backoff_max_s` (full jitter)."""
    backoff_max_s: float = Field(default=5.0, ge=0.0)
    budget_ratio: float = Field(default=0.2, ge=0.0)
    """Retries may add at most this share of the stage's requests over the last 10 s…"""
    budget_per_s: float = Field(default=1.0, ge=0.0)
    """…plus this many per second, so that retries cannot multiply load during an outage."""


class BreakerSettings(Section):
    """A circuit breaker per endpoint: closed → open after `failures` failures, or a failure rate of `failure_rate`
    over at least `min_calls` calls, within `window_s`; open for `open_s`; then half-open, where one trial call
    (bounded by `trial_timeout_s`) closes it again or reopens it."""

    failures: int = Field(default=5, ge=1)
    failure_rate: float = Field(default=0.5, gt=0.0, le=1.0)
    min_calls: int = Field(default=10, ge=1)
    window_s: float = Field(default=30.0, gt=0.0)
    open_s: float = Field(default=15.0, gt=0.0)
    trial_timeout_s: float = Field(default=10.0, gt=0.0)


class AdmissionSettings(Section):
    """Admission control per stage: at most `max_in_flight` calls at once and `max_queue` waiting; beyond that a
    request is refused at once (`overloaded`) instead of waiting without bound."""

    max_in_flight: int = Field(default=64, ge=1)
    max_queue: int = Field(default=256, ge=0)


class PolicySettings(Section):
    """The policy around every call to a stage's backend, whichever backend it is (`orchestrator.stages`)."""

    retry: RetrySettings = RetrySettings()
    breaker: BreakerSettings = BreakerSettings()
    admission: AdmissionSettings = AdmissionSettings()


class RemoteSettings(Section):
    """How a stage reaches a `remote` backend: an OpenAI-compatible server (vLLM, SGLang, a vendor API, our stage
    servers)."""

    base_url: str
    """e.g. `http://127.0.0.1:8001/v1`; several, comma-separated, spread the load and stand in for each other."""
    api_key: SecretStr | None = None
    dialect: DialectName = "auto"
    """What the server accepts (`vllm`, `sglang`, `openai`, `zhipu` for the GLM open platform); `auto` sends what
    suits our own stage servers and most vLLM or SGLang servers. docs/deployment.md says what each sends."""
    transport: TransportName = "auto"
    """The HTTP client: `aiohttp`, `httpx`; `auto` takes aiohttp for `http://` and httpx for `https://` (TLS, and
    the proxy settings of the environment). docs/benchmarks.md measures them side by side."""
    connect_timeout_s: float = Field(default=5.0, gt=0)
    """To open a connection."""
    first_byte_timeout_s: float = Field(gt=0)
    """The longest silence while waiting for the answer to begin, and between its parts (each stage's default)."""
    timeout_s: float = Field(gt=0)
    """One attempt in all, from connecting to the end of the answer (each stage's default)."""

    def base_urls(self) -> tuple[str, ...]:
        return _urls(self.base_url)

    @field_validator("base_url")
    @classmethod
    def _endpoints(cls, base_url: str) -> str:
        urls = _urls(base_url)
        if not urls:
            raise ValueError("no endpoint given")
        for url in urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"{url!r} is not an http(s) URL")
        if len(set(urls)) != len(urls):
            raise ValueError("an endpoint is listed twice")
        return base_url


def _urls(text: str) -> tuple[str, ...]:
    return tuple(url.strip() for url in text.split(",") if url.strip())


def _backend_of(stage: str, default: str, names: str) -> Discriminator:
    """Which backend's settings a stage's variables are: `ORCH_<STAGE>__BACKEND`, `default` when it is unset."""

    def backend(value: object) -> object:
        return value.get("backend", default) if isinstance(value, dict) else getattr(value, "backend", None)

    message = f"{stage}.backend (ORCH_{stage.upper()}__BACKEND) must be one of {names}"
    return Discriminator(backend, custom_error_type="backend_unknown", custom_error_message=message)


class _VisionSettings(PolicySettings):
    """What every vision backend reads."""

    tags: bool = True
    """`ocr`: run the EfficientNet-Lite0 ImageNet tagger alongside OCR (the `ocr` fallback's, for `glm`/`remote`)."""


class OcrVisionSettings(_VisionSettings):
    """The embedded default: RapidOCR + image tags, CPU, no download."""

    backend: Literal["ocr"] = "ocr"


class _ModelVisionSettings(_VisionSettings):
    """What the backends that run GLM-4.6V (`glm`, `remote`) share."""

    model: str = Field(min_length=1)
    """`glm`: a local directory or hub id; `remote`: the served model name."""
    thinking: bool = False
    """Let GLM-4.6V think before answering (slower; the thinking is returned separately, never as the answer)."""
    max_new_tokens: int = Field(default=1024, ge=1, le=32768)
    fallback: Literal["none", "ocr"] = "none"
    """When the backend cannot answer (down, open breakers, garbage), let the embedded `ocr` backend answer instead;
    the response is then marked degraded."""


class EngineFields(Section):
    """The batching engine's settings (`batch_engine`), for the backends that run a model in this process."""

    engine: Literal["batched", "generate"] = "batched"
    """`batched`: the batching engine (`batch_engine.engine`) decodes concurrent greedy requests together;
    `generate`: plain `model.generate`, one request at a time (the reference)."""
    engine_slots: int = Field(default=16, ge=1, le=128)
    """`batched`: requests decoded together at most; each holds a KV cache of `engine_max_tokens` from the start."""
    engine_max_tokens: int = Field(default=8192, ge=256)
    """`batched`: prompt (an image included) plus answer per request at most; a longer prompt is refused."""
    engine_queue: int = Field(default=64, ge=1)
    """`batched`: requests waiting for a slot at most; beyond that a request is refused with a retry hint."""
    engine_prefix_mb: int = Field(default=4096, ge=0)
    """`batched`: MiB of prompt-prefix KV kept, so that a follow-up prefills only its own text (an image's prompt up
    to the image; a text prompt in blocks of 32 tokens); 0 keeps none."""
    engine_cuda_graphs: bool = True
    """`batched`: capture the decode steps as CUDA graphs at start (on a CUDA device only)."""
    engine_prefill_tokens: int = Field(default=8192, ge=1)
    """`batched`: prompt tokens prefilled per step at most, while the running requests wait for their next token (one
    prompt is always admitted, however long; an image's prompt is never split, and one image is prefilled per step)."""
    engine_compile: Literal["auto", "on", "off"] = "auto"
    """`batched`: `torch.compile` the decoder layers (about a minute more to start; GLM-4.6V-Flash's decode at batch
    1 12.8 → 8.9 ms/token on an H200, `bench/RESULTS.md`); `auto`: on a CUDA device."""
    engine_decode_kernel: Literal["auto", "on", "off"] = "auto"
    """`batched`: a decode step's attention as Triton kernels (`batch_engine.decode_attention`) instead of grouped
    matrix products (a step at batch 32 10.15 → 7.46 ms on an H200, `bench/RESULTS.md`); `auto`: on a CUDA device
    where Triton is installed (it comes with torch's CUDA builds) and a check at start finds it agreeing."""
    engine_compile_shapes: Literal["automatic", "dynamic"] = "automatic"
    """`batched`, compiled: how the compiled decoder layers treat sizes (`EngineSettings.compile_shapes`):
    `automatic`, the model's own sizes constants in the generated code (GLM-4.6V-Flash's first token 68.7 → 65.7 ms
    on an H200, `bench/RESULTS.md`); `dynamic`, every size symbolic from the first call (one compilation less)."""
    engine_linear_kernel: Literal["auto", "on", "off"] = "auto"
    """`batched`: a decode step's linear layers through one Triton kernel made for few rows
    (`batch_engine.skinny_linear`) instead of cuBLAS's split-K products (a step at batch 1 8.64 → 8.43 ms on an H100,
    `bench/RESULTS.md`); `auto`: on a CUDA device where Triton is installed and a check at start finds it agreeing."""
    engine_attention_plans: Literal["power-of-two", "length"] = "power-of-two"
    """`batched`: how cuDNN's attention plans its kernels (`EngineSettings.attention_plans`): `power-of-two`, a plan
    per power of two of the lengths, all built at start; `length`, a plan at each new prompt length and image grid,
    built by the request that brings it (GLM-4.6V-Flash's first token at a new prompt length 101.2–108.3 → 70.9–75.3
    ms on H100s, at a length met before 66.2–68.9 → 69.4–71.5, `bench/RESULTS.md`)."""
    engine_recurring_plans: bool = True
    """`batched`, plans per power of two: an attention call met in two prefills (a prompt length, an image grid) gets a
    plan of its own, per length, built once the engine has idled a quarter second (`EngineSettings.recurring_plans`;
    32 clients 2.0–3.5 % faster on three H100s; another, drifting within the run, did not settle it:
    `bench/RESULTS.md`)."""

    engine_dependent_launch: Literal["auto", "on", "off"] = "auto"
    """`batched`: the engine's Triton kernels and compiled layers launched with programmatic dependent launch
    (`EngineSettings.dependent_launch`; a step at batch 1 7.26 → 7.04 ms on an H100, `bench/RESULTS.md`); `auto`: on a
    CUDA device of compute capability 9.0 or later (Hopper) where Triton is installed."""
    engine_prefill_graphs: Literal["auto", "on", "off"] = "auto"
    """`batched`: prefills padded to their length bucket and replayed as CUDA graphs, one launch where the host runs
    forty layers one by one (`EngineSettings.prefill_graphs`; a lone first token 122.2 → 77.5 ms on an H100 whose host
    launched slowly, 73.5 → 64.6 on such an H200, 66.7 → 67.8 on an H100 that kept up, `bench/RESULTS.md`); `auto`:
    where the host's launch pace, measured at start, is slow (`batch_engine.host`). The start logs that pace, and
    warns where it is slow and this is off."""

    def batching(self) -> EngineSettings | None:
        """The batching engine's settings; None for plain `generate`."""
        return engine_settings(self)


class GlmVisionSettings(_ModelVisionSettings, EngineFields):
    """GLM-4.6V-Flash in this process."""

    backend: Literal["glm"] = "glm"
    device: str = "cpu"
    dtype: Dtype = "auto"
    allow_download: bool = False
    """Let `model` be fetched from a model hub when it is not on disk. Off by default: nothing downloads."""


class RemoteVisionSettings(_ModelVisionSettings, RemoteSettings):
    """An OpenAI-compatible server."""

    backend: Literal["remote"] = "remote"
    first_byte_timeout_s: float = Field(default=15.0, gt=0)
    """The first-token budget: a vision model reads the image (prefill) before its first token, which takes seconds
    for a large image on a busy server, but a server silent for 15 s is hung."""
    timeout_s: float = Field(default=25.0, gt=0)
    """One attempt in all; inside the request's 30 s deadline."""
    pass_image_urls: bool = False
    """Send a client's http(s) image URL to the server as is, instead of the image's bytes."""


VisionSettings: TypeAlias = Annotated[
    Annotated[OcrVisionSettings, Tag("ocr")]
    | Annotated[GlmVisionSettings, Tag("glm")]
    | Annotated[RemoteVisionSettings, Tag("remote")],
    _backend_of("vision", "ocr", "'ocr', 'glm', 'remote'"),
]
"""The vision stage's settings: those of the backend `backend` names (each refuses the others' fields)."""


class _ReasoningSettings(PolicySettings):
    """What every reasoning backend reads."""

    max_new_tokens: int = Field(default=192, ge=1, le=8192)
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    """0 means greedy decoding."""


class LocalReasoningSettings(_ReasoningSettings, EngineFields):
    """A transformers causal LM in this process."""

    backend: Literal["local"] = "local"
    model: str | None = None
    """A local directory or hub id, unset meaning the packaged SmolLM2-135M-Instruct."""
    device: str = "cpu"
    dtype: Dtype = "auto"
    allow_download: bool = False
    """Let `model` be fetched from a model hub when it is not on disk. Off by default: nothing downloads."""
    cache_dir: Path | None = None
    """Where the converted embedded model is cached; unset means the user cache directory."""
    engine: Literal["batched", "generate"] = "generate"
    """`batched`: greedy requests (`temperature` 0) run together on the batching engine, the one the `glm` vision
    backend runs on; sampled ones through plain `generate`. `generate` (the default): plain `model.generate` for
    all, one request at a time."""
    engine_prefix_mb: int = Field(default=1024, ge=0)
    """`batched`: MiB of prompt-prefix KV kept (blocks of 32 tokens), so that a follow-up on the same description
    prefills only its own text; 0 keeps none."""


class NoneReasoningSettings(_ReasoningSettings):
    """Vision-only by design."""

    backend: Literal["none"] = "none"


class RemoteReasoningSettings(_ReasoningSettings, RemoteSettings):
    """An OpenAI-compatible server."""

    backend: Literal["remote"] = "remote"
    model: str = Field(min_length=1)
    """The served model name."""
    first_byte_timeout_s: float = Field(default=10.0, gt=0)
    """The first-token budget: a text model's prompt here is a description and a question, seconds of prefill at
    most; a server silent for 10 s is hung, and the vision-only answer is better than more waiting."""
    timeout_s: float = Field(default=20.0, gt=0)
    """One attempt in all: 192 tokens at a slow 10 tokens/s fit; a trickle slower than that degrades."""


ReasoningSettings: TypeAlias = Annotated[
    Annotated[LocalReasoningSettings, Tag("local")]
    | Annotated[NoneReasoningSettings, Tag("none")]
    | Annotated[RemoteReasoningSettings, Tag("remote")],
    _backend_of("reasoning", "local", "'local', 'none', 'remote'"),
]
"""The reasoning stage's settings: those of the backend `backend` names (each refuses the others' fields)."""
