"""JSON inside a model's text (`stage_protocol.model_text.find_json`), the one reader of the vision stage's descriptions
and the reasoning stage's `response_format: json` answers. Pure."""

from __future__ import annotations

import pytest

from stage_protocol.model_text import find_json


@pytest.mark.parametrize(
    ("text", "value", "repaired"),
    [
        ('{"a": 1}', {"a": 1}, False),
        ('Sure {not json} here: ```json\n{"a": 1}\n``` done', {"a": 1}, False),  # a fence first
        ('```\n{"a": 1}\n```', {"a": 1}, False),
        ('Before {"a": 1} after', {"a": 1}, False),
        ('{"a": [1, 2,],}', {"a": [1, 2]}, True),
        ("{'a': 'b', 'c': True}", {"a": "b", "c": True}, True),
        ('{a: "b"} and then some prose', {"a": "b"}, True),
        ('{"a": 1, // one\n "b": 2}', {"a": 1, "b": 2}, True),
        ('```json\n{"a": "cut', {"a": "cut"}, True),  # an unclosed fence, cut by the token limit
    ],
)
def test_json_is_found_as_a_person_would_find_it(text: str, value: object, repaired: bool) -> None:
    found = find_json(text)
    assert found is not None
    assert (found.value, found.repaired) == (value, repaired)


def test_a_cut_object_is_repaired_whole_not_replaced_by_a_complete_object_inside_it() -> None:
    found = find_json('{"caption": "A receipt", "text_lines": [{"text": "TOTAL 80.00"}, {"text": "Lat')
    assert found is not None
    assert found.value == {"caption": "A receipt", "text_lines": [{"text": "TOTAL 80.00"}, {"text": "Lat"}]}


def test_objects_inside_a_list_are_not_objects_of_their_own() -> None:
    assert find_json('[{"text": "a"}, {"text": "b"}]', kinds=(dict,)) is None
    found = find_json('[{"text": "a"}, {"text": "b"}]', kinds=(list,))
    assert found is not None
    assert found.value == [{"text": "a"}, {"text": "b"}]


def test_numbers_can_be_kept_as_written() -> None:
    found = find_json('{"total": 80.00, "count": 2}', parse_float=str)
    assert found is not None
    assert found.value == {"total": "80.00", "count": 2}


def test_the_text_around_the_value_is_kept_without_fences() -> None:
    text = 'Here it is:\n```json\n{"a": 1}\n```\nThe date is smudged.'
    found = find_json(text)
    assert found is not None
    assert found.outside(text) == "Here it is:\nThe date is smudged."


@pytest.mark.parametrize(
    "text", ["", "no json at all", "{", "[" * 5000, "{" * 30000, '{"a": [' * 5000, "{not json}", "[1, 2"]
)
def test_text_without_a_value_or_nested_past_reason_gives_none_or_a_value_never_an_error(text: str) -> None:
    found = find_json(text, kinds=(dict,))
    assert found is None or isinstance(found.value, dict)
