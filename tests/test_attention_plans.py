"""cuDNN's attention plans per power of two of the lengths (`batch_engine.attention_plans`): PyTorch takes that path
only for calls without a mask whose queries, keys and values are laid out positions outer, so every such call of the
engine must hand them so; the setting reaches PyTorch's variable; the plans built at start cover every length."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from batch_engine.attention_plans import (
    VARIABLE,
    RecurringCalls,
    arranged,
    plan_by_power_of_two,
    planned_on,
    positions_outer,
    powers_of_two,
    serve,
    warm_plans,
)
from batch_engine.slots import SlotStep, register_attention, slot_attention

HEADS, KV_HEADS, DIM = 4, 2, 8


def _positions_outer(tensor: torch.Tensor) -> bool:
    """As PyTorch checks it (`use_ragged_in_dense`)."""
    return tensor.transpose(1, 2).is_contiguous()


def _recording(seen: list[tuple[torch.Tensor, ...]], keywords: list[dict[str, object]] | None = None) -> object:
    attend = torch.nn.functional.scaled_dot_product_attention

    def recording(*tensors: torch.Tensor, **kwargs: object) -> torch.Tensor:
        seen.append(tensors)
        if keywords is not None:
            keywords.append(kwargs)
        return attend(*tensors, **kwargs)  # type: ignore[arg-type]

    return recording


def test_a_prefill_from_position_0_hands_the_attention_everything_positions_outer_and_answers_the_same() -> None:
    generator = torch.Generator().manual_seed(0)
    length, capacity = 10, 64
    # the layer's queries, positions outer in memory; K and V read from the slots (positions inner)
    query = torch.randn((1, length, HEADS, DIM), generator=generator).transpose(1, 2)
    slots = [torch.randn((3, KV_HEADS, capacity, DIM), generator=generator) for _ in "kv"]
    key, value = (slot[1:2, :, :length] for slot in slots)
    assert not _positions_outer(key)
    register_attention()  # the engine's operators
    seen: list[tuple[torch.Tensor, ...]] = []
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _recording(seen)):
        slot_attention(None, query, key, value, None, slot_step=SlotStep(causal=True))  # plans per length
        _, passed_key, passed_value = seen.pop()
        assert passed_key is key  # not copied
        assert passed_value is value
        out, _ = slot_attention(None, query, key, value, None, slot_step=SlotStep(causal=True, positions_outer=True))
    assert len(seen) == 1
    assert all(_positions_outer(tensor) for tensor in seen[0])
    assert seen[0][0] is query  # already laid out so: not copied
    expected = torch.nn.functional.scaled_dot_product_attention(query, key, value, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(out, expected.transpose(1, 2))
    assert out.is_contiguous()


def test_positions_outer_copies_only_what_is_laid_out_heads_outer() -> None:
    whole = torch.randn((1, 12, HEADS, DIM)).transpose(1, 2)
    assert positions_outer(whole) is whole
    part = whole[:, :, :10]  # a batch of one's stride is a longer tensor's: the plans ignore it
    assert positions_outer(part) is part
    heads_outer = torch.randn((1, HEADS, 10, DIM))
    laid = positions_outer(heads_outer)
    assert _positions_outer(laid)
    assert not _positions_outer(heads_outer)
    assert torch.equal(laid, heads_outer)


def test_the_vision_encoder_s_attention_hands_each_image_positions_outer() -> None:
    from batch_engine.vision_attention import _attend

    generator = torch.Generator().manual_seed(0)
    patches = (6, 10)
    # as transformers' GLM-4V encoder makes them: Q and K rotated into tensors of their own, V a view of the packed
    # projection (each patch's values 3 × heads × dim apart)
    query, key = (torch.randn((sum(patches), HEADS, DIM), generator=generator) for _ in "qk")
    value = torch.randn((sum(patches), 3, HEADS, DIM), generator=generator).unbind(1)[2]
    bounds = torch.tensor([0, patches[0], sum(patches)])
    for bounded in (bounds, bounds[[0, 2]]):
        seen: list[tuple[torch.Tensor, ...]] = []
        with (
            mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _recording(seen)),
            mock.patch("batch_engine.vision_attention.planned_on", return_value=True),  # as on a GPU
        ):
            expected = _attend(query, key, value, bounded, DIM**-0.5)
        assert seen
        assert all(_positions_outer(tensor) for call in seen for tensor in call)
        for variable in ("0", "1"):  # plans per length, or off a CUDA device: as the encoder hands them
            seen.clear()
            with (
                mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _recording(seen)),
                mock.patch.dict(os.environ, {VARIABLE: variable}),
            ):
                torch.testing.assert_close(_attend(query, key, value, bounded, DIM**-0.5), expected)
            assert seen
            assert not any(_positions_outer(call[2]) for call in seen)  # V as it comes, not laid out


def test_only_a_cuda_device_with_the_variable_set_takes_the_plans() -> None:
    for variable, device, expected in (("1", "cuda", True), ("0", "cuda", False), ("1", "cpu", False)):
        with mock.patch.dict(os.environ, {VARIABLE: variable}):
            assert planned_on(torch.device(device)) is expected


def test_the_setting_sets_pytorch_s_variable_unless_the_environment_says_either_way() -> None:
    with mock.patch.dict(os.environ, clear=False):
        os.environ.pop(VARIABLE, None)
        assert plan_by_power_of_two()
        assert os.environ[VARIABLE] == "1"
        os.environ[VARIABLE] = "0"
        assert not plan_by_power_of_two()
        assert os.environ[VARIABLE] == "0"


def test_the_plans_built_at_start_cover_every_length_up_to_the_most() -> None:
    def rounded(length: int) -> int:  # PyTorch's `roundup_power2`
        return 1 << (length - 1).bit_length()

    for most in (256, 300, 8192):
        planned = powers_of_two(most)
        assert planned == sorted(set(planned))
        assert planned[0] == 2
        assert all(rounded(length) in planned for length in range(2, most + 1))
        assert planned[-1] == rounded(most)


def _model() -> object:
    from tests.tiny_glm4v import glm_tokenizer, tiny_glm4v_model

    return tiny_glm4v_model(glm_tokenizer())


def test_nothing_is_planned_off_a_cuda_device_or_with_plans_per_length() -> None:
    model = _model()
    with mock.patch.dict(os.environ, {VARIABLE: "1"}):
        assert warm_plans(model, 256, vision=True) is None
    if torch.cuda.is_available():
        with mock.patch.dict(os.environ, {VARIABLE: "0"}):
            assert warm_plans(model.to("cuda"), 256, vision=True) is None  # type: ignore[attr-defined]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_plans_are_built_for_the_model_s_shapes_on_a_gpu() -> None:
    """That the calls run on a GPU for every shape; not that PyTorch took its per-power-of-two path, which it decides
    at the process's first cuDNN attention (the benchmark's first token at a new length shows that)."""
    model = _model().to("cuda", torch.bfloat16)  # type: ignore[attr-defined]
    with mock.patch.dict(os.environ, {VARIABLE: "1"}):
        # every power of two up to 256 tokens, and up to 4 × 256 patches (a 2 × 2 merge)
        assert warm_plans(model, 256, vision=True) == len(powers_of_two(256)) + len(powers_of_two(1024))


def test_a_failure_to_build_the_plans_is_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    from batch_engine import attention_plans

    with mock.patch.object(attention_plans, "warm_plans", side_effect=RuntimeError("cuDNN said no")):
        attention_plans.build_plans(object(), 256, vision=False)
    assert "building the attention plans failed" in caplog.text
    assert "cuDNN said no" in caplog.text


Call = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _call(length: int, *, capacity: int = 64) -> Call:
    """A prefill's attention call as the engine makes it: the queries heads outer, K and V read from the slots."""
    query = torch.randn((1, HEADS, length, DIM))
    key, value = (torch.randn((3, KV_HEADS, capacity, DIM))[1:2, :, :length] for _ in "kv")
    return query, key, value


