"""Background loading that overlaps reading the next layers with computing the current one.

A single worker thread runs ``load(item)`` ahead of the consumer, at most ``depth`` results in
flight, so memory stays bounded by ``depth`` loaded items. torch and file reads release the
GIL, so the overlap is real on CPU too. Errors raised by ``load`` are re-raised in the consumer
at the item that caused them; closing the iterator (normally, on error or on interrupt) stops
and joins the worker, so no thread outlives the run.

Loads run without autograd: ComfyUI's parameters have ``requires_grad=True``, and the
``torch.inference_mode`` ComfyUI runs nodes under covers only the thread that entered it, so a
read in this thread would otherwise build autograd state for every weight.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch

K = TypeVar("K")
V = TypeVar("V")

_DONE = object()


class Prefetcher(Generic[K, V]):
    """Iterate ``(item, load(item))`` with up to ``depth`` loads running ahead."""

    def __init__(self, items: Sequence[K], load: Callable[[K], V], depth: int = 2) -> None:
        self._items = items
        self._load = load
        self._depth = max(0, depth)
        self._stop = threading.Event()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, self._depth))
        self._thread: threading.Thread | None = None

    def _load_no_grad(self, item: K) -> V:
        with torch.no_grad():
            return self._load(item)

    def _worker(self) -> None:
        for item in self._items:
            if self._stop.is_set():
                break
            try:
                value: object = ("ok", item, self._load_no_grad(item))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                value = ("error", item, e)
            while not self._stop.is_set():
                try:
                    self._queue.put(value, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if value[0] == "error":
                break
        while not self._stop.is_set():
            try:
                self._queue.put(_DONE, timeout=0.1)
                break
            except queue.Full:
                continue

    def __iter__(self) -> Iterator[tuple[K, V]]:
        if self._depth == 0:
            for item in self._items:
                yield item, self._load_no_grad(item)
            return
        self._thread = threading.Thread(target=self._worker, name="lora-extract-prefetch",
                                        daemon=True)
        self._thread.start()
        try:
            while True:
                got = self._queue.get()
                if got is _DONE:
                    return
                status, item, value = got  # type: ignore[misc]
                if status == "error":
                    raise value
                yield item, value
        finally:
            self.close()

    def ready(self) -> bool:
        """Whether the next item (or the end, or an error) is loaded: taking it will not wait.

        Always False without a worker (``depth`` 0 loads in the consumer's thread)."""
        return self._thread is not None and not self._queue.empty()

    def close(self) -> None:
        """Stop the worker and wait for it; drops loaded items nobody will consume."""
        self._stop.set()
        if self._thread is not None:
            while self._thread.is_alive():
                try:
                    while True:
                        self._queue.get_nowait()
                except queue.Empty:
                    pass
                self._thread.join(timeout=0.05)
            self._thread = None
