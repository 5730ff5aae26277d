"""The output filter: configured terms (`output_filter.terms`, comma-separated, case-insensitive, Chinese too) are
replaced by `output_filter.replacement` in everything a client is given to read, whole or streamed.

Pure functions over the pipeline's dataclasses. The API applies them where an answer leaves, once per output path:
`OutputFilter.outcome` for a whole analysis (`/v1/analyze`, `/v1/chat/completions`, `/infer`), `OutputFilter.vision`
for a vision result alone (`/caption`), and `filtered_events` for a streamed analysis (both streaming endpoints).

What is filtered: the answer (a JSON answer's fields, then the answer re-serialised from them), notices, the
disclaimer, the vision stage's caption, description, answer, thinking, notes and the text it read (lines, fields,
object labels, layout), the reasoning stage's answer and thinking, the claims and evidence of the arbitration checks
(the witness's reading too), and the messages of stages that failed. Slugs, enums, numbers and error bodies are not:
they are ours, not answers.

Streams: a term can arrive split across two deltas ("bad" + "word"). `release` holds back the last `holdback`
characters of the raw text (the longest term's length minus one) until more arrives, emits only text that no later
delta can turn into a match, and `flush` releases the tail at the end; the text emitted over a stream is then the
filtered whole text.
"""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, replace

from orchestrator.analysis.types import (
    AnalyzeOutcome,
    ArbitrationEvent,
    DeltaEvent,
    DoneEvent,
    ErrorEvent,
    PipelineEvent,
    StageFailure,
    VisionEvent,
)
from orchestrator.arbitration.answer_json import Fields, parse_fields, serialise
from orchestrator.arbitration.decision import Arbitration
from orchestrator.arbitration.evidence import EvidenceItem
from orchestrator.arbitration.verification import Check
from orchestrator.settings import OutputFilterSettings
from reasoning_stage.types import ReasoningResult
from vision_stage.types import StructuredDescription, VisionResult


