"""Graceful degradation when an accelerator runs out of memory during a V1 extraction.

A layer whose load or SVD raises ``torch.OutOfMemoryError`` on a non-CPU device is redone on
the CPU instead of failing the whole run: slower, but it completes, and the report says which
layers took the detour. After a few such layers the rest of the run goes straight to the CPU,
because each failed attempt costs an allocation failure and a cache flush. On the CPU itself
nothing is caught: running out of host memory is not something a retry can fix.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")

# torch >= 2.5 has torch.OutOfMemoryError; older versions only the CUDA alias of it.
OOM_ERRORS: tuple[type[BaseException], ...] = (
    getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError),)

# After this many layers fell back, the remaining layers start on the CPU.
LAYERS_BEFORE_SWITCH = 3


def release_accelerator_cache(device: str) -> None:
    """Give cached blocks back to the driver so the CPU retry (and other apps) have room."""
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        torch.cuda.empty_cache()
    elif dev.type == "mps" and hasattr(torch, "mps") and torch.backends.mps.is_available():
        torch.mps.empty_cache()


class OomFallback:
    """Runs per-layer work on ``device``; on accelerator OOM, frees the cache and uses the CPU.

    Safe to use from the prefetch thread and the main thread at the same time.
    """

    def __init__(self, device: str, switch_after: int = LAYERS_BEFORE_SWITCH) -> None:
        self.requested = str(device)
        self.on_accelerator = torch.device(device).type != "cpu"
        self.switch_after = switch_after
        self._lock = threading.Lock()
        self._fell_back: list[str] = []     # keys whose first attempt ran out of memory
        self._cpu_keys: set[str] = set()    # keys that ran on the CPU for either reason
        self._switched_at: int | None = None

    @property
    def device(self) -> str:
        """The device new work should start on."""
        return "cpu" if not self.on_accelerator or self._switched_at is not None else self.requested

    def ran_on_cpu(self, key: str) -> bool:
        with self._lock:
            return key in self._cpu_keys

    def first_device(self, key: str, device: str | None = None) -> str:
        """The device ``key``'s work starts on (``device``, or where new work starts); a start
        on the CPU during an accelerator run is noted for the report."""
        device = device or self.device
        if torch.device(device).type == "cpu":
            if self.on_accelerator:
                with self._lock:
                    self._cpu_keys.add(key)
            return "cpu"
        return device

    def after_oom(self, key: str, device: str) -> str:
        """Note that ``key`` ran out of memory on ``device``, free its cache; the retry's device.

        Call it after leaving the ``except`` block, so the failed attempt's tensors are freed.
        """
        self._record(key)
        release_accelerator_cache(device)
        return "cpu"

    def call(self, key: str, work: Callable[[str], T], device: str | None = None) -> T:
        """``work(device)``; on accelerator OOM, ``work("cpu")`` after freeing the cache."""
        device = self.first_device(key, device)
        if device == "cpu":
            return work("cpu")
        try:
            return work(device)
        except OOM_ERRORS:
            pass  # retried below, outside the handler, so the failed attempt's tensors are freed
        return work(self.after_oom(key, device))

    def _record(self, key: str) -> None:
        with self._lock:
            if key not in self._fell_back:
                self._fell_back.append(key)
            self._cpu_keys.add(key)
            if self._switched_at is None and len(self._fell_back) >= self.switch_after:
                self._switched_at = len(self._fell_back)
        log.warning("out of memory on %s at %s; extracting this layer on the CPU",
                    self.requested, key)

    def notes(self) -> list[str]:
        """Report notes: which layers ran on the CPU and why; empty when none did."""
        with self._lock:
            fell_back = list(self._fell_back)
            switched = self._switched_at is not None
            cpu_only = len(self._cpu_keys) - len(fell_back)
        if not fell_back:
            return []
        shown = ", ".join(repr(k) for k in fell_back[:5]) + (" ..." if len(fell_back) > 5 else "")
        out = [f"out of memory on {self.requested}: {len(fell_back)} layer(s) were extracted on "
               f"the CPU instead ({shown}); the file is complete."]
        if switched:
            out.append(f"after {self.switch_after} out-of-memory layers the remaining {cpu_only} "
                       "layer(s) ran on the CPU; free accelerator memory or use a smaller model "
                       "to keep them on the accelerator.")
        return out
