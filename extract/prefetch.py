"""Background loading that overlaps reading the next layers with computing the current one.

A single worker thread runs ``load(item)`` ahead of the consumer, at most ``depth`` results in
flight, so memory stays bounded by ``depth`` loaded items. torch and file reads release the
GIL, so the overlap is real on CPU too. Errors raised by ``load`` are re-raised in the consumer
at the item that caused them; closing the iterator (normally, on error or on interrupt) stops
and joins the worker, so no thread outlives the run.

Loads run without autograd: ComfyUI's parameters have ``requires_grad=True``, and the
``torch.inference_mode`` ComfyUI runs nodes under covers only the thread that entered it, so a
read in this thread would otherwise build autograd state for every weight.

The consumer never waits untimed: it takes each item in slices through a ``RunWatch``
(``waits.py``), so the user's cancel, Ctrl-C and the stall bound reach it while the reader
works or is stuck. ``close`` waits for the reader at most ``CLOSE_WAIT_S``; a reader stuck in a
read that never returns is left behind (a daemon thread that stops as soon as the read does)
rather than freezing the caller. Loaded items nobody will consume go to ``discard`` (the V2
streamer gives their staging buffers back there), including one the reader finishes late.

When the consumer computes on the CPU (``cpu_compute``), the reader runs its torch operations on
one thread (``op_threads.py``): a second thread team the size of the machine slowed the
consumer's matrix products by 1.2-1.4x even while the reader was idle.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Generic, TypeVar

import torch

from .op_threads import limit_this_thread_to_one_op_thread
from .waits import RunWatch, join_for

log = logging.getLogger(__name__)

K = TypeVar("K")
V = TypeVar("V")

_DONE = object()
# How long ``close`` waits for the reader before leaving it behind.
CLOSE_WAIT_S = 0.8


class Prefetcher(Generic[K, V]):
    """Iterate ``(item, load(item))`` with up to ``depth`` loads running ahead."""

    def __init__(self, items: Sequence[K], load: Callable[[K], V], depth: int = 2, *,
                 watch: RunWatch | None = None, discard: Callable[[V], None] | None = None,
                 what: str = "the next item from the reader", cpu_compute: bool = False) -> None:
        self._items = items
        self._load = load
        self._depth = max(0, depth)
        self.watch = watch if watch is not None else RunWatch()
        self._discard = discard
        self._what = what
        self._cpu_compute = cpu_compute
        self._stop = threading.Event()
        self._queue: queue.Queue[object] = queue.Queue(maxsize=max(1, self._depth))
        self._thread: threading.Thread | None = None

    def _load_no_grad(self, item: K) -> V:
        with torch.no_grad():
            return self._load(item)

    def _worker(self) -> None:
        if self._cpu_compute:
            limit_this_thread_to_one_op_thread()
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
            else:
                self._drop(value)   # loaded after the consumer left: nobody takes it
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
                self.watch.tick()
                yield item, self._load_no_grad(item)
                self.watch.progressed()
            return
        self._thread = threading.Thread(target=self._worker, name="lora-extract-prefetch",
                                        daemon=True)
        self._thread.start()
        try:
            while True:
                got = self.watch.get(self._queue, self._what)
                if got is _DONE:
                    return
                status, item, value = got  # type: ignore[misc]
                if status == "error":
                    raise value
                self.watch.progressed()
                yield item, value
        finally:
            self.close()

    def ready(self) -> bool:
        """Whether the next item (or the end, or an error) is loaded: taking it will not wait.

        Always False without a worker (``depth`` 0 loads in the consumer's thread)."""
        return self._thread is not None and not self._queue.empty()

    def _drop(self, got: object) -> None:
        if self._discard is not None and isinstance(got, tuple) and got[0] == "ok":
            try:
                self._discard(got[2])
            except Exception:  # noqa: BLE001 - cleanup must not hide the run's own error
                log.exception("could not discard a loaded item")

    def _drain(self) -> None:
        try:
            while True:
                self._drop(self._queue.get_nowait())
        except queue.Empty:
            pass

    def close(self) -> None:
        """Stop the worker and wait for it (at most ``CLOSE_WAIT_S``); loaded items nobody will
        consume go to ``discard``."""
        self._stop.set()
        if self._thread is not None:
            thread = self._thread
            # Drain while joining: a worker blocked on a full queue must see room to notice.
            self._drain()
            ended = join_for(thread, CLOSE_WAIT_S)
            self._drain()
            if not ended:
                log.warning("the background reader did not stop within %.1f s (a read that does "
                            "not return); it is left behind and stops when the read does",
                            CLOSE_WAIT_S)
            self._thread = None
