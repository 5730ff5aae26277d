"""The batching engine's fused query/key/value projections (`batch_engine.projections`): the same model output as
the three products, the same parameters held once, nothing kept past a layer, and no break in a compiled layer."""

from __future__ import annotations

from typing import Any

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from batch_engine.engine import BatchEngine  # noqa: E402
from batch_engine.projections import fuse_projections  # noqa: E402
from batch_engine.settings import EngineSettings  # noqa: E402


def text_model(kind: str) -> Any:
    """A tiny random causal LM: GLM-4 (projections with biases) or Llama (without)."""
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "vocab_size": 101, "pad_token_id": 0}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    config = transformers.Glm4Config(**sizes, **heads) if kind == "glm4" else transformers.LlamaConfig(**sizes, **heads)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def parameters(model: Any) -> tuple[int, int]:
    """How many parameters the model holds, and in how many tensors."""
    held = list(model.parameters())
    return sum(p.numel() for p in held), len(held)


@pytest.mark.parametrize("kind", ["glm4", "llama"])
def test_the_fused_model_answers_as_the_three_products_did(kind: str) -> None:
    model = text_model(kind)
    ids = torch.randint(0, 101, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        before = model(ids).logits
        count, tensors = parameters(model)
        assert fuse_projections(model.model) == 2
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert parameters(model) == (count, tensors - 4 - 4 * (kind == "glm4"))  # 3 weights (and biases) → 1 each
    attention = model.model.layers[0].self_attn
    assert [type(p).__name__ for p in (attention.q_proj, attention.k_proj, attention.v_proj)] == [
        "FusedProjections", "ProjectionPart", "ProjectionPart"
    ]  # fmt: skip
    assert attention.q_proj.kept is None, "nothing of the last call is held once the value's share is read"
    assert fuse_projections(model.model) == 0, "a fused layer is not fused again"


def test_a_part_called_on_other_input_computes_its_own_share() -> None:
    model = text_model("glm4")
    attention = model.model.layers[0].self_attn
    first, other = torch.randn(1, 3, 64), torch.randn(1, 3, 64)
    with torch.inference_mode():
        expected = attention.k_proj(other), attention.v_proj(other)
        fuse_projections(model.model)
        attention.q_proj(first)  # keeps first's key and value
        got = attention.k_proj(other), attention.v_proj(other)
    for want, have in zip(expected, got, strict=True):
        torch.testing.assert_close(have, want)


def test_a_compiled_layer_traces_the_fused_projections_without_a_break() -> None:
    model = text_model("glm4")
    fuse_projections(model.model)
    layer, hidden = model.model.layers[0], torch.randn(1, 5, 64)
    positions = model.model.rotary_emb(hidden, torch.arange(5).view(1, 5))
    with torch.inference_mode():
        explained = torch._dynamo.explain(layer)(hidden, position_embeddings=positions, attention_mask=None)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("fuse", [True, False])
def test_the_engine_fuses_its_model_unless_told_not_to(fuse: bool) -> None:
    model = text_model("glm4")
    BatchEngine(model, EngineSettings(slots=1, max_tokens=256, fuse_projections=fuse))
    assert (type(model.model.layers[1].self_attn.k_proj).__name__ == "ProjectionPart") is fuse
