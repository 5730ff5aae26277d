"""What each kind of OpenAI-compatible server accepts: the request body a stage sends to it. Pure.

A `remote` stage names its server's dialect (`ORCH_VISION__DIALECT`, `ORCH_REASONING__DIALECT`); each dialect sends
only fields that server takes:

| dialect  | thinking switch                         | token limit             | greedy             |
| -------- | --------------------------------------- | ----------------------- | ------------------ |
| `auto`   | `chat_template_kwargs.enable_thinking`  | `max_tokens`            | `temperature: 0`   |
| `vllm`   | `chat_template_kwargs.enable_thinking`  | `max_tokens`            | `temperature: 0`   |
| `sglang` | `chat_template_kwargs.enable_thinking`  | `max_tokens`            | `temperature: 0`   |
| `openai` | none                                    | `max_completion_tokens` | `temperature: 0`   |
| `zhipu`  | `thinking: {"type": …}`, always sent    | `max_tokens`            | `do_sample: false` |

All but `zhipu` send `stream_options: {"include_usage": true}`; `vllm` and `sglang` also send
`skip_special_tokens: false` for the vision stage; `zhipu` sends images as bare base64.

A caller's optional sampling fields (`top_p`, `seed`, `stop`, `presence_penalty`, `frequency_penalty`) go as they
are where the server takes them (`Dialect.sampled`): every dialect but `zhipu` sends all five; `zhipu` sends `top_p`
and `stop`, the latter only when it is a single word (the GLM open platform takes one stop word).

- `auto` is what this project sent before dialects existed, and suits our own stage servers (which ignore fields
  they do not use) and most servers built on vLLM or SGLang.
- `skip_special_tokens: false` (vision only) keeps GLM-4.6V's `<|begin_of_box|>`/`<|end_of_box|>`, which are special
  tokens in its tokenizer and which vLLM and SGLang strip by default (`skip_special_tokens` defaults to true in both).
- The GLM open platform (`zhipu`) thinks unless told not to, and with this project's token budgets a thinking model
  can spend them all before answering: the switch is always sent, `disabled` unless thinking was asked for. Its
  temperature is capped at 1 and it refuses 0 (the vendor's SDK sends `do_sample: false` for greedy decoding); it takes
  images as bare base64 rather than `data:` URLs, JPEG or PNG, under `ZHIPU_IMAGE_BYTES` and `ZHIPU_IMAGE_SIDE`
  pixels a side; it sends usage in its last chunk without `stream_options`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal, get_args

DialectName = Literal["auto", "vllm", "sglang", "openai", "zhipu"]
DIALECTS: tuple[DialectName, ...] = get_args(DialectName)
ZHIPU_IMAGE_BYTES = 5 * 1024 * 1024
ZHIPU_IMAGE_SIDE = 6000
_DATA_URL_PREFIX = ";base64,"
SAMPLING_FIELDS = frozenset({"top_p", "seed", "stop", "presence_penalty", "frequency_penalty"})
"""The optional sampling fields a caller may pass to `Dialect.chat_body`, by their OpenAI names."""


@dataclass(frozen=True)
class ServerImageLimits:
    """What a server takes as an image (JPEG or PNG, as this project always sends): bytes of the encoded file, and
    pixels on the longer side."""

    max_bytes: int
    max_side: int

    def take(self, width: int, height: int, size: int) -> bool:
        """Whether an image of `width`×`height` pixels in `size` bytes is within these limits."""
        return max(width, height) <= self.max_side and size <= self.max_bytes


@dataclass(frozen=True)
class Dialect:
    """How to talk to one kind of server (module docstring)."""

    name: DialectName
    thinking_switch: Literal["chat_template_kwargs", "thinking", "none"]
    keeps_special_tokens: bool
    """Whether to send `skip_special_tokens: false` when the caller needs the model's markup."""
    token_limit_field: Literal["max_tokens", "max_completion_tokens"]
    greedy_by_sampling_flag: bool
    max_temperature: float | None
    stream_options: bool
    bare_base64_images: bool
    image_limits: ServerImageLimits | None = None
    stream_error_codes: bool = True
    """Whether the `code` of an in-stream error event is a meaningful HTTP status (`stage_protocol.client.failures`)."""
    sampling_fields: frozenset[str] = SAMPLING_FIELDS
    """The optional sampling fields the server takes."""
    max_stop_words: int | None = None
    """How many `stop` words the server takes; a longer list is not sent. None: no limit of its own."""

    def chat_body(
        self,
        model: str,
        messages: Sequence[Mapping[str, object]],
        *,
        max_tokens: int,
        temperature: float,
        thinking: bool | None = None,
        keep_markup: bool = False,
        sampling: Mapping[str, object] | None = None,
    ) -> dict[str, object]:
        """A streaming chat-completions request. `thinking` None sends no switch where the server has a neutral
        default; `keep_markup` asks the server to keep special tokens (box markers) where it can; of `sampling`
        (optional sampling fields by their OpenAI names), what `sampled` keeps is sent."""
        body: dict[str, object] = {"model": model, "messages": list(messages)}
        body.update(self._sampling(temperature))
        body.update(self.sampled(sampling or {}))
        body[self.token_limit_field] = max_tokens
        body["stream"] = True
        if self.stream_options:
            body["stream_options"] = {"include_usage": True}
        if self.thinking_switch == "chat_template_kwargs" and thinking is not None:
            body["chat_template_kwargs"] = {"enable_thinking": thinking}
        elif self.thinking_switch == "thinking":
            body["thinking"] = {"type": "enabled" if thinking else "disabled"}
        if keep_markup and self.keeps_special_tokens:
            body["skip_special_tokens"] = False
        return body

    def sampled(self, sampling: Mapping[str, object]) -> dict[str, object]:
        """The fields of `sampling` this server takes (module docstring); the others are not sent."""
        kept = {name: value for name, value in sampling.items() if name in self.sampling_fields}
        stop = kept.get("stop")
        if self.max_stop_words is not None and isinstance(stop, list) and len(stop) > self.max_stop_words:
            del kept["stop"]
        return kept

    def _sampling(self, temperature: float) -> dict[str, object]:
        if self.greedy_by_sampling_flag and temperature <= 0:
            return {"do_sample": False}
        if self.max_temperature is not None:
            temperature = min(temperature, self.max_temperature)
        return {"temperature": temperature}

    def image_url(self, url: str) -> str:
        """The `image_url.url` to send for `url` (a `data:` URL or an http(s) URL)."""
        if self.bare_base64_images and url.startswith("data:") and _DATA_URL_PREFIX in url:
            return url.partition(_DATA_URL_PREFIX)[2]
        return url


