"""The garbage collector in a server that has loaded its models (`stage_protocol.server.collector`): what the process
then holds is kept out of the collector's walks while it serves, and given back when it stops; the service's app
and the stage servers' command do so, an app given its backends (tests, harnesses) does not."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import weakref

import pytest
import uvicorn
from fastapi import FastAPI

from orchestrator.api.app import create_app
from orchestrator.settings import Settings
from orchestrator.wiring import Backends
from stage_protocol.server import command
from stage_protocol.server.collector import frozen_heap
from tests.fakes import FakeReasoning, FakeVision
from vision_stage import server as vision_server


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def _walked(probe: object) -> bool:
    """Whether a full collection would walk `probe`."""
    return any(held is probe for held in gc.get_objects())


def test_the_garbage_is_collected_then_the_rest_kept_out_of_the_walks_until_the_block_ends() -> None:
    gc.disable()  # so that nothing but `frozen_heap` collects the cycle
    try:
        garbage = weakref.ref(_Cycle())  # a cycle no one holds: only the collector frees it
        assert garbage() is not None
    finally:
        gc.enable()
    probe: list[list[int]] = [[]]
    assert gc.is_tracked(probe)
    assert _walked(probe)
    with frozen_heap() as frozen:
        assert garbage() is None
        assert frozen > 0
        assert gc.get_freeze_count() > 0
        assert not _walked(probe)
    assert gc.get_freeze_count() == 0
    assert _walked(probe)


def _serving(app: FastAPI) -> tuple[int, bool]:
    """While `app` serves: how many objects are frozen, and whether its vision backend (loaded, or given) is walked."""

    async def serve() -> tuple[int, bool]:
        async with app.router.lifespan_context(app):
            return gc.get_freeze_count(), _walked(app.state.services.backends.vision)

    return asyncio.run(serve())


@pytest.mark.slow
def test_the_service_app_serves_the_models_it_loaded_frozen_and_gives_them_back_at_shutdown() -> None:
    frozen, vision_walked = _serving(create_app(Settings()))  # the embedded models, as `make run` serves them
    assert frozen > 0
    assert not vision_walked  # frozen once loaded, not before
    assert gc.get_freeze_count() == 0


def test_an_app_given_its_backends_leaves_the_collector_alone() -> None:
    frozen, vision_walked = _serving(create_app(Settings(), Backends(FakeVision(), FakeReasoning())))
    assert frozen == 0
    assert vision_walked


def test_a_stage_server_serves_the_backend_it_loaded_with_the_heap_frozen(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[int, bool]] = []
    loaded = FakeVision()

    async def served(self: uvicorn.Server, sockets: object = None) -> None:
        seen.append((gc.get_freeze_count(), _walked(loaded)))

    monkeypatch.setattr(uvicorn.Server, "serve", served)
    monkeypatch.setattr(command, "keep_large_buffers_in_heap", lambda: False)  # glibc's thresholds: process-wide
    args = argparse.Namespace(backend="fake", served_model_name=None, host="127.0.0.1", port=0, log_level="warning")

    async def loading() -> FakeVision:
        return loaded

    def app_for(backend: FakeVision, name: str) -> FastAPI:
        return vision_server.create_app(backend, served_model_name=name)

    assert asyncio.run(command.serve(args, loading(), app_for, stage="vision", log=logging.getLogger(__name__))) == 0
    assert len(seen) == 1
    frozen, vision_walked = seen[0]
    assert frozen > 0
    assert not vision_walked
    assert gc.get_freeze_count() == 0
