from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from vision_stage.embedder import PinnedEmbedder, Vector, shared_embedder


class ThreadRecorder:
    """Embeds every text as a constant vector and records which thread asked."""

    def __init__(self) -> None:
        self.threads: list[int] = []

    def query(self, texts: str | list[str], /) -> Vector:
        self.threads.append(threading.get_ident())
        return np.ones(3, dtype=np.float32)

    def passage(self, texts: str | list[str], /) -> Vector:
        self.threads.append(threading.get_ident())
        return np.ones((len(texts), 3), dtype=np.float32)


def test_every_call_runs_on_the_embedders_own_thread_whoever_asks() -> None:
    recorder = ThreadRecorder()
    loaded_on: list[int] = []

    def load() -> ThreadRecorder:
        loaded_on.append(threading.get_ident())
        return recorder

    pinned = PinnedEmbedder(load)
    pinned.query("a")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda text: pinned.passage([text]), ["b", "c", "d", "e"]))
    assert len(recorder.threads) == 5
    assert set(recorder.threads) == set(loaded_on)
    assert threading.get_ident() not in recorder.threads
    # a call made on its own thread runs there directly instead of waiting for itself
    nested = pinned._thread.submit(pinned.query, "f").result(timeout=5)
    assert nested.shape == (3,)
    assert recorder.threads[-1] == loaded_on[0]


def test_the_router_and_the_relevance_ranking_share_one_model() -> None:
    from vision_stage.relevance import load_embedder

    assert load_embedder() is shared_embedder()
