"""Reusable host buffers for reading ahead, with a byte cap that bounds host memory.

Freshly allocated large tensors cost page faults on every layer (a 512 MB tensor fills at
~10 GB/s, an existing one at 44-68 GB/s on a 2-core CPU), so the streamer
builds differences (CPU) or stages raw weights for the copy to the GPU (pinned memory) in
buffers taken from this pool and given back when the layer is done. ``acquire`` blocks while
other buffers are out and the cap would be passed: that is what bounds the read-ahead.
"""

from __future__ import annotations

import threading

import torch


class PoolClosed(RuntimeError):
    """The run ended while a reader waited for a buffer."""


class StagingPool:
    """Byte buffers (uint8) reused across layers; ``pin`` for page-locked memory (CUDA)."""

    def __init__(self, capacity_bytes: int, pin: bool = False) -> None:
        self.capacity = max(1, capacity_bytes)
        self.pin = pin
        self._free: list[torch.Tensor] = []
        self._allocated = 0     # bytes of every buffer the pool owns (free or out)
        self._out = 0           # buffers handed out and not yet released
        self._closed = False
        self._cond = threading.Condition()
        self.peak_bytes = 0

    def _new(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._allocated += nbytes
        self.peak_bytes = max(self.peak_bytes, self._allocated)
        return buf

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes (its first ``nbytes`` are yours)."""
        with self._cond:
            while True:
                if self._closed:
                    raise PoolClosed("the run ended")
                # Indices, not list.remove: tensors compare element-wise, not by identity.
                fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                if fits:
                    best = min(fits, key=lambda i: self._free[i].numel())
                    self._out += 1
                    return self._free.pop(best)
                # Drop free buffers too small to reuse, largest first, to make room.
                while self._free and self._allocated + nbytes > self.capacity:
                    largest = max(range(len(self._free)), key=lambda i: self._free[i].numel())
                    self._allocated -= self._free.pop(largest).numel()
                # A layer larger than the cap still runs, alone: never wait on nothing.
                if self._allocated + nbytes <= self.capacity or self._out == 0:
                    self._out += 1
                    return self._new(nbytes)
                self._cond.wait(timeout=0.1)

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._out -= 1
            self._free.append(buf)
            self._cond.notify_all()

    def close(self) -> None:
        """Wake and fail any waiting reader; drop the buffers."""
        with self._cond:
            self._closed = True
            self._free.clear()
            self._cond.notify_all()


def view_as(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """The first bytes of a pool buffer as a tensor of ``dtype`` and ``shape``."""
    numel = 1
    for s in shape:
        numel *= s
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    return buf[:nbytes].view(dtype).view(shape)
