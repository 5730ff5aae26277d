"""Bulk work through the OpenAI Batch API: uploaded JSONL files of requests, run in the background by workers, their
answers collected into output and error files (`files`: the records; `runner`: one process's store and workers;
`shared`: the same shared by the replicas, in Redis; the HTTP endpoints are `orchestrator.api.batch_routes`)."""
