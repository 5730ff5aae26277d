"""What keeps answers coming when stages fail, hang or are overloaded.

- `deadline`: the request's one deadline, which every stage call, retry and fallback lives inside.
- `breaker`: a circuit breaker per endpoint (closed → open → half-open with a single bounded trial).
- `retry`: which failures are retried, the backoff (honouring `Retry-After`) and the retry budget.
- `admission`: a bounded number of calls in flight and waiting per stage; beyond that, `overloaded` at once.
- `endpoints`: one stage's endpoints behind all of the above (`ResilientStage`).
- `resilient`: the vision and reasoning backends built on it (`ResilientVision`, `ResilientReasoning`), and the
  vision fallback chain (`glm`/`remote` → `ocr`, `FallbackVision`).
- `cache`: the vision answer cache in front of the backend (in memory or in Redis).
"""
