"""The CPU rolling schedule of V2: order, window, and never waiting on the reader while holding layers."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from lora_extract.memory.rolling import stream_rolling


@dataclass
class FakeLayer:
    n: int
    released: bool = False

    def release(self) -> None:
        self.released = True


@dataclass
class FakeBatch:
    layers: list[FakeLayer]


class Reader:
    """A reader slower than the workers: after the consumer takes a batch, the next one is
    ready only once the consumer has stored ``ready_every`` more layers. Records how many
    layers the consumer held whenever it took a batch that was not ready (= waited)."""

    def __init__(self, sizes: list[int], ready_every: int) -> None:
        self.batches, n = [], 0
        for size in sizes:
            self.batches.append(FakeBatch([FakeLayer(n + i) for i in range(size)]))
            n += size
        self.ready_every = ready_every
        self.stored_since_take = ready_every      # the first batch is ready at once
        self.held_when_not_ready: list[int] = []
        self.in_flight = 0

    def ready(self) -> bool:
        return self.stored_since_take >= self.ready_every

    def stored_one(self) -> None:
        self.stored_since_take += 1
        self.in_flight -= 1

    def __iter__(self):
        for b in self.batches:
            if not self.ready():
                self.held_when_not_ready.append(self.in_flight)
            self.stored_since_take = 0
            yield b


@pytest.mark.parametrize("ready_every", [2, 3])
@pytest.mark.parametrize("window", [1, 4])
def test_order_window_and_no_wait_while_holding(ready_every: int, window: int) -> None:
    reader = Reader([3, 1, 4, 2, 5], ready_every)
    stored: list[int] = []
    most = 0
    lock = threading.Lock()
    running = 0

    def extract(layer: FakeLayer) -> int:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        with lock:
            running -= 1
        return layer.n * 10

    def submitted_store(layer: FakeLayer, ex) -> None:
        assert ex == (None if layer.n % 4 == 3 else layer.n * 10)
        stored.append(layer.n)
        layer.release()
        reader.stored_one()

    def needs(layer: FakeLayer) -> bool:
        reader.in_flight += 1
        return layer.n % 4 != 3          # every fourth layer is stored as is (no SVD)

    seen_batches: list[int] = []
    with ThreadPoolExecutor(2) as ex:
        stream_rolling(iter(reader), reader.ready, ex, window, extract, needs, submitted_store,
                       lambda n, s: seen_batches.append(n), None)
    assert stored == list(range(15))                  # model order
    assert seen_batches == [3, 1, 4, 2, 5]
    assert reader.in_flight == 0
    # The consumer only ever waited for the reader with no layer in flight.
    assert set(reader.held_when_not_ready) <= {0}


def test_an_error_releases_every_layer_in_flight_and_waits_for_workers() -> None:
    reader = Reader([4, 4], 0)
    started = threading.Event()
    layers = [x for b in reader.batches for x in b.layers]

    def extract(layer: FakeLayer) -> int:
        started.set()
        if layer.n == 2:
            raise RuntimeError("boom at 2")
        return layer.n

    def store(layer: FakeLayer, ex) -> None:
        layer.release()

    with ThreadPoolExecutor(2) as ex, pytest.raises(RuntimeError, match="boom at 2"):
        stream_rolling(iter(reader), reader.ready, ex, 8, extract, lambda layer: True, store,
                       lambda n, s: None, None)
    assert started.is_set()
    assert all(x.released for x in layers)
