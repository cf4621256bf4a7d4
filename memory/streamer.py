"""The V2 mechanics: move (base, tuned) pairs to the compute device as differences, in batches.

A background reader (``Prefetcher``) reads and stages up to ``prefetch_ahead`` batches ahead of
the batch in compute, so disk reads, host work, transfers and the SVD overlap.

- CPU: both weights are read in their stored dtype and the float32 difference is built in a
  reused pool buffer (no page faults from a fresh allocation per layer).
- CUDA: both weights are copied into pinned pool buffers and sent to the device with
  non-blocking copies on a side stream; the difference is formed there, on the device.
- Resident keys: the difference is also kept in the ``ResidentCache``; a later run takes it from
  there and reads nothing.

Which keys are resident and how big batches are is decided elsewhere (``planner.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..extract.errors import ExtractionInputError
from ..extract.oom_fallback import OOM_ERRORS, release_accelerator_cache
from ..extract.pairing import KeyPair, load_difference
from ..extract.sources import SafetensorsSource, StateDictSource, WeightSource
from .buffers import StagingPool, view_as
from .cache import ResidentCache
from .prefetch import Prefetcher

log = logging.getLogger(__name__)

# Sources whose weights are host memory or file data: staged through pinned buffers on CUDA.
_HOST_SOURCES = (SafetensorsSource, StateDictSource)


@dataclass
class LoadedLayer:
    pair: KeyPair
    diff: torch.Tensor          # float32, on ``device`` (or the CPU after an out-of-memory)
    fro: float
    from_cache: bool = False
    on_cpu_after_oom: bool = False
    _buffer: torch.Tensor | None = None
    _pool: StagingPool | None = None

    @property
    def host_buffer(self) -> torch.Tensor | None:
        """The reused pool buffer ``diff`` lives in, if any (valid until ``release``)."""
        return self._buffer

    def release(self) -> None:
        """Give the layer's host buffer back; the difference must not be used afterwards."""
        if self._buffer is not None and self._pool is not None:
            self._pool.release(self._buffer)
        self._buffer = None
        self.diff = torch.empty(0)


@dataclass
class LoadedBatch:
    layers: list[LoadedLayer] = field(default_factory=list)


