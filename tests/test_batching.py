"""The batching engine (`batch_engine.engine`) against plain `generate` on the tiny GLM-4.6V model on the CPU:
token for token, for one request, for requests joining a running batch at different steps, for more requests than
slots, and for a follow-up question that reuses its image's prefix KV.

The model, its prompts and the engine's settings are `tests/vision_engine.py`'s.
"""

from __future__ import annotations

from typing import Any

import pytest

from batch_engine.graphs import padded_length
from tests.vision_engine import BUDGET, engine, prompt, submit
from vision_stage.glm_engine import GlmEngine


def test_a_prefill_is_padded_to_a_multiple_of_128_then_coarser_never_by_more_than_an_eighth_past_1024(
    glm: GlmEngine,
) -> None:
    assert [padded_length(n) for n in (1, 7, 128, 129, 1397, 2048, 2049, 4097, 8192)] == [
        128, 128, 128, 256, 1408, 2048, 2304, 4608, 8192,
    ]  # fmt: skip
    lengths = range(1, 20_000)
    assert all(0 <= padded_length(n) - n < max(128, n / 8) for n in lengths)
    assert len({padded_length(n) for n in range(1, 8193)}) == 32  # a slot of 8,192 positions: 32 graphs
    assert engine(glm, slots=1, max_tokens=1200).device.padded_lengths() == [128 * n for n in range(1, 11)]
    assert engine(glm, slots=1, max_tokens=4352).device.padded_lengths()[-2:] == [4096, 4352], "cut to the slot"


@pytest.mark.parametrize("padded", [False, True])
def test_one_request_equals_plain_generate(glm: GlmEngine, padded: bool) -> None:
    encoded = prompt(glm, 1)
    expected = glm.generate_ids(encoded, BUDGET)
    assert len(set(expected)) > 4, "the sharp model should not repeat one token"
    batch = engine(glm, prefill_graphs=padded)
    ran: list[int] = []  # the lengths the padded step ran at
    padded_step = batch.device._padded_step

    def recording(count: int) -> None:
        ran.append(count)
        padded_step(count)

    batch.device._padded_step = recording  # type: ignore[method-assign]
    future = submit(batch, encoded, "one")
    batch.run_until_idle()
    completion = future.result()
    assert completion.ids == expected
    # padded to its bucket (one of those captured on a GPU), or not padded at all
    assert ran == ([padded_length(encoded.prompt_tokens)] if padded else [])
    assert set(ran) <= set(batch.device.padded_lengths())
    assert (completion.prompt_tokens, completion.reused_tokens) == (encoded.prompt_tokens, 0)
    assert completion.first_token_ms >= completion.queue_ms >= 0


@pytest.mark.parametrize(
    ("overlap", "ride_along", "padded"),
    [(True, True, False), (False, True, False), (True, False, False), (True, False, True)],
)
def test_requests_joining_at_different_steps_each_equal_plain_generate(
    glm: GlmEngine, overlap: bool, ride_along: bool, padded: bool
) -> None:
    prompts = [prompt(glm, seed, question) for seed, question in ((2, "what?"), (3, "how many?"), (4, "who is it?"))]
    prompts.append(prompt(glm, 5, "where?", width=96, height=32))  # another grid: other M-RoPE positions
    expected = [glm.generate_ids(encoded, BUDGET - n) for n, encoded in enumerate(prompts)]
    batch = engine(glm, overlap=overlap, ride_along=ride_along, prefill_graphs=padded)
    futures = [submit(batch, prompts[0], "a", BUDGET)]
    batch.step()
    batch.step()
    futures.append(submit(batch, prompts[1], "b", BUDGET - 1))
    batch.step()
    futures += [submit(batch, prompts[2], "c", BUDGET - 2), submit(batch, prompts[3], "d", BUDGET - 3)]
    batch.run_until_idle()
    assert [future.result().ids for future in futures] == expected
    assert max(batch.batch_sizes) >= 3, "the requests overlapped"
    # each of the last three prefilled with the rows before it decoding in its forward (one image a step: "d" after "c")
    assert batch.stats().ridden == (3 if ride_along else 0)