_VLLM = Dialect(
    "vllm",
    thinking_switch="chat_template_kwargs",
    keeps_special_tokens=True,
    token_limit_field="max_tokens",
    greedy_by_sampling_flag=False,
    max_temperature=None,
    stream_options=True,
    bare_base64_images=False,
)
_BY_NAME: dict[DialectName, Dialect] = {
    "auto": replace(_VLLM, name="auto", keeps_special_tokens=False),
    "vllm": replace(_VLLM, stream_error_codes=False),
    "sglang": replace(_VLLM, name="sglang"),
    "openai": Dialect(
        "openai",
        thinking_switch="none",
        keeps_special_tokens=False,
        token_limit_field="max_completion_tokens",
        greedy_by_sampling_flag=False,
        max_temperature=2.0,
        stream_options=True,
        bare_base64_images=False,
    ),
    "zhipu": Dialect(
        "zhipu",
        thinking_switch="thinking",
        keeps_special_tokens=False,
        token_limit_field="max_tokens",
        greedy_by_sampling_flag=True,
        max_temperature=1.0,
        stream_options=False,
        bare_base64_images=True,
        image_limits=ServerImageLimits(ZHIPU_IMAGE_BYTES, ZHIPU_IMAGE_SIDE),
        sampling_fields=frozenset({"top_p", "stop"}),
        max_stop_words=1,
    ),
}


def dialect(name: DialectName) -> Dialect:
    return _BY_NAME[name]
