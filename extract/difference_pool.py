"""Reused CPU buffers for the large per-layer tensors of a layer loop.

A fresh large tensor is memory the kernel has to fault in page by page on its first write:
~45-60 ms per 150 MB on the CPU, 0.5 s of a 356M-parameter extraction, more than forming the
difference itself. The layer loop gives each difference back once its layer is done (its
factors are new tensors), and the next difference is formed in the same memory; the power
iterations' bfloat16 copy of a layer is taken from the pool the same way (``scratch``, set by
the loop for the layers it runs with ``using``). At most ``keep`` free buffers are held, so
the pool holds no more than the loop had in flight anyway, and it is dropped with the run.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Iterator

import torch

_CURRENT: contextvars.ContextVar[DifferencePool | None] = contextvars.ContextVar(
    "lora_extract_buffer_pool", default=None)


class DifferencePool:
    """CPU tensors of any shape and dtype, formed in recycled storage. Thread-safe: the reader
    takes, the layer loop gives back."""

    def __init__(self, keep: int) -> None:
        self._keep = max(1, keep)
        self._free: list[torch.Tensor] = []     # flat storages (uint8 views), no one using them
        self._lock = threading.Lock()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A CPU tensor of ``shape`` and ``dtype`` (contents undefined): the smallest free
        storage that fits, or a new one."""
        n = 1
        for d in shape:
            n *= d
        nbytes = n * dtype.itemsize
        with self._lock:
            fits = [i for i, b in enumerate(self._free) if b.numel() >= nbytes]
            if fits:
                best = self._free.pop(min(fits, key=lambda i: self._free[i].numel()))
                return best[:nbytes].view(dtype).view(shape)
        return torch.empty(shape, dtype=dtype)

    def give_back(self, t: torch.Tensor) -> None:
        """Return a tensor from ``take`` (or any contiguous CPU tensor nobody else reads any
        more): its storage serves a later ``take``. Past ``keep`` free storages the smallest
        is dropped."""
        if t.device.type != "cpu" or not t.is_contiguous():
            return
        flat = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage())
        with self._lock:
            if any(b.data_ptr() == flat.data_ptr() for b in self._free):
                return
            self._free.append(flat)
            if len(self._free) > self._keep:
                self._free.pop(min(range(len(self._free)), key=lambda i: self._free[i].numel()))

    @contextlib.contextmanager
    def using(self) -> Iterator[None]:
        """``scratch`` takes from this pool inside the block (this thread and context only)."""
        token = _CURRENT.set(self)
        try:
            yield
        finally:
            _CURRENT.reset(token)


@contextlib.contextmanager
def scratch(like: torch.Tensor, dtype: torch.dtype) -> Iterator[torch.Tensor]:
    """An empty tensor of ``like``'s shape in ``dtype`` on its device, for the block's
    duration: from the pool set by ``DifferencePool.using`` on the CPU, else a new one."""
    pool = _CURRENT.get()
    if pool is None or like.device.type != "cpu":
        yield torch.empty(like.shape, dtype=dtype, device=like.device)
        return
    t = pool.take(tuple(like.shape), dtype)
    try:
        yield t
    finally:
        pool.give_back(t)