class PairStreamer:
    """Iterate batches of loaded differences; see the module docstring."""

    def __init__(self, base: WeightSource, tuned: WeightSource, device: torch.device,
                 pool: StagingPool, prefetch_ahead: int, cache: ResidentCache | None = None,
                 identity: Hashable = None, resident_keys: set[str] | None = None) -> None:
        self.base, self.tuned, self.device = base, tuned, device
        self.pool, self.prefetch_ahead = pool, prefetch_ahead
        self.cache, self.identity = cache, identity
        self.resident_keys = resident_keys or set()
        self.cuda = device.type == "cuda"
        self._side = torch.cuda.Stream(device) if self.cuda else None
        self.oom_keys: list[str] = []
        self.cache_hits = 0
        self.bytes_moved = 0

    def batches(self, batches: Sequence[Sequence[KeyPair]]) -> Iterator[LoadedBatch]:
        prefetcher = Prefetcher(batches, self._load_batch, self.prefetch_ahead)
        try:
            for _pairs, loaded in prefetcher:
                if self.cuda:
                    # The compute stream must not read a difference before the side stream has
                    # finished writing it. (The reader already waited on the host for its pinned
                    # buffers; this wait is free then, and keeps the order explicit.)
                    torch.cuda.current_stream(self.device).wait_stream(self._side)
                yield loaded
        finally:
            # Wake a reader blocked on the pool before joining it, or close() would wait forever.
            self.pool.close()
            prefetcher.close()

    # --- reader thread -------------------------------------------------------------------

    def _load_batch(self, pairs: Sequence[KeyPair]) -> LoadedBatch:
        return LoadedBatch([self._load(p) for p in pairs])

    def _load(self, pair: KeyPair) -> LoadedLayer:
        if self.cache is not None and pair.tuned_key in self.resident_keys:
            hit = self.cache.take(self.identity, pair.tuned_key)
            if hit is not None:
                self.cache_hits += 1
                return LoadedLayer(pair, hit.diff, hit.fro, from_cache=True)
        if self.cuda:
            try:
                layer = self._load_cuda(pair)
            except OOM_ERRORS:
                # No room for this layer's difference: it is extracted on the CPU instead.
                release_accelerator_cache(str(self.device))
                self.oom_keys.append(pair.tuned_key)
                diff, fro = load_difference(self.base, self.tuned, pair.tuned_key, pair.base_key, "cpu")
                return LoadedLayer(pair, diff, fro, on_cpu_after_oom=True)
        else:
            layer = self._load_host(pair)
        if self.cache is not None and pair.tuned_key in self.resident_keys:
            self.cache.put(self.identity, pair.tuned_key, layer.diff, layer.fro)
        return layer

    def _check_finite(self, pair: KeyPair, fro: float) -> None:
        if fro != fro or fro == float("inf"):
            # The per-layer loader finds which model holds the NaN/Inf and says so.
            load_difference(self.base, self.tuned, pair.tuned_key, pair.base_key, "cpu")
            raise ExtractionInputError(
                f"key {pair.tuned_key!r}: the difference is not finite; the models are not a "
                "base/fine-tune pair.")

    def _load_host(self, pair: KeyPair) -> LoadedLayer:
        tuned = self.tuned.get(pair.tuned_key, "cpu")
        base = self.base.get(pair.base_key, "cpu")
        buf = self.pool.acquire(tuned.numel() * 4)
        diff = view_as(buf, torch.float32, tuple(tuned.shape))
        diff.copy_(tuned)       # exact upcast, as tuned.float() would give
        del tuned
        diff.sub_(_subtrahend(base))
        del base
        fro = float(torch.linalg.vector_norm(diff))
        self._check_finite(pair, fro)
        self.bytes_moved += diff.numel() * 4
        return LoadedLayer(pair, diff, fro, _buffer=buf, _pool=self.pool)

    def _load_cuda(self, pair: KeyPair) -> LoadedLayer:
        assert self._side is not None
        staged: list[torch.Tensor] = []
        if not isinstance(self.tuned, _HOST_SOURCES) or not isinstance(self.base, _HOST_SOURCES):
            # A ComfyUI MODEL computes its patched weight wherever it is asked to (its weights
            # may already be on the GPU): ask for the device, as V1 does, on the side stream.
            with torch.cuda.stream(self._side):
                diff = self.tuned.get(pair.tuned_key, self.device, torch.float32)
                diff.sub_(_subtrahend(self.base.get(pair.base_key, self.device)))
                fro_t = torch.linalg.vector_norm(diff)
            moved = diff.numel() * 4
        else:
            diff, fro_t, moved = self._stage_and_copy(pair, staged)
        done = torch.cuda.Event()
        done.record(self._side)
        # Host wait (reader thread only): the pinned buffers may be reused only once the copies
        # that read them have finished, and the rank rules need the norm as a number.
        done.synchronize()
        for buf in staged:
            self.pool.release(buf)
        # ``diff`` was allocated on the side stream and is used on the compute stream: tell the
        # caching allocator, or it could hand the memory to the side stream while still in use.
        diff.record_stream(torch.cuda.current_stream(self.device))
        fro = float(fro_t)
        self._check_finite(pair, fro)
        self.bytes_moved += moved
        return LoadedLayer(pair, diff, fro)

    def _stage_and_copy(self, pair: KeyPair, staged: list[torch.Tensor]
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """File data: pinned staging, non-blocking copies and the difference, on the side stream."""
        tuned = self.tuned.get(pair.tuned_key, "cpu")
        base = self.base.get(pair.base_key, "cpu")
        on_device: list[torch.Tensor] = []
        assert self._side is not None
        with torch.cuda.stream(self._side):
            for t in (tuned, base):
                buf = self.pool.acquire(t.numel() * t.element_size())
                pinned = view_as(buf, t.dtype, tuple(t.shape))
                pinned.copy_(t)
                staged.append(buf)
                # non_blocking from pinned memory: the copy runs on the side stream while the
                # compute stream keeps working on the previous batch.
                on_device.append(pinned.to(self.device, non_blocking=True))
            diff = on_device[0].float()
            diff.sub_(_subtrahend(on_device[1]))
            del on_device
            fro_t = torch.linalg.vector_norm(diff)
        return diff, fro_t, tuned.numel() * tuned.element_size() + base.numel() * base.element_size()


def _subtrahend(b: torch.Tensor) -> torch.Tensor:
    # As pairing.load_difference: fp32/fp16/bf16 are upcast element-wise by the in-place
    # subtraction; anything else (fp8, fp64, ints) is converted to float32 first.
    return b if b.dtype in (torch.float32, torch.float16, torch.bfloat16) else b.float()


def pair_bytes(shape: Sequence[int]) -> int:
    """Bytes of one layer's float32 difference."""
    n = 1
    for s in shape:
        n *= s
    return n * 4

