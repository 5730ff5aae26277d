"""The vision encoder's packed attention (`batch_engine.vision_attention`): the same encoder output as transformers'
`sdpa` path for one image and for several in one call, a compiled encoder block traced as one graph, the engine
switching its model's encoder to it, and a prefill's images encoded and placed as transformers does."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from batch_engine.engine import BatchEngine  # noqa: E402
from batch_engine.settings import EngineSettings  # noqa: E402
from batch_engine.vision_attention import VISION_ATTENTION, register_vision_attention  # noqa: E402
from tests.tiny_glm4v import glm_tokenizer, tiny_glm4v_model  # noqa: E402

GRIDS = torch.tensor([[1, 8, 12], [1, 6, 4]])
"""Two images' (frames, rows, columns) of patches: 96 and 24."""


def encoder_model() -> Any:
    torch.manual_seed(0)
    return tiny_glm4v_model(glm_tokenizer()).eval()


def encode(model: Any, pixels: Any, grids: Any) -> list[Any]:
    with torch.inference_mode():
        return list(model.model.get_image_features(pixels, image_grid_thw=grids, return_dict=True).pooler_output)


def test_the_encoder_answers_as_under_sdpa_for_one_image_and_for_two() -> None:
    model = encoder_model()
    assert model.model.visual.config._attn_implementation == "sdpa"
    pixels = torch.randn(int(GRIDS.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    calls = ((pixels, GRIDS), (pixels[:96], GRIDS[:1]))
    before = [encode(model, *call) for call in calls]
    assert register_vision_attention(model)
    assert model.model.visual.config._attn_implementation == VISION_ATTENTION
    after = [encode(model, *call) for call in calls]
    assert [[t.shape[0] for t in images] for images in after] == [[24, 6], [24]]
    for want, have in zip(before, after, strict=True):
        for image_want, image_have in zip(want, have, strict=True):
            torch.testing.assert_close(image_have, image_want)
    # The two images attend apart: the first's output is the same alone as beside the second.
    torch.testing.assert_close(after[0][0], after[1][0])


def test_a_model_in_training_mode_is_refused_not_run_without_its_dropout() -> None:
    model = encoder_model()
    for block in model.model.visual.blocks:
        block.attn.attention_dropout = 0.1
    assert register_vision_attention(model)
    pixels = torch.randn(96, 3 * 2 * 14 * 14)
    encode(model, pixels, GRIDS[:1])  # in eval mode transformers passes no dropout
    model.train()
    with pytest.raises(ValueError, match="no dropout"):
        model.model.get_image_features(pixels, image_grid_thw=GRIDS[:1])


def test_a_compiled_encoder_block_traces_as_one_graph() -> None:
    model = encoder_model()
    register_vision_attention(model)
    visual = model.model.visual
    hidden = torch.randn(96, 32)
    positions = visual.rotary_pos_emb(hidden, torch.randint(0, 8, (96, 2)))
    bounds = torch.tensor([0, 96], dtype=torch.int32)
    with torch.inference_mode():
        explained = torch._dynamo.explain(visual.blocks[0])(
            hidden, cu_seqlens=bounds, position_embeddings=positions, max_seqlen=96
        )  # as the encoder calls its blocks
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_another_attention_implementation_is_left_alone() -> None:
    model = encoder_model()
    model.model.visual.config._attn_implementation = "eager"
    assert not register_vision_attention(model)
    assert model.model.visual.config._attn_implementation == "eager"


def test_the_engine_runs_its_image_model_on_the_packed_attention() -> None:
    model = encoder_model()
    BatchEngine(model, EngineSettings(slots=1, max_tokens=256))
    assert model.model.visual.config._attn_implementation == VISION_ATTENTION


@pytest.mark.parametrize("images", [1, 2])
def test_a_prefill_encodes_and_places_its_images_as_transformers_does(images: int) -> None:
    """The engine's prefill calls the encoder without transformers' `get_image_features` (whose split per image reads
    the grid back from the device) and places its output by rows found on the host (not a mask on the device): the
    same embeddings to the bit, every image's rows over its own placeholders, in order."""
    from batch_engine.images import place_images
    from batch_engine.prompts import Prompt

    model = encoder_model()
    steps = BatchEngine(model, EngineSettings(slots=1, max_tokens=512)).device
    grids = GRIDS[:images]
    pixels = torch.randn(int(grids.prod(-1).sum()), 3 * 2 * 14 * 14, generator=torch.Generator().manual_seed(1))
    placeholder = torch.tensor([model.config.image_token_id])
    tokens = [torch.tensor([5, 6])]
    for grid in grids:  # each image's placeholders, then a word
        tokens += [placeholder.repeat(int(grid.prod()) // 4), torch.tensor([7])]
    ids = torch.cat(tokens)
    prompt = Prompt(ids, torch.arange(len(ids)).view(1, -1), 0, pixels, grids, None)
    with torch.inference_mode():
        expected = steps.text.embed_tokens(ids)
        expected[ids == model.config.image_token_id] = torch.cat(encode(model, pixels, grids))
        placed = steps.text.embed_tokens(ids)
        place_images(placed, prompt, model, steps.encoder)
    assert torch.equal(placed, expected)
