"""CPU schedule of V2: layers decomposed by worker threads in a rolling window, stored in order.

A batch barrier (decompose a batch's layers side by side, wait for the slowest, store them,
fetch the next batch) leaves workers idle whenever a batch mixes a large layer with small ones,
and while the main thread stores. Here every loaded layer is handed to the workers at once and
the main thread stores the oldest when it is done, keeping at most ``window`` layers in flight.

No deadlock with the reader: layers in flight hold staging-pool buffers that only the main
thread gives back, so the main thread never waits for the reader while it holds any; when the
reader has nothing ready it stores the oldest layer instead (waiting for a worker, which never
waits for the reader). That is the consumer's half of the pool's invariant (``buffers.py``).
Every layer taken is released on every path: stored, skipped, zero-difference or failed.

Waits for workers go through the run's ``RunWatch`` (cancel, Ctrl-C and the stall bound reach
them). After an error or cancel, workers still running are given ``ABANDON_WAIT_S`` to finish
before their layers' buffers go back; a worker stuck longer is left behind (its pool is shut
down without waiting) and the pool, closed by then, drops the buffer when it comes back.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor

from ..extract.callbacks import InterruptFn
from ..extract.layer import LayerExtraction
from ..extract.waits import RunWatch, wait_futures
from .streamer import LoadedBatch, LoadedLayer

# With ``WORKER_STOP_S`` (layer_workers.py) and ``CLOSE_WAIT_S`` (prefetch.py): a cancel with a stuck
# worker and a stuck reader still ends well within the 2 s users wait at most.
ABANDON_WAIT_S = 0.4

InFlight = deque[tuple[LoadedLayer, "Future[LayerExtraction] | None"]]


def stream_rolling(loaded: Iterator[LoadedBatch], reader_has_batch: Callable[[], bool],
                   workers: ThreadPoolExecutor, window: int,
                   extract_one: Callable[[LoadedLayer], LayerExtraction],
                   needs_svd: Callable[[LoadedLayer], bool],
                   store: Callable[[LoadedLayer, LayerExtraction | None], None],
                   on_batch: Callable[[int, float], None],
                   check_interrupt: InterruptFn | None, watch: RunWatch | None = None) -> None:
    """Decompose and store every layer ``loaded`` yields; see the module docstring."""
    in_flight: InFlight = deque()
    watch = watch if watch is not None else RunWatch(check_interrupt)

    def store_oldest() -> None:
        layer, fut = in_flight[0]
        ex = (watch.result(fut, f"a layer worker to finish the oldest of {len(in_flight)} "
                                "layers in flight") if fut is not None else None)
        in_flight.popleft()
        try:
            store(layer, ex)
        finally:
            layer.release()

    batch: LoadedBatch | None = None
    try:
        while True:
            while in_flight and not reader_has_batch():
                store_oldest()
            batch = next(loaded, None)
            if batch is None:
                break
            if check_interrupt is not None:
                check_interrupt()
            t0 = time.perf_counter()
            for layer in batch.layers:
                fut = workers.submit(extract_one, layer) if needs_svd(layer) else None
                in_flight.append((layer, fut))
                while len(in_flight) > window:
                    store_oldest()
            on_batch(len(batch.layers), time.perf_counter() - t0)
        while in_flight:
            store_oldest()
    except BaseException:
        in_workers = {id(layer) for layer, _ in in_flight}
        _abandon(in_flight)
        # Layers of the batch at hand that were not handed to the workers yet (or were stored
        # already: release is idempotent) go back too.
        for layer in batch.layers if batch is not None else ():
            if id(layer) not in in_workers:
                layer.release()
        raise


def _abandon(in_flight: InFlight) -> None:
    """After an error or interrupt: no worker may still use a buffer when it goes back."""
    futures = [f for _, f in in_flight if f is not None]
    for f in futures:
        f.cancel()
    wait_futures(futures, ABANDON_WAIT_S)
    for layer, fut in in_flight:
        if fut is None or fut.done():
            layer.release()
        else:
            # Still read by a stuck worker: its buffer goes back when that worker finishes.
            fut.add_done_callback(lambda _f, x=layer: x.release())
    in_flight.clear()