def test_the_triton_decode_kernel_equals_plain_generate_with_m_rope_rows_joining(
    glm: GlmEngine, triton_interpreter: None
) -> None:
    prompts = [prompt(glm, 6, "what?"), prompt(glm, 7, "where?", width=96, height=32)]
    expected = [glm.generate_ids(encoded, BUDGET - 4 * n) for n, encoded in enumerate(prompts)]
    batch = engine(glm, decode_kernel=True, ride_along=True)
    futures = [submit(batch, prompts[0], "k1", BUDGET)]
    batch.step()
    futures.append(submit(batch, prompts[1], "k2", BUDGET - 4))
    batch.run_until_idle()
    assert [future.result().ids for future in futures] == expected
    assert max(batch.batch_sizes) == 2
    assert batch.stats().ridden == 1, "the first request's row decoded through the kernel in the second's prefill"


@pytest.mark.parametrize(("overlap", "padded"), [(True, False), (False, False), (True, True)])
def test_more_requests_than_slots_wait_and_the_rows_stay_packed(glm: GlmEngine, overlap: bool, padded: bool) -> None:
    prompts = [prompt(glm, 10 + n, f"question {n}?") for n in range(5)]
    budgets = [6, 20, 9, 14, 11]  # rows finish out of order, so the last row moves into freed ones
    expected = [glm.generate_ids(encoded, budget) for encoded, budget in zip(prompts, budgets, strict=True)]
    batch = engine(
        glm, slots=2, overlap=overlap, prefill_graphs=padded
    )  # with overlap, a finished row has one more step before it moves
    futures = [
        submit(batch, encoded, f"r{n}", budget)
        for n, (encoded, budget) in enumerate(zip(prompts, budgets, strict=True))
    ]
    batch.run_until_idle()
    assert [future.result().ids for future in futures] == expected
    assert max(batch.batch_sizes) == 2
    assert batch.running == batch.waiting == 0


@pytest.mark.parametrize("padded", [False, True])
def test_a_follow_up_on_the_same_image_prefills_only_its_own_text(glm: GlmEngine, padded: bool) -> None:
    first, follow_up = prompt(glm, 20, "what is the total?"), prompt(glm, 20, "and the date, please?")
    cold = glm.generate_ids(follow_up, BUDGET)
    batch = engine(glm, prefill_graphs=padded)
    opening = submit(batch, first, "same-image")
    batch.run_until_idle()
    assert opening.result().reused_tokens == 0
    again = submit(batch, follow_up, "same-image")
    batch.run_until_idle()
    reused = again.result()
    assert reused.ids == cold
    image_end = glm.model.config.image_end_token_id
    assert reused.reused_tokens == int((follow_up.inputs["input_ids"][0] == image_end).nonzero()[-1, 0]) + 1
    assert batch.device.prefixes.hits == 1


def test_a_cleared_prefix_store_forgets_its_prefixes_and_their_index(glm: GlmEngine) -> None:
    """`PrefixStore.clear` (what the benchmarks call between their runs): the follow-up prefills whole."""
    first, follow_up = prompt(glm, 21, "what is the total?"), prompt(glm, 21, "and the date, please?")
    batch = engine(glm)
    submit(batch, first, "cleared")
    batch.run_until_idle()
    prefixes = batch.device.prefixes
    assert len(prefixes) == 1
    assert prefixes.index
    prefixes.clear()
    assert not prefixes.index
    again = submit(batch, follow_up, "cleared")
    batch.run_until_idle()
    assert again.result().reused_tokens == 0
    assert again.result().ids == glm.generate_ids(follow_up, BUDGET)


def test_another_image_with_the_same_key_text_is_not_a_prefix_hit(glm: GlmEngine) -> None:
    batch = engine(glm)
    submit(batch, prompt(glm, 30), "k30")
    batch.run_until_idle()
    other = prompt(glm, 31)
    future = submit(batch, other, "k31")
    batch.run_until_idle()
    assert future.result().reused_tokens == 0
    assert future.result().ids == glm.generate_ids(other, BUDGET)


def test_plain_generate_on_the_same_model_is_sdpa_as_before_the_engine_took_it(glm: GlmEngine) -> None:
    model: Any = glm.model
    text_config = model.model.language_model.config
    encoded = prompt(glm, 70)
    text_config._attn_implementation = "sdpa"
    before = glm.generate_ids(encoded, BUDGET)
    engine(glm)
    assert text_config._attn_implementation == "batch_engine_slots"
    assert glm.generate_ids(encoded, BUDGET) == before
