"""The HTTP client both remote stage backends use: streaming chat completions from any OpenAI-compatible server.

`ChatClient` sends a request body as it is and yields the stream's chunks (`Chunk`); every failure is one of the
`StageHttpError` tree, which `classify` turns into what a stage needs to know (`Failure`).
"""

from stage_client.chat import ChatClient, Chunk, ErrorTree, Failure, classify, finish_failure, retry_after_s
from stage_client.errors import (
    StageErrorEvent,
    StageHttpError,
    StageMalformed,
    StageStatus,
    StageTimedOut,
    StageUnreachable,
)

__all__ = [
    "ChatClient",
    "Chunk",
    "ErrorTree",
    "Failure",
    "StageErrorEvent",
    "StageHttpError",
    "StageMalformed",
    "StageStatus",
    "StageTimedOut",
    "StageUnreachable",
    "classify",
    "finish_failure",
    "retry_after_s",
]
