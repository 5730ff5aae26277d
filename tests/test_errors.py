"""The error tree and the status table are complete: every leaf error has a status and a stable slug."""

from __future__ import annotations

import pytest

from orchestrator.errors import ERROR_TABLE, INTERNAL_ERROR, ROOTS, spec_for


def leaves(root: type[Exception]) -> set[type[Exception]]:
    subclasses = set(root.__subclasses__())
    if not subclasses:
        return {root}
    return set().union(*(leaves(sub) for sub in subclasses))


@pytest.mark.parametrize("root", ROOTS, ids=lambda root: root.__name__)
def test_every_leaf_error_has_its_own_row(root: type[Exception]) -> None:
    missing = {cls.__name__ for cls in leaves(root) if cls not in ERROR_TABLE}
    assert not missing, f"add these to ERROR_TABLE: {sorted(missing)}"


def test_slugs_are_unique_and_statuses_are_errors() -> None:
    slugs = [spec.type for spec in ERROR_TABLE.values()]
    assert len(slugs) == len(set(slugs))
    assert all(400 <= spec.status < 600 for spec in ERROR_TABLE.values())


def test_input_errors_are_4xx_and_unknown_errors_are_500() -> None:
    from orchestrator.errors import RequestInvalid
    from vision_stage.errors import ImageRejected

    for root in (RequestInvalid, ImageRejected):
        assert all(400 <= ERROR_TABLE[leaf].status < 500 for leaf in leaves(root))
    assert spec_for(RuntimeError("boom")) == INTERNAL_ERROR
