"""Reusable host buffers for reading ahead, with a byte cap that bounds host memory.

Freshly allocated large tensors cost page faults on every layer (a 512 MB tensor fills at
~10 GB/s, an existing one at 44-68 GB/s), so the streamer builds differences (CPU) or stages
raw weights for the copy to the GPU (pinned memory) in buffers taken from this pool and given
back when the layer is done. ``acquire`` blocks while other buffers are out and the cap would
be passed: that is what bounds the read-ahead.

No deadlock, by construction. ``acquire`` waits only for bytes held by *others*, never for
bytes the caller holds itself: the reader passes ``held``, the bytes of the batch it is
loading (and, on CUDA, the other staged weight of the same layer), and when every byte out is
its own it allocates past the cap instead of waiting. Every other holder gives its buffers
back without waiting for the reader: a batch in the read-ahead queue is taken by a consumer
that holds nothing when it asks for the next batch (see ``rolling.py`` and ``streamed_extract.py``),
and a batch the consumer holds is stored and released before it asks again. Sizes count whole
buffers (a reused buffer may be larger than the layer that took it), which is what the cap is
about. The overshoot past the cap is at most one batch's own buffers.

Reused buffers bigger than the request are what made the old guard (wait unless nothing at all
is out) hang: a batch of small layers that took large free buffers could fill the cap on its
own and then wait for itself.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext

import torch

from ..extract.waits import RunWatch


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
        self._out_bytes = 0     # their bytes (whole buffers)
        self._closed = False
        self._cond = threading.Condition()
        self.peak_bytes = 0
        self.watch: RunWatch | None = None   # the run's wait registry (stall reports)

    @property
    def buffers_out(self) -> int:
        """Buffers handed out and not given back (0 at the end of every run, on every path)."""
        with self._cond:
            return self._out

    def _new(self, nbytes: int) -> torch.Tensor:
        buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)
        self._allocated += nbytes
        self.peak_bytes = max(self.peak_bytes, self._allocated)
        return self._hand_out(buf)

    def _hand_out(self, buf: torch.Tensor) -> torch.Tensor:
        self._out += 1
        self._out_bytes += buf.numel()
        return buf

    def acquire(self, nbytes: int, held: int = 0) -> torch.Tensor:
        """A buffer of at least ``nbytes`` bytes (its first ``nbytes`` are yours).

        ``held``: bytes of buffers the caller holds and gives back only after this returns;
        the pool never waits for those (see the module docstring).
        """
        with self._cond:
            registered = None
            try:
                while True:
                    if self._closed:
                        raise PoolClosed("the run ended")
                    # Indices, not list.remove: tensors compare element-wise, not by identity.
                    fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
                    if fits:
                        best = min(fits, key=lambda i: self._free[i].numel())
                        return self._hand_out(self._free.pop(best))
                    # Drop free buffers too small to reuse, largest first, to make room.
                    while self._free and self._allocated + nbytes > self.capacity:
                        largest = max(range(len(self._free)), key=lambda i: self._free[i].numel())
                        self._allocated -= self._free.pop(largest).numel()
                    # Wait only for bytes someone else will give back: never on nothing, and
                    # never on the caller's own buffers.
                    others = self._out_bytes - held
                    if self._allocated + nbytes <= self.capacity or others <= 0:
                        return self._new(nbytes)
                    if registered is None:
                        registered = (self.watch.waiting(
                            f"{nbytes / 2**20:.1f} MiB of staging buffers (pool: "
                            f"{self._out_bytes / 2**20:.1f} MiB out in {self._out} buffers, "
                            f"{held / 2**20:.1f} MiB of them its own, capacity "
                            f"{self.capacity / 2**20:.1f} MiB)")
                            if self.watch is not None else nullcontext())
                        registered.__enter__()
                    self._cond.wait(timeout=0.1)
            finally:
                if registered is not None:
                    registered.__exit__(None, None, None)

    def release(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._out -= 1
            self._out_bytes -= buf.numel()
            if not self._closed:
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
