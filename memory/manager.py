"""The V2 extraction: the planner's policy carried out by the streamer, with the same results as V1.

Layers are processed in model order (the output file has V1's keys in V1's order); what differs
is how they get to the device (batches read ahead, resident blocks kept between runs) and how
they are decomposed (same-shaped matrices of a batch in one batched SVD on an accelerator).

No deadlock and no untimed wait. The staging pool never makes the reader wait for its own
batch, and every other holder of staging buffers gives them back without waiting for the reader
(``buffers.py``): the rolling consumer stores what it holds before it waits for a batch
(``rolling.py``), and the batch-barrier consumer here stores and releases a whole batch, on
every path, before it asks for the next. Every wait of the main thread (the next batch, a
worker's factors) is sliced through one ``RunWatch`` per run (``extract/waits.py``), so Cancel,
Ctrl-C and the stall bound always reach it; the layer workers are shut down without waiting
after an error, so a stuck worker cannot freeze the caller either.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from dataclasses import dataclass

import torch

from ..extract import batched
from ..extract.budget.passes import BudgetPass
from ..extract.callbacks import InterruptFn, ProgressFn
from ..extract.config import ExtractConfig
from ..extract.layer import LayerExtraction, extract_matrix
from ..extract.layer_config import layer_config
from ..extract.new_tensors import store_new_tensors
from ..extract.oom_fallback import OOM_ERRORS, OomFallback, release_accelerator_cache
from ..extract.pair_output import extract_layer, layer_generator, needs_svd
from ..extract.pairing import KeyPair, PairPlan
from ..extract.report import ExtractionReport
from ..extract.result import ExtractionResult, finish_result
from ..extract.run_setup import set_up_run
from ..extract.sources import WeightSource
from ..extract.waits import RunWatch, join_for
from ..extract.writer import save_safetensors_atomic
from .blocks import block_of, group_by_block
from .buffers import StagingPool
from .cache import RESIDENT, ResidentCache, source_identity
from .layer_store import LayerStore
from .monitor import VramMonitor, VramProbe, format_reading, torch_probe
from .planner import (
    MODES,
    BlockSize,
    MemoryOptions,
    form_batches,
    plan_memory,
    shrink_batch,
)
from .rolling import stream_rolling
from .run_report import BatchRecord, MemoryRunReport
from .streamer import LoadedLayer, PairStreamer, pair_bytes, release_batch
from .streams import DeviceStreams

log = logging.getLogger(__name__)

# After an error or cancel: how long a layer worker still running is waited for.
WORKER_STOP_S = 0.4

# free_memory(bytes, device): ask the host application (ComfyUI) to make room on the device.
FreeMemoryFn = Callable[[int, torch.device], None]


@dataclass
class V2Result:
    result: ExtractionResult
    memory: MemoryRunReport


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


class _Run:
    """State of one V2 extraction (kept off the function so each step stays short)."""

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


def cpu_workers(device: torch.device, batch_size: int, batched_svd: bool) -> int:
    """Threads that extract a batch's layers side by side on a CPU (1: one after another).

    On a CPU the batch's layers run in parallel threads with one BLAS thread each, instead of
    one layer at a time on every core: the tall-skinny QRs and small matmuls of an extraction
    scale poorly across threads, and on a busy machine multi-threaded BLAS regions stall
    (measured 5-10x slower than single-threaded ones on a loaded 2-core runner).
    """
    if device.type != "cpu" or batched_svd:
        return 1
    return max(1, min(batch_size, os.cpu_count() or 1))


def init_layer_worker() -> None:
    """Thread-pool initializer, run in each layer worker thread itself.

    One intra-op thread, set here: torch keeps MKL's thread count per thread
    (``mkl_set_num_threads_local``), so the main thread's ``set_num_threads(1)`` does not reach a
    new thread until its first ATen-parallel operation; until then its BLAS/LAPACK calls run on
    every core, and which layer a worker happened to take first decided its bytes (V2 files
    differed from run to run). No autograd: grad mode is per thread too, and the host's
    ``inference_mode`` (ComfyUI) does not reach our threads.
    """
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)


@contextmanager
def _layer_parallel(workers: int) -> Iterator[ThreadPoolExecutor | None]:
    """A thread pool for the layers, with torch limited to one intra-op thread meanwhile."""
    if workers <= 1:
        yield None
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    threads: list[threading.Thread] = []

    def init() -> None:
        threads.append(threading.current_thread())
        init_layer_worker()

    ex = ThreadPoolExecutor(workers, thread_name_prefix="lora-extract-layer", initializer=init)
    try:
        yield ex
    except BaseException:
        # Cancelled or failed: idle workers end at once; one stuck in a layer is waited for at
        # most WORKER_STOP_S, then left to end on its own (the caller must not freeze).
        ex.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + WORKER_STOP_S
        for t in list(threads):
            join_for(t, max(0.0, deadline - time.monotonic()))
        raise
    else:
        ex.shutdown(wait=True)   # every future was consumed: the workers are idle
    finally:
        torch.set_num_threads(before)


def _stream(streamer: PairStreamer, batches: list[list[KeyPair]], run: _Run, cfg: ExtractConfig,
            plan: PairPlan, report: ExtractionReport, progress: ProgressFn | None,
            check_interrupt: InterruptFn | None, monitor: VramMonitor) -> dict[str, torch.Tensor]:
    """Extract every layer the streamer delivers; store them in model order; return the tensors."""
    store = LayerStore(cfg, plan, report, progress, check_interrupt, run.watch)
    # closing(): on an error or interrupt the reader thread is stopped and joined right here,
    # not whenever the traceback that holds this generator is collected.
    with closing(streamer.batches(batches, run.watch)) as loaded_batches:
        if run.workers is not None and streamer.prefetch_ahead > 0:
            # CPU: no batch barrier (see rolling.py). Without read-ahead the main thread is
            # the reader, and must not read while it holds layers: batches then.
            stream_rolling(
                loaded_batches, streamer.has_ready_batch, run.workers, max(run.limit, 1),
                run.one,
                lambda layer: needs_svd(layer.pair, layer.fro, cfg, plan), store,
                lambda n, seconds: run.after_batch(monitor, streamer, n, seconds), check_interrupt,
                run.watch)
        else:
            for loaded in loaded_batches:
                # The whole batch goes back before the next is asked for, on every path.
                try:
                    if check_interrupt is not None:
                        check_interrupt()
                    tb = time.perf_counter()
                    todo = [x for x in loaded.layers if needs_svd(x.pair, x.fro, cfg, plan)]
                    extracted = dict(zip((id(x) for x in todo), run.extract(todo), strict=True))
                    for layer in loaded.layers:
                        store(layer, extracted.get(id(layer)))
                    run.after_batch(monitor, streamer, len(loaded.layers),
                                    time.perf_counter() - tb)
                finally:
                    release_batch(loaded)
    if check_interrupt is not None:
        check_interrupt()
    return store.tensors


def budget_first_pass(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                      plan: PairPlan, progress: ProgressFn | None,
                      check_interrupt: InterruptFn | None) -> BudgetPass | None:
    """A ``target_size_mb`` run's spectra pass and allocation (None without a budget).

    Pass 1 streams layer by layer like V1 (one difference at a time on the device); pass 2,
    which only finishes the kept factors at the allocated ranks, goes through the V2 streamer.
    """
    if not cfg.target_size_mb:
        return None
    return BudgetPass(base, tuned, cfg, plan, lambda path: layer_generator(cfg, path),
                      fallback=OomFallback(cfg.device), progress=progress,
                      check_interrupt=check_interrupt, prefetch=2)


def extract_lora_v2(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                    opts: MemoryOptions, *, progress: ProgressFn | None = None,
                    check_interrupt: InterruptFn | None = None, probe: VramProbe | None = None,
                    free_memory: FreeMemoryFn | None = None, cache: ResidentCache = RESIDENT,
                    batched_svd: bool | None = None,
                    streams: DeviceStreams | None = None) -> V2Result:
    """Extract like ``pipeline.extract_lora`` (same ranks and factors), managing device memory.

    ``probe`` reads (free, total) device memory (default: ``torch.cuda``; None readings mean no
    accelerator). ``free_memory`` asks the host application to make room first. ``batched_svd``
    defaults to on for CUDA only: on a CPU it does not pay (see ``extract/batched.py``).
    ``streams``: the asynchronous-copy mechanics (default: ``CudaStreams`` on a CUDA device,
    none elsewhere); the tests pass a recording fake to check their order on a CPU.
    """
    cfg.validate()
    opts.validate()
    t0 = time.perf_counter()
    device = torch.device(cfg.device)
    monitor = VramMonitor(probe or torch_probe(device), opts.memory_threshold)
    run = set_up_run(base, tuned, cfg)
    cfg, plan, report = run.cfg, run.plan, run.report
    budget = budget_first_pass(base, tuned, cfg, plan, progress, check_interrupt)
    if budget is not None:
        progress = budget.second_pass_progress(progress)
    sizes = [pair_bytes(p.shape) for p in plan.common]
    size_of = dict(zip((p.tuned_key for p in plan.common), sizes, strict=True))
    largest = max(sizes)
    identity = (source_identity(base), source_identity(tuned), str(device))
    stale = cache.keep_only(identity)
    if stale:
        release_accelerator_cache(cfg.device)
    initial = monitor.read()
    sized = [BlockSize(n, sum(size_of[k] for k in keys))
             for n, keys in group_by_block(size_of).items()]
    if free_memory is not None and initial is not None:
        # What the plan would use if the whole device were free; ComfyUI unloads models to make
        # that room (instead of us loading both inputs whole), and the plan keeps what it got.
        wish = plan_memory(sized, largest, initial.total, opts)
        wanted = (wish.working_bytes + wish.resident_bytes) / MODES[opts.mode].budget_fraction
        free_memory(int(min(wanted, initial.total)), device)
    reading = monitor.read()
    mplan = plan_memory(sized, largest, None if reading is None else reading.free + cache.nbytes,
                        opts)
    use_batched = batched_svd if batched_svd is not None else device.type == "cuda"
    mem = MemoryRunReport(options=opts, plan=mplan, device=str(device), initial_vram=initial,
                          batched_svd=use_batched)
    resident = set(mplan.resident)
    resident_keys = {p.tuned_key for p in plan.common if block_of(p.tuned_key) in resident}
    if opts.debug:
        log.info("V2 plan: mode %s, budget %s, %d blocks kept, %d offloaded, batch %d, ahead %d",
                 opts.mode, mplan.budget_bytes, len(mplan.resident), len(mplan.offloaded),
                 mplan.batch_size, mplan.prefetch_ahead)
    batches = [[plan.common[i] for i in b]
               for b in form_batches(sizes, mplan.batch_size, mplan.max_batch_bytes)]
    pool = StagingPool(mplan.staging_bytes, pin=device.type == "cuda")
    streamer = PairStreamer(base, tuned, device, pool, mplan.prefetch_ahead, cache, identity,
                            resident_keys, streams)
    workers = cpu_workers(device, mplan.batch_size, use_batched)
    mem.cpu_workers = workers
    with _layer_parallel(workers) as pool_exec:
        run = _Run(cfg, opts, mem, cache, use_batched, pool_exec,
                   finish=None if budget is None else
                   (lambda x: budget.finish(x.pair.tuned_key, x.diff, x.fro)),
                   watch=RunWatch(check_interrupt),
                   base_weight=lambda pair, dev: base.get(pair.base_key, dev, torch.float32))
        tensors = _stream(streamer, batches, run, cfg, plan, report, progress, check_interrupt,
                          monitor)
    mem.cache_hits, mem.bytes_moved = streamer.cache_hits, streamer.bytes_moved
    mem.cached_layers = len(cache.keys_for(identity))
    for key in streamer.oom_keys:
        mem.oom_events.append(f"out of memory moving {key!r} to {device}: extracted on the CPU.")
    mem.final_vram = monitor.read()
    mem.seconds = report.seconds = time.perf_counter() - t0
    report.notes.extend(mem.notes())
    store_new_tensors(plan, base, tuned, cfg, tensors, report)
    if budget is not None:
        budget.annotate(report)
    return V2Result(finish_result(cfg, report, tensors), mem)


def extract_to_file_v2(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                       opts: MemoryOptions, path: str, *, overwrite: bool = False,
                       **kwargs) -> tuple[ExtractionReport, MemoryRunReport]:
    """``extract_lora_v2`` and an atomic write of the file; returns both reports."""
    out = extract_lora_v2(base, tuned, cfg, opts, **kwargs)
    report = out.result.report
    assert report is not None
    t0 = time.perf_counter()
    report.file_bytes = save_safetensors_atomic(out.result.tensors, path, out.result.metadata,
                                                overwrite=overwrite)
    report.output_path = out.memory.saved_path = path
    report.seconds += time.perf_counter() - t0
    out.memory.seconds = report.seconds
    log.info("saved %s (%d bytes)", path, report.file_bytes)
    return report, out.memory
