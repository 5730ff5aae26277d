"""`stage_protocol.generation.generation_config`: the config both in-process backends' plain `generate` runs with."""

from __future__ import annotations

from transformers import GenerationConfig

from stage_protocol.generation import generation_config


def checkpoint_config(**fields: object) -> GenerationConfig:
    """A checkpoint's config with sampling defaults, as GLM's and most chat models' ship."""
    return GenerationConfig(do_sample=True, temperature=0.8, top_p=0.9, top_k=50, max_length=8192, **fields)  # type: ignore[no-untyped-call]


def test_greedy_drops_the_checkpoint_s_sampling_defaults_and_leaves_the_checkpoint_s_config_alone() -> None:
    base = checkpoint_config(eos_token_id=[7, 3])
    config = generation_config(base, 16)
    assert (config.do_sample, config.temperature, config.top_p, config.top_k) == (False, None, None, None)
    assert (config.max_new_tokens, config.max_length) == (16, None)
    assert (base.do_sample, base.temperature, base.max_length, base.pad_token_id) == (True, 0.8, 8192, None)


def test_a_temperature_samples_at_that_temperature() -> None:
    config = generation_config(checkpoint_config(), 4, temperature=0.3)
    assert (config.do_sample, config.temperature, config.top_p) == (True, 0.3, 0.9)


def test_without_a_pad_token_it_pads_with_the_one_given_or_else_the_first_end_token() -> None:
    assert generation_config(checkpoint_config(eos_token_id=[7, 3]), 4).pad_token_id == 7
    assert generation_config(checkpoint_config(eos_token_id=5), 4).pad_token_id == 5
    assert generation_config(checkpoint_config(eos_token_id=[7, 3]), 4, pad_token_id=3).pad_token_id == 3
    assert generation_config(checkpoint_config(eos_token_id=7, pad_token_id=1), 4, pad_token_id=3).pad_token_id == 1
