"""The CUDA stream and event calls of the V2 streamer, behind one small object.

These are the only calls whose order decides correctness rather than speed: a pinned buffer
refilled before the copy that reads it has finished silently corrupts a later layer, and a
difference used before the stream that wrote it has finished is garbage. They cannot run
without a GPU, so the streamer makes them through this interface only; ``CudaStreams`` is the
thin pass-through to ``torch.cuda``, and a recording fake in the tests
(``tests/memory/test_streamer_order.py``) checks the order on any machine.

Protocol of one layer (reader thread unless said otherwise):

1. ``with on_side():`` copy the pinned host data with ``to_device`` (non-blocking) and form the
   difference there; nothing of it runs on the compute stream.
2. ``ready = mark()``: an event after that work on the side stream.
3. ``wait_host(ready)``: only then may the pinned buffers be reused, and the norm be read.
4. ``keep_for_compute(diff)``: ``diff`` was allocated on the side stream and is freed after the
   compute stream used it; the caching allocator must know, or it could hand the memory to the
   side stream while a kernel on the compute stream still reads it.
5. Main thread, before the first use: ``compute_waits(ready)``.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Protocol

import torch


class DeviceStreams(Protocol):
    """What the streamer needs from a device with asynchronous copies (see module docstring)."""

    device: torch.device

    def on_side(self) -> AbstractContextManager[object]: ...

    def to_device(self, pinned: torch.Tensor) -> torch.Tensor: ...

    def mark(self) -> object: ...

    def wait_host(self, event: object) -> None: ...

    def keep_for_compute(self, t: torch.Tensor) -> None: ...

    def compute_waits(self, event: object) -> None: ...


class CudaStreams:
    """A side stream for copies next to the caller's compute stream, on one CUDA device."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Captured here, on the thread that runs the SVDs: ``current_stream`` is per thread,
        # and in the reader thread it is the default stream whatever stream the caller set.
        self.compute = torch.cuda.current_stream(device)
        self.side = torch.cuda.Stream(device)

    def on_side(self) -> AbstractContextManager[object]:
        return torch.cuda.stream(self.side)

    def to_device(self, pinned: torch.Tensor) -> torch.Tensor:
        # non_blocking from pinned memory: a DMA on the side stream, overlapping the compute
        # stream's SVDs; from pageable memory it would be a synchronous staged copy.
        return pinned.to(self.device, non_blocking=True)

    def mark(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(self.side)
        return event

    def wait_host(self, event: object) -> None:
        assert isinstance(event, torch.cuda.Event)
        event.synchronize()

    def keep_for_compute(self, t: torch.Tensor) -> None:
        t.record_stream(self.compute)

    def compute_waits(self, event: object) -> None:
        # A wait on this layer's own event, not on the whole side stream: the side stream may
        # already hold the next layer's copies, and waiting for those would stall the SVDs.
        assert isinstance(event, torch.cuda.Event)
        self.compute.wait_event(event)


def streams_for(device: torch.device) -> DeviceStreams | None:
    """The stream mechanics for ``device``: CUDA only (None: synchronous host path)."""
    return CudaStreams(device) if device.type == "cuda" else None