def _arrange(calls: RecurringCalls, tensors: Call) -> Call:
    query, key, value = tensors
    return calls.arrange(query, key, value, causal=True, scale=DIM**-0.5, gqa=True)


def test_a_call_met_in_two_prefills_gets_a_plan_of_its_own_and_then_goes_as_it_is() -> None:
    calls, tensors = RecurringCalls(), _call(10)
    seen: list[tuple[torch.Tensor, ...]] = []
    keywords: list[dict[str, object]] = []
    for _ in range(3):  # the layers of one prefill: met once
        assert all(_positions_outer(tensor) for tensor in _arrange(calls, tensors))
    assert not calls.build_one()  # nothing recurs yet
    calls.turn(enabled=True)
    assert all(_positions_outer(tensor) for tensor in _arrange(calls, tensors))  # met again: waits for its plan
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", _recording(seen, keywords)):
        assert calls.build_one()
        assert not calls.build_one()
    (planned,) = seen  # the plan's call: the same sizes, strides and arguments as the engine's, on zeros
    assert [(t.shape, t.stride()) for t in planned] == [(t.shape, t.stride()) for t in tensors]
    assert keywords == [{"is_causal": True, "scale": DIM**-0.5, "enable_gqa": True}]
    from batch_engine import attention_plans

    with mock.patch.object(attention_plans, "positions_outer", side_effect=AssertionError("copied")):
        arranged = _arrange(calls, tensors)  # no copy made, not even one thrown away
    assert all(mine is theirs for mine, theirs in zip(arranged, tensors, strict=True))  # its own plan
    other = _call(11)
    assert all(_positions_outer(tensor) for tensor in _arrange(calls, other))  # another length: not yet
    calls.turn(enabled=False)  # `EngineSettings.recurring_plans` off: every call per power of two
    assert all(_positions_outer(tensor) for tensor in _arrange(calls, tensors))
    assert not calls.build_one()


