"""What both stages speak: OpenAI-style chat completions over HTTP.

- `stage_protocol.client`: the HTTP client both `remote` backends stream through, failure classification, dialects,
  and `RemoteBackend`, their shared base.
- `stage_protocol.server`: `create_stage_app`, the OpenAI wire format our own stage servers answer in, and their
  shared command line.
- `backend`, `errors`: what every stage backend has, and the error shapes both stages' trees share.
- `data_url`: the one decoder of inline `data:` images, for the orchestrator and the vision server.
- `model_text`, `loops`: reading model output (thinking, JSON inside text) and stopping a looping generation.

The orchestrator and both stages import this package; the stages never import each other.
"""
