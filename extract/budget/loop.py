"""The loop of a size-budget run: the spectra pass, the allocation, then the finishing pass
(the passes are ``passes.py``, the rank math ``rank_math.py``)."""

from __future__ import annotations

import time

import torch

from ..callbacks import InterruptFn, ProgressFn
from ..config import ExtractConfig
from ..layer import LayerExtraction
from ..layer_loop import run_layers
from ..layer_work import LayerWork
from ..new_tensors import store_new_tensors
from ..oom_fallback import OomFallback
from ..pair_output import layer_generator, needs_svd
from ..pairing import KeyPair
from ..result import ExtractionResult, finish_result
from ..run_setup import set_up_run
from ..sources import WeightSource
from .passes import BudgetPass


def extract_lora_budgeted(base: WeightSource, tuned: WeightSource, cfg: ExtractConfig, *,
                          progress: ProgressFn | None = None,
                          check_interrupt: InterruptFn | None = None,
                          prefetch: int = 2) -> ExtractionResult:
    """``extract_lora`` for ``cfg.target_size_mb``: the best ranks whose tensors fit the budget."""
    t0 = time.perf_counter()
    run = set_up_run(base, tuned, cfg)
    cfg, plan, report = run.cfg, run.plan, run.report
    total = len(plan.common)
    fallback = OomFallback(cfg.device)
    budget = BudgetPass(base, tuned, cfg, plan, lambda path: layer_generator(cfg, path),
                        fallback=fallback, progress=progress, check_interrupt=check_interrupt,
                        prefetch=prefetch)
    progress = budget.second_pass_progress(progress)

    def finish(pair: KeyPair, diff: torch.Tensor, fro: float) -> LayerExtraction | None:
        # The factors at the allocated rank, from the first pass's decomposition.
        return budget.finish(pair.tuned_key, diff, fro) if needs_svd(pair, fro, cfg, plan) else None

    work = LayerWork(base, tuned, cfg, plan, fallback, finish=finish, stored=budget.spectra.release)
    run_layers(plan.common, work.load, work.process, report, prefetch=prefetch, progress=progress,
               check_interrupt=check_interrupt, total=total,
               cpu_compute=not fallback.on_accelerator)
    report.notes.extend(fallback.notes())
    store_new_tensors(plan, base, tuned, cfg, work.tensors, report)
    budget.annotate(report)
    report.seconds = time.perf_counter() - t0
    return finish_result(cfg, report, work.tensors)
