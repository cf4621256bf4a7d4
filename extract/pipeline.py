"""Whole-model extraction (V1): stream key pairs, extract each layer, collect tensors and the
report; a size budget runs the budget loop (``budget/loop.py``) instead."""

from __future__ import annotations

import logging
import time

from .budget.loop import extract_lora_budgeted
from .callbacks import InterruptFn, ProgressFn
from .config import ExtractConfig
from .layer_loop import run_layers
from .layer_work import LayerWork
from .new_tensors import store_new_tensors
from .oom_fallback import OomFallback
from .report import ExtractionReport
from .result import ExtractionResult, finish_result
from .run_setup import set_up_run
from .sources import WeightSource
from .writer import save_safetensors_atomic

log = logging.getLogger(__name__)


def extract_lora(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                 progress: ProgressFn | None = None, check_interrupt: InterruptFn | None = None,
                 prefetch: int = 2) -> ExtractionResult:
    """Extract a LoRA from ``tuned - base``; returns tensors, metadata and the report.

    Raises :class:`ExtractionInputError` for bad input (before any heavy work where possible)
    and :class:`NothingToExtract` when the models are identical.
    """
    cfg.validate()
    if cfg.target_size_mb:
        return extract_lora_budgeted(base, tuned, cfg, progress=progress,
                                     check_interrupt=check_interrupt, prefetch=prefetch)
    t0 = time.perf_counter()
    run = set_up_run(base, tuned, cfg)
    cfg, plan, report = run.cfg, run.plan, run.report
    # Accelerator OOM on a layer: that layer is redone on the CPU (noted in the report).
    fallback = OomFallback(cfg.device)
    work = LayerWork(base, tuned, cfg, plan, fallback)
    run_layers(plan.common, work.load, work.process, report, prefetch=prefetch, progress=progress,
               check_interrupt=check_interrupt, total=len(plan.common),
               cpu_compute=not fallback.on_accelerator)
    report.notes.extend(fallback.notes())
    store_new_tensors(plan, base, tuned, cfg, work.tensors, report)
    report.seconds = time.perf_counter() - t0
    return finish_result(cfg, report, work.tensors)


def extract_to_file(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, path: str, *,
                    progress: ProgressFn | None = None, check_interrupt: InterruptFn | None = None,
                    prefetch: int = 2, overwrite: bool = False) -> ExtractionReport:
    """Extract and write the LoRA atomically to ``path``; returns the report."""
    result = extract_lora(base, tuned, cfg, progress=progress, check_interrupt=check_interrupt,
                          prefetch=prefetch)
    report = result.report
    assert report is not None
    t0 = time.perf_counter()
    report.file_bytes = save_safetensors_atomic(result.tensors, path, result.metadata,
                                                overwrite=overwrite)
    report.output_path = path
    report.seconds += time.perf_counter() - t0
    log.info("saved %s (%d bytes)", path, report.file_bytes)
    return report
