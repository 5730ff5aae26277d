"""The batching engine both in-process model backends run on: continuous batching of greedy generation over the
transformers model on one device (`batch_engine.engine`; its code unchanged, each attention layer's q/k/v weights
concatenated into one product: `batch_engine.projections`), its steps on the device (`batch_engine.steps`),
the slot KV cache and its attention (`batch_engine.slots`) and its settings (`batch_engine.settings`).

It serves GLM-4.6V-Flash for the vision stage's `glm` backend (an image prompt, M-RoPE positions) and a causal
text LM (GLM-4, or any transformers decoder whose attention goes through transformers' attention interface) for
the reasoning stage's `local` backend, with no case by model name: what differs is read from the model (a
`get_rope_index` for 3-D positions, a `language_model` inside a multimodal model, an image token in its config).
Neither stage is imported here; each passes its own error classes (`Refusals`).
"""
