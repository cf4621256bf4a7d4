"""The V2 mechanics: move (base, tuned) pairs to the compute device as differences, in batches.

A background reader (``Prefetcher``) reads and stages up to ``prefetch_ahead`` batches ahead of
the batch in compute, so disk reads, host work, transfers and the SVD overlap.

- CPU: the float32 difference is formed in a reused pool buffer, chunk by chunk
  (``extract/difference.py``); from files, each chunk of both weights is read (``os.preadv``)
  into two small reused buffers just before it is used: no page faults from fresh allocations
  per layer, no host copy of a whole raw weight, and the reader leaves the cores to the SVDs.
- CUDA: both weights are read (files) or copied into pinned pool buffers and sent to the device with
  non-blocking copies on a side stream; the difference is formed there, on the device. Every
  stream and event call goes through ``streams.DeviceStreams`` (its docstring gives the order
  and why), so that order is tested without a GPU.
- Resident keys: the difference is also kept in the ``ResidentCache``; a later run takes it from
  there and reads nothing.

- Staging buffers: the reader tells the pool how many bytes its batch in progress holds, and
  the pool never makes it wait for those (``buffers.py`` states the no-deadlock invariant);
  a failed layer or batch gives its buffers back before the error travels on, and batches
  read ahead but never taken are released when the run ends.

Which keys are resident and how big batches are is decided elsewhere (``planner.py``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from ..extract.difference import difference_into
from ..extract.errors import ExtractionInputError
from ..extract.file_difference import ChunkBuffers, host_difference
from ..extract.norms import frobenius_norm_tensor
from ..extract.oom_fallback import OOM_ERRORS, release_accelerator_cache
from ..extract.pairing import KeyPair, load_difference
from ..extract.prefetch import Prefetcher
from ..extract.sources import StateDictSource, WeightSource, has_raw_reads
from ..extract.waits import RunWatch
from .buffers import StagingPool, view_as
from .cache import ResidentCache
from .streams import DeviceStreams, streams_for

log = logging.getLogger(__name__)



def _is_host_source(source: WeightSource) -> bool:
    """Weights in host memory or files (staged through pinned buffers on CUDA); readers of
    other file formats say so with ``host_weights = True``."""
    return has_raw_reads(source) or isinstance(source, StateDictSource) or \
        bool(getattr(source, "host_weights", False))


@dataclass
class LoadedLayer:
    pair: KeyPair
    diff: torch.Tensor          # float32, on ``device`` (or the CPU after an out-of-memory)
    fro: float
    from_cache: bool = False
    on_cpu_after_oom: bool = False
    ready: object = None        # the side-stream event after which ``diff`` is complete
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
                 identity: Hashable = None, resident_keys: set[str] | None = None,
                 streams: DeviceStreams | None = None) -> None:
        self.base, self.tuned, self.device = base, tuned, device
        self.pool, self.prefetch_ahead = pool, prefetch_ahead
        self.cache, self.identity = cache, identity
        self.resident_keys = resident_keys or set()
        # Made here, on the caller's (compute) thread: see CudaStreams.__init__.
        self.streams = streams if streams is not None else streams_for(device)
        # Reader-thread scratch, reused for every layer: a chunk of raw bytes of each weight,
        # and a cache-sized float32 chunk for forming the difference.
        self._chunks: ChunkBuffers | None = None
        self._prefetcher: Prefetcher[Sequence[KeyPair], LoadedBatch] | None = None
        self.oom_keys: list[str] = []
        # Reader thread: bytes of staging buffers its batch in progress holds (the pool never
        # makes the reader wait for those: see buffers.py).
        self._held = 0
        self.cache_hits = 0
        self.bytes_moved = 0

    def has_ready_batch(self) -> bool:
        """Whether the next batch (or the end) is loaded, so taking it does not wait."""
        return self._prefetcher is not None and self._prefetcher.ready()

    def batches(self, batches: Sequence[Sequence[KeyPair]],
                watch: RunWatch | None = None) -> Iterator[LoadedBatch]:
        """Loaded batches in order. A batch taken from here is the caller's: it releases every
        layer (``LoadedLayer.release``) on every path; batches never taken are released here."""
        prefetcher = self._prefetcher = Prefetcher(
            batches, self._load_batch, self.prefetch_ahead, watch=watch, discard=release_batch,
            what="the next batch from the reader", cpu_compute=self.device.type == "cpu")
        self.pool.watch = prefetcher.watch
        try:
            for _pairs, loaded in prefetcher:
                if self.streams is not None:
                    for layer in loaded.layers:
                        if layer.ready is not None:
                            # The compute stream must not read a difference before the side
                            # stream has written it. The reader already waited for this event
                            # on the host, so the wait costs nothing; it keeps the order explicit.
                            self.streams.compute_waits(layer.ready)
                yield loaded
        finally:
            # Wake a reader blocked on the pool before joining it, or close() would wait forever.
            self.pool.close()
            prefetcher.close()
            self._prefetcher = None
            self._chunks = None

    # --- reader thread -------------------------------------------------------------------

    def _load_batch(self, pairs: Sequence[KeyPair]) -> LoadedBatch:
        """Every layer of a batch; on an error the layers loaded so far are released."""
        batch = LoadedBatch()
        self._held = 0
        try:
            for p in pairs:
                layer = self._load(p)
                batch.layers.append(layer)
                if layer.host_buffer is not None:
                    self._held += layer.host_buffer.numel()
        except BaseException:
            release_batch(batch)
            raise
        finally:
            self._held = 0
        return batch

    def _load(self, pair: KeyPair) -> LoadedLayer:
        resident = self.cache is not None and pair.tuned_key in self.resident_keys
        if self.streams is not None:
            try:
                return self._load_async(pair, self.streams, resident)
            except OOM_ERRORS:
                # No room for this layer's difference: it is extracted on the CPU instead.
                release_accelerator_cache(str(self.device))
                self.oom_keys.append(pair.tuned_key)
                diff, fro = load_difference(self.base, self.tuned, pair.tuned_key, pair.base_key, "cpu")
                return LoadedLayer(pair, diff, fro, on_cpu_after_oom=True)
        hit = self.cache.take(self.identity, pair.tuned_key) if resident and self.cache else None
        if hit is not None:
            self.cache_hits += 1
            return LoadedLayer(pair, hit.diff, hit.fro, from_cache=True)
        layer = self._load_host(pair)
        if resident and self.cache is not None:
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
        buf = self.pool.acquire(pair_bytes(pair.shape), held=self._held)
        try:
            return self._fill_host(pair, buf)
        except BaseException:
            self.pool.release(buf)
            raise

    def _fill_host(self, pair: KeyPair, buf: torch.Tensor) -> LoadedLayer:
        diff = view_as(buf, torch.float32, tuple(pair.shape))
        if self._chunks is None:
            self._chunks = ChunkBuffers()
        fro = math.sqrt(host_difference(self.tuned, pair.tuned_key, self.base, pair.base_key,
                                        diff, self._chunks))
        self._check_finite(pair, fro)
        self.bytes_moved += diff.numel() * 4
        return LoadedLayer(pair, diff, fro, _buffer=buf, _pool=self.pool)

    def _load_async(self, pair: KeyPair, streams: DeviceStreams, resident: bool) -> LoadedLayer:
        """The difference on the device, through the side stream (the cache's copies too, so
        that every tensor handed to the compute stream follows the one protocol)."""
        staged: list[torch.Tensor] = []
        hit = None
        try:
            if resident and self.cache is not None:
                with streams.on_side():
                    hit = self.cache.take(self.identity, pair.tuned_key)
            if hit is not None:
                diff, fro_t, moved = hit.diff, torch.tensor(hit.fro, dtype=torch.float64), 0
            elif _is_host_source(self.tuned) and _is_host_source(self.base):
                diff, fro_t, moved = self._stage_and_copy(pair, staged, streams)
            else:
                # A ComfyUI MODEL computes its patched weight wherever it is asked to (its
                # weights may already be on the GPU): ask for the device, as V1 does.
                with streams.on_side():
                    diff = self.tuned.get(pair.tuned_key, self.device, torch.float32)
                    difference_into(diff, None, self.base.get(pair.base_key, self.device))
                    fro_t = frobenius_norm_tensor(diff)
                moved = diff.numel() * 4
            ready = streams.mark()
            # Host wait (reader thread only): the pinned buffers may be reused only once the
            # copies that read them have finished, and the rank rules need the norm as a number.
            streams.wait_host(ready)
        finally:
            # Also on an error, or the pool would shrink for the rest of the run. Reuse before
            # ``wait_host`` is harmless then: a copy still reading a buffer writes into a device
            # tensor that was dropped with the failed layer.
            for buf in staged:
                self.pool.release(buf)
        fro = float(fro_t)
        self._check_finite(pair, fro)
        if hit is None and resident and self.cache is not None:
            # On the side stream too: the copy is ordered after the difference was formed, and
            # the cached tensor is only ever read there (by later ``take``s).
            with streams.on_side():
                self.cache.put(self.identity, pair.tuned_key, diff, fro)
        streams.keep_for_compute(diff)
        if hit is not None:
            self.cache_hits += 1
        self.bytes_moved += moved
        return LoadedLayer(pair, diff, fro, from_cache=hit is not None, ready=ready)

    def _stage(self, source: WeightSource, key: str, staged: list[torch.Tensor]) -> torch.Tensor:
        """``key`` in a pinned pool buffer, in its stored dtype (files: read straight into it)."""
        # ``held``: the other weight of this layer, already staged (and the batch's own
        # buffers, none on this path): never waited for.
        held = self._held + sum(b.numel() for b in staged)
        if has_raw_reads(source):
            buf = self.pool.acquire(source.nbytes(key), held=held)  # type: ignore[attr-defined]
            staged.append(buf)
            return source.read_into(key, buf)
        t = source.get(key, "cpu")
        buf = self.pool.acquire(t.numel() * t.element_size(), held=held)
        staged.append(buf)
        pinned = view_as(buf, t.dtype, tuple(t.shape))
        pinned.copy_(t)
        return pinned

    def _stage_and_copy(self, pair: KeyPair, staged: list[torch.Tensor], streams: DeviceStreams
                        ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Host data: pinned staging, non-blocking copies and the difference, on the side stream."""
        on_device: list[torch.Tensor] = []
        moved = 0
        with streams.on_side():
            for source, key in ((self.tuned, pair.tuned_key), (self.base, pair.base_key)):
                pinned = self._stage(source, key, staged)
                moved += pinned.numel() * pinned.element_size()
                on_device.append(streams.to_device(pinned))
            diff = on_device[0].float()
            difference_into(diff, None, on_device[1])
            del on_device
            fro_t = frobenius_norm_tensor(diff)
        return diff, fro_t, moved


def release_batch(batch: LoadedBatch) -> None:
    """Give back every host buffer of ``batch`` (idempotent per layer)."""
    for layer in batch.layers:
        layer.release()


def pair_bytes(shape: Sequence[int]) -> int:
    """Bytes of one layer's float32 difference."""
    n = 1
    for s in shape:
        n *= s
    return n * 4

