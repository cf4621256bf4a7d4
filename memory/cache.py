"""Differences kept on the device between extractions of the same inputs in one process.

Several extractions from the same two models (several ranks, several rank rules) then move
the resident blocks once: later runs take the float32 difference from here instead of reading
and transferring both weights again. Entries are keyed by the identity of both sources and the
key; entries of other inputs are dropped when a run starts, so VRAM is never held for models
no longer in use.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Hashable
from dataclasses import dataclass

import torch

from ..extract.sources import SafetensorsSource, WeightSource


def source_identity(source: WeightSource) -> Hashable:
    """What makes two runs read the same weights: the file (path, size, mtime), or the object.

    A ComfyUI model counts as the same while it is the same patcher with the same patches
    (ComfyUI clones a patcher to change it, and bumps ``patches_uuid`` when patches change).
    """
    parts = getattr(source, "identity_parts", None)
    if callable(parts):  # a view or a combination of sources (text encoders): its parts decide
        return ("parts", *(source_identity(p) for p in parts()))
    if isinstance(source, SafetensorsSource):
        st = os.stat(source.path)
        return ("file", os.path.realpath(source.path), st.st_size, st.st_mtime_ns)
    obj = getattr(source, "patcher", source)
    return ("object", id(obj), str(getattr(obj, "patches_uuid", "")))


@dataclass
class CachedDifference:
    diff: torch.Tensor   # float32, on the device it will be used on
    fro: float


class ResidentCache:
    """Thread-safe map (inputs identity, key) -> difference on the device."""

    def __init__(self) -> None:
        self._entries: dict[tuple[Hashable, str], CachedDifference] = {}
        self._lock = threading.Lock()

    def take(self, identity: Hashable, key: str) -> CachedDifference | None:
        """A private copy of the cached difference (extraction consumes its input)."""
        with self._lock:
            hit = self._entries.get((identity, key))
        if hit is None:
            return None
        return CachedDifference(hit.diff.clone(), hit.fro)

    def put(self, identity: Hashable, key: str, diff: torch.Tensor, fro: float) -> None:
        with self._lock:
            self._entries[(identity, key)] = CachedDifference(diff.clone(), fro)

    def keep_only(self, identity: Hashable) -> int:
        """Drop entries of other inputs; returns the bytes freed."""
        with self._lock:
            stale = [k for k in self._entries if k[0] != identity]
            freed = sum(self._nbytes(self._entries.pop(k)) for k in stale)
        return freed

    def clear(self) -> int:
        """Offload everything (threshold passed, out of memory); returns the bytes freed."""
        with self._lock:
            freed = sum(self._nbytes(e) for e in self._entries.values())
            self._entries.clear()
        return freed

    def keys_for(self, identity: Hashable) -> set[str]:
        with self._lock:
            return {k for ident, k in self._entries if ident == identity}

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(self._nbytes(e) for e in self._entries.values())

    @staticmethod
    def _nbytes(e: CachedDifference) -> int:
        return e.diff.numel() * e.diff.element_size()


# One per process: what survives between node executions.
RESIDENT = ResidentCache()
