"""One streamed run's decomposition of a batch: batched SVDs on an accelerator, layer workers
on a CPU, DoRA and size-budgeted layers one by one; out of memory or over the VRAM threshold,
the batch is halved and the resident blocks offloaded (down to one layer on the CPU)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import torch

from ..extract import batched
from ..extract.config import ExtractConfig
from ..extract.layer import LayerExtraction, extract_matrix
from ..extract.layer_config import layer_config
from ..extract.oom_fallback import OOM_ERRORS, release_accelerator_cache
from ..extract.pair_output import extract_layer, layer_generator
from ..extract.pairing import KeyPair
from ..extract.waits import RunWatch
from .cache import ResidentCache
from .monitor import VramMonitor, format_reading
from .planner import MemoryOptions, shrink_batch
from .run_report import BatchRecord, MemoryRunReport
from .streamer import LoadedLayer, PairStreamer

log = logging.getLogger(__name__)


def _batched_by_config(chunk: list[LoadedLayer], gens: list[torch.Generator],
                       cfg: ExtractConfig) -> list[LayerExtraction]:
    """Batched SVDs, one call per layer config (text encoders may have their own rank)."""
    out: list[LayerExtraction | None] = [None] * len(chunk)
    groups: dict[ExtractConfig, list[int]] = {}
    for i, layer in enumerate(chunk):
        groups.setdefault(layer_config(cfg, layer.pair.path), []).append(i)
    for c, idx in groups.items():
        res = batched.extract_matrices([chunk[i].diff for i in idx], c,
                                       [chunk[i].fro for i in idx], [gens[i] for i in idx])
        for i, r in zip(idx, res, strict=True):
            out[i] = r
    return [r for r in out if r is not None]


class BatchDecomposer:
    """The decomposition state of one streamed run: the batch limit, halved on OOM or threshold."""

    def __init__(self, cfg: ExtractConfig, opts: MemoryOptions, mem: MemoryRunReport,
                 cache: ResidentCache, use_batched: bool,
                 workers: ThreadPoolExecutor | None = None,
                 finish: Callable[[LoadedLayer], LayerExtraction] | None = None,
                 watch: RunWatch | None = None,
                 base_weight: Callable[[KeyPair, torch.device], torch.Tensor] | None = None) -> None:
        self.cfg, self.opts, self.mem, self.cache = cfg, opts, mem, cache
        self.watch = watch if watch is not None else RunWatch()
        # DoRA output reads each layer's base weight again (the streamer delivers differences).
        self.base_weight = base_weight
        # A size-budgeted run: the factors were decomposed in pass 1; only finish them.
        self.finish = finish
        self.use_batched = use_batched
        self.workers = workers                 # CPU: the layers of a batch run side by side
        self.limit = mem.plan.batch_size       # layers per SVD call; halved on OOM / threshold

    def extract(self, layers: list[LoadedLayer]) -> list[LayerExtraction]:
        """Factors of ``layers``; on out-of-memory: halve the batch and retry, then use the CPU."""
        out: list[LayerExtraction] = []
        i = 0
        while i < len(layers):
            chunk = layers[i:i + self.limit]
            try:
                out.extend(self._decompose(chunk))
                i += len(chunk)
                continue
            except OOM_ERRORS:
                pass  # handled below, outside the handler, so the failed attempt's memory is freed
            self._out_of_memory(chunk)
            if len(chunk) == 1:
                # The differences are consumed only by the final residual step, after every
                # large allocation, so the failed attempt left this one intact.
                layer = chunk[0]
                layer.diff = layer.diff.cpu()
                out.append(self.one(layer))
                self.mem.oom_events.append(
                    f"out of memory at {layer.pair.tuned_key!r} alone: extracted on the CPU.")
                i += 1
        return out

    def one(self, layer: LoadedLayer) -> LayerExtraction:
        """One layer's factors on the device its difference is on."""
        if self.finish is not None:
            return self.finish(layer)
        if self.cfg.dora != "off":
            bw = self.base_weight
            return extract_layer(layer.pair, layer.diff, layer.fro, self.cfg,
                                 None if bw is None else (lambda dev: bw(layer.pair, dev)))
        return extract_matrix(layer.diff, layer_config(self.cfg, layer.pair.path), fro=layer.fro,
                              generator=layer_generator(self.cfg, layer.pair.path))

    def _decompose(self, chunk: list[LoadedLayer]) -> list[LayerExtraction]:
        if self.finish is not None or self.cfg.dora != "off":
            # DoRA: one layer at a time (with its base weight), never the batched plain SVD.
            if self.workers is not None and len(chunk) > 1:
                return list(self.workers.map(self.one, chunk))
            return [self.one(layer) for layer in chunk]
        gens = [layer_generator(self.cfg, layer.pair.path) for layer in chunk]
        if self.workers is not None and len(chunk) > 1:
            futures = [self.workers.submit(
                extract_matrix, layer.diff, layer_config(self.cfg, layer.pair.path),
                fro=layer.fro, generator=g) for layer, g in zip(chunk, gens, strict=True)]
            try:
                return [self.watch.result(f, f"a worker to decompose {layer.pair.tuned_key!r}")
                        for f, layer in zip(futures, chunk, strict=True)]
            finally:
                for f in futures:
                    f.cancel()
        if len(chunk) == 1 or not self.use_batched:
            return [extract_matrix(layer.diff, layer_config(self.cfg, layer.pair.path),
                                   fro=layer.fro, generator=g)
                    for layer, g in zip(chunk, gens, strict=True)]
        return _batched_by_config(chunk, gens, self.cfg)

    def _out_of_memory(self, chunk: list[LoadedLayer]) -> None:
        freed = self.cache.clear()
        release_accelerator_cache(self.cfg.device)
        old = self.limit
        self.limit = shrink_batch(self.limit)
        if old != self.limit:
            self.mem.oom_events.append(
                f"out of memory on a batch of {len(chunk)} at {chunk[0].pair.tuned_key!r}: "
                f"batch {old} -> {self.limit}, {freed / 2**20:.0f} MiB of resident blocks offloaded.")
        log.warning("out of memory on %s; batch now %d", self.cfg.device, self.limit)

    def after_batch(self, monitor: VramMonitor, streamer: PairStreamer, n: int, seconds: float) -> None:
        reading = monitor.read()
        self.mem.batches.append(BatchRecord(n, seconds, reading))
        if self.opts.debug:
            log.info("batch of %d layers in %.2fs, VRAM %s", n, seconds, format_reading(reading))
        if monitor.over(reading):
            freed = self.cache.clear()
            streamer.resident_keys = set()     # keep nothing more this run
            release_accelerator_cache(self.cfg.device)
            old, self.limit = self.limit, shrink_batch(self.limit)
            msg = (f"VRAM threshold exceeded ({format_reading(reading)} > "
                   f"{100 * monitor.threshold:.1f}%): offloaded {freed / 2**20:.0f} MiB of resident "
                   f"blocks, batch {old} -> {self.limit}")
            self.mem.threshold_events.append(msg)
            log.debug(msg)