def test_only_so_many_calls_get_a_plan_and_a_failed_one_is_not_tried_again(caplog: pytest.LogCaptureFixture) -> None:
    from batch_engine import attention_plans

    calls = RecurringCalls(most=1)
    first, second = _call(10), _call(12)
    for _ in range(2):
        calls.turn(enabled=True)
        _arrange(calls, first)
        _arrange(calls, second)
    with mock.patch.object(attention_plans, "_plan", side_effect=RuntimeError("cuDNN said no")):
        assert calls.build_one()
    assert not calls.build_one()  # the second never waited: one plan at most
    assert "cuDNN said no" in caplog.text
    calls.turn(enabled=True)
    assert all(_positions_outer(tensor) for tensor in _arrange(calls, first))  # per power of two, as before
    assert not calls.build_one()  # and not tried again


def test_a_thread_without_recurring_calls_lays_every_call_out() -> None:
    import threading

    calls = RecurringCalls(after=1)  # a call waits for its plan at its first meeting
    results: list[tuple[torch.Tensor, ...]] = []

    def engine_thread() -> None:
        serve(calls)
        query, key, value = _call(10)
        results.append(arranged(query, key, value, causal=True, scale=DIM**-0.5, gqa=True))

    thread = threading.Thread(target=engine_thread)
    thread.start()
    thread.join()
    query, key, value = _call(11)
    results.append(arranged(query, key, value, causal=True, scale=DIM**-0.5, gqa=True))  # this thread: none served
    assert all(_positions_outer(tensor) for result in results for tensor in result)
    assert calls.build_one()  # the engine thread's call was counted, and only it
    assert not calls.build_one()


def test_calls_met_once_make_way_and_calls_already_laid_out_are_not_counted() -> None:
    calls = RecurringCalls(most=1)  # four calls counted at most
    lengths = [10, 11, 12, 13, 14]
    for length in lengths:  # five lengths met once: the first forgotten
        calls.turn(enabled=True)
        _arrange(calls, _call(length))
    calls.turn(enabled=True)
    _arrange(calls, _call(10))
    assert not calls.build_one()  # met once again, as if new
    calls.turn(enabled=True)
    _arrange(calls, _call(14))
    assert calls.build_one()  # still counted: met in two prefills
    ready = tuple(torch.randn((1, 9, heads, DIM)).transpose(1, 2) for heads in (HEADS, KV_HEADS, KV_HEADS))
    for _ in range(2):
        calls.turn(enabled=True)
        query, key, value = ready
        given = _arrange(calls, (query, key, value))
        assert all(mine is theirs for mine, theirs in zip(given, ready, strict=True))  # nothing to copy or plan
    assert not calls.build_one()