@dataclass(frozen=True)
class OutputFilter:
    """`terms` (matched case-insensitively, longest first) replaced by `replacement`; no terms: a no-op."""

    terms: tuple[str, ...] = ()
    replacement: str = "[removed]"

    def __post_init__(self) -> None:
        folded = self.replacement.casefold()
        clashing = [term for term in self.terms if term.casefold() in folded]
        if clashing:
            raise ValueError(f"the output filter's replacement {self.replacement!r} contains the term {clashing[0]!r}")

    @classmethod
    def from_settings(cls, settings: OutputFilterSettings) -> OutputFilter:
        terms = {term.strip() for term in settings.terms.split(",") if term.strip()}
        return cls(tuple(sorted(terms, key=lambda term: (-len(term), term))), settings.replacement)

    @property
    def active(self) -> bool:
        return bool(self.terms)

    @property
    def holdback(self) -> int:
        """How many trailing characters of a stream may still be the start of a term."""
        return max((len(term) for term in self.terms), default=1) - 1

    @property
    def pattern(self) -> re.Pattern[str]:
        # `re` caches compiled patterns, so rebuilding the alternation per call costs a dictionary lookup.
        return re.compile("|".join(re.escape(term) for term in self.terms), re.IGNORECASE)

    def text(self, text: str) -> str:
        return self.pattern.sub(self.replacement, text) if self.terms and text else text

    def optional(self, text: str | None) -> str | None:
        return None if text is None else self.text(text)

    def outcome(self, outcome: AnalyzeOutcome) -> AnalyzeOutcome:
        """The analysis as a client may see it."""
        if not self.active:
            return outcome
        fields = self.fields(outcome.answer_fields) if outcome.answer_fields is not None else None
        return replace(
            outcome,
            answer=serialise(fields) if fields is not None else self.text(outcome.answer),
            answer_fields=fields,
            vision=self.vision(outcome.vision),
            reasoning=self.reasoning(outcome.reasoning) if outcome.reasoning else None,
            arbitration=self.arbitration(outcome.arbitration) if outcome.arbitration else None,
            notices=tuple(self.text(text) for text in outcome.notices),
            disclaimer=self.optional(outcome.disclaimer),
            failures=tuple(self.failure(failure) for failure in outcome.failures),
        )

    def vision(self, vision: VisionResult) -> VisionResult:
        if not self.active:
            return vision
        return replace(
            vision,
            caption=self.text(vision.caption),
            description=self.text(vision.description),
            structured=self._structured(vision.structured),
            answer=self.optional(vision.answer),
            notes=tuple(self.text(note) for note in vision.notes),
            thinking=self.optional(vision.thinking),
        )

    def reasoning(self, reasoning: ReasoningResult) -> ReasoningResult:
        return replace(reasoning, text=self.text(reasoning.text), thinking=self.optional(reasoning.thinking))

    def arbitration(self, arbitration: Arbitration) -> Arbitration:
        checks = tuple(self._check(check) for check in arbitration.checks)
        return replace(arbitration, checks=checks, notice=self.optional(arbitration.notice))

    def failure(self, failure: StageFailure) -> StageFailure:
        return replace(failure, message=self.text(failure.message))

    def answer(self, answer: str) -> str:
        """An answer on its own (a streamed analysis's `arbitration` event): one that is a JSON answer's serialised
        fields is filtered field by field and serialised again, so that it stays valid JSON."""
        if not self.active:
            return answer
        fields = parse_fields(answer)
        if fields is not None and serialise(fields) == answer:
            return serialise(self.fields(fields))
        return self.text(answer)

    def fields(self, fields: Fields) -> Fields:
        """A JSON answer's fields, every string in them (keys too) filtered."""
        filtered = self._json(fields)
        assert isinstance(filtered, dict)  # an object stays an object
        return filtered

    def _json(self, value: object) -> object:
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {self.text(str(key)): self._json(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self._json(item) for item in value]
        return value

    def _structured(self, structured: StructuredDescription) -> StructuredDescription:
        return replace(
            structured,
            text_lines=tuple(replace(line, text=self.text(line.text)) for line in structured.text_lines),
            objects=tuple(replace(item, label=self.text(item.label)) for item in structured.objects),
            fields=tuple(replace(kv, key=self.text(kv.key), value=self.text(kv.value)) for kv in structured.fields),
            layout=self.optional(structured.layout),
        )

    def _check(self, check: Check) -> Check:
        claim = replace(
            check.claim, text=self.text(check.claim.text), value=self.text(check.claim.value),
            referent=self.text(check.claim.referent),
        )  # fmt: skip
        return replace(
            check, claim=claim, reason=self.text(check.reason), evidence=self._evidence(check.evidence),
            witness=self._evidence(check.witness),
        )  # fmt: skip

    def _evidence(self, item: EvidenceItem | None) -> EvidenceItem | None:
        return replace(item, text=self.text(item.text), where=self.text(item.where)) if item is not None else None


def release(output_filter: OutputFilter, pending: str, piece: str) -> tuple[str, str]:
    """A stream's next `piece` after the raw, not yet emitted `pending` text: (what may be emitted now, filtered;
    the raw text still held back). Only text that no later piece can extend into a match is emitted."""
    if not output_filter.active:
        return pending + piece, ""
    raw = pending + piece
    cut = max(0, len(raw) - output_filter.holdback)
    # A match starting before the cut lies wholly inside `raw` (no term is longer than `holdback + 1`), so it is
    # final: emit through its end. Matches starting at the cut or later wait for more text.
    for match in output_filter.pattern.finditer(raw):
        if match.start() >= cut:
            break
        cut = max(cut, match.end())
    return output_filter.text(raw[:cut]), raw[cut:]


def flush(output_filter: OutputFilter, pending: str) -> str:
    """The held-back tail at the end of a stream, filtered."""
    return output_filter.text(pending)


async def filtered_events(
    events: AsyncGenerator[PipelineEvent, None], output_filter: OutputFilter
) -> AsyncGenerator[PipelineEvent, None]:
    """A streamed analysis as a client may see it: deltas filtered across their boundaries (the held-back tail comes
    out before the next event that is not a delta), every other event's texts as `OutputFilter.outcome` filters
    them."""
    if not output_filter.active:
        async with aclosing(events):
            async for event in events:
                yield event
        return
    text, thinking = "", ""
    async with aclosing(events):
        async for event in events:
            if isinstance(event, DeltaEvent):
                out_text, text = release(output_filter, text, event.text)
                out_thinking, thinking = release(output_filter, thinking, event.thinking)
                if out_text or out_thinking:
                    yield DeltaEvent(out_text, out_thinking)
                continue
            if text or thinking:
                yield DeltaEvent(flush(output_filter, text), flush(output_filter, thinking))
                text, thinking = "", ""
            yield _filtered_event(event, output_filter)


def _filtered_event(event: PipelineEvent, output_filter: OutputFilter) -> PipelineEvent:
    if isinstance(event, VisionEvent):
        return VisionEvent(output_filter.vision(event.vision))
    if isinstance(event, ArbitrationEvent):
        return replace(event, arbitration=output_filter.arbitration(event.arbitration),
                       answer=output_filter.answer(event.answer))  # fmt: skip
    if isinstance(event, ErrorEvent):
        return replace(event, failure=output_filter.failure(event.failure))
    if isinstance(event, DoneEvent):
        return replace(event, outcome=output_filter.outcome(event.outcome))
    return event
