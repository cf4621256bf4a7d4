"""The streamed (block-swap) extraction: the planner's policy carried out by the streamer, with
the same results as the layer-by-layer pipeline (``extract/pipeline.py``). The LoraExtractV2 node
and the command line's memory flags run it.

Layers are processed in model order (the output file has the pipeline's keys in its order); what differs
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
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass

import torch

from ..extract.budget.passes import BudgetPass
from ..extract.callbacks import InterruptFn, ProgressFn
from ..extract.config import ExtractConfig
from ..extract.new_tensors import store_new_tensors
from ..extract.oom_fallback import OomFallback, release_accelerator_cache
from ..extract.pair_output import layer_generator, needs_svd
from ..extract.pairing import KeyPair, PairPlan
from ..extract.report import ExtractionReport
from ..extract.result import ExtractionResult, finish_result
from ..extract.run_setup import set_up_run
from ..extract.sources import WeightSource
from ..extract.waits import RunWatch
from ..extract.writer import save_safetensors_atomic
from .batch_decompose import BatchDecomposer
from .blocks import block_of, group_by_block
from .buffers import StagingPool
from .cache import RESIDENT, ResidentCache, source_identity
from .layer_store import LayerStore
from .layer_workers import cpu_workers, layer_parallel
from .modes import MODES
from .monitor import VramMonitor, VramProbe, torch_probe
from .planner import BlockSize, MemoryOptions, form_batches, plan_memory
from .rolling import stream_rolling
from .run_report import MemoryRunReport
from .streamer import PairStreamer, pair_bytes, release_batch
from .streams import DeviceStreams

log = logging.getLogger(__name__)

# free_memory(bytes, device): ask the host application (ComfyUI) to make room on the device.
FreeMemoryFn = Callable[[int, torch.device], None]


@dataclass
class StreamedResult:
    result: ExtractionResult
    memory: MemoryRunReport


def _stream(streamer: PairStreamer, batches: list[list[KeyPair]], run: BatchDecomposer, cfg: ExtractConfig,
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

    Pass 1 streams layer by layer like the pipeline (one difference at a time on the device); pass 2,
    which only finishes the kept factors at the allocated ranks, goes through the streamer.
    """
    if not cfg.target_size_mb:
        return None
    return BudgetPass(base, tuned, cfg, plan, lambda path: layer_generator(cfg, path),
                      fallback=OomFallback(cfg.device), progress=progress,
                      check_interrupt=check_interrupt, prefetch=2)


def extract_lora_streamed(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                    opts: MemoryOptions, *, progress: ProgressFn | None = None,
                    check_interrupt: InterruptFn | None = None, probe: VramProbe | None = None,
                    free_memory: FreeMemoryFn | None = None, cache: ResidentCache = RESIDENT,
                    batched_svd: bool | None = None,
                    streams: DeviceStreams | None = None) -> StreamedResult:
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
        log.info("memory plan: mode %s, budget %s, %d blocks kept, %d offloaded, batch %d, ahead %d",
                 opts.mode, mplan.budget_bytes, len(mplan.resident), len(mplan.offloaded),
                 mplan.batch_size, mplan.prefetch_ahead)
    batches = [[plan.common[i] for i in b]
               for b in form_batches(sizes, mplan.batch_size, mplan.max_batch_bytes)]
    pool = StagingPool(mplan.staging_bytes, pin=device.type == "cuda")
    streamer = PairStreamer(base, tuned, device, pool, mplan.prefetch_ahead, cache, identity,
                            resident_keys, streams)
    workers = cpu_workers(device, mplan.batch_size, use_batched)
    mem.cpu_workers = workers
    with layer_parallel(workers) as pool_exec:
        run = BatchDecomposer(cfg, opts, mem, cache, use_batched, pool_exec,
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
    return StreamedResult(finish_result(cfg, report, tensors), mem)


def extract_to_file_streamed(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig,
                       opts: MemoryOptions, path: str, *, overwrite: bool = False,
                       **kwargs) -> tuple[ExtractionReport, MemoryRunReport]:
    """``extract_lora_streamed`` and an atomic write of the file; returns both reports."""
    out = extract_lora_streamed(base, tuned, cfg, opts, **kwargs)
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
