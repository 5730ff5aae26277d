"""Bulk work through the OpenAI Batch API: uploaded JSONL files of requests, run in the background by this process's
workers, their answers collected into output and error files (`files`, `batches`, `runner`; the HTTP endpoints are
`orchestrator.api.batch_routes`)."""
