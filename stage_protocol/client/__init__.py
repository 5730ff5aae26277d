"""The HTTP client both remote stage backends use: streaming chat completions from any OpenAI-compatible server.

`ChatClient` sends a request body as it is and yields the stream's chunks (`Chunk`); every failure is one of the
`StageHttpError` tree, which `classify` turns into what a stage needs to know (`Failure`).
"""

from stage_protocol.client.chat import ChatClient, Chunk
from stage_protocol.client.dialects import DIALECTS, Dialect, DialectName, dialect
from stage_protocol.client.errors import (
    StageErrorEvent,
    StageHttpError,
    StageMalformed,
    StageStatus,
    StageTimedOut,
    StageUnreachable,
)
from stage_protocol.client.failures import ErrorTree, Failure, classify, finish_failure, retry_after_s

__all__ = [
    "DIALECTS",
    "ChatClient",
    "Chunk",
    "Dialect",
    "DialectName",
    "ErrorTree",
    "Failure",
    "StageErrorEvent",
    "StageHttpError",
    "StageMalformed",
    "StageStatus",
    "StageTimedOut",
    "StageUnreachable",
    "classify",
    "dialect",
    "finish_failure",
    "retry_after_s",
]
