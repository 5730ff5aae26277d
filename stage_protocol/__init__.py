"""What both stages speak: OpenAI-style chat completions over HTTP.

- `stage_protocol.client`: the HTTP client both `remote` backends stream through, failure classification, dialects.
- `stage_protocol.server`: the OpenAI wire format our own stage servers answer in.
- `model_text`, `loops`: reading model output (thinking, JSON inside text) and stopping a looping generation.

The orchestrator and both stages import this package; the stages never import each other.
"""
