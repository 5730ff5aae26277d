"""What keeps answers coming when stages fail, hang or are overloaded.

- `deadline`: the request's one deadline, which every stage call, retry and fallback lives inside.
- `breaker`: a circuit breaker per endpoint (closed → open → half-open with a single bounded trial).
- `retry`: which failures are retried, the backoff (honouring `Retry-After`) and the retry budget.
- `admission`: a bounded number of calls in flight and waiting per stage; beyond that, `overloaded` at once.
- `stage`: one stage's endpoints behind all of the above (`ResilientStage`), and `backends`: the vision and
  reasoning backends built on it, plus the vision fallback chain (`glm`/`remote` → `ocr`).
"""
